"""edge-run BUNDLE without --prompt: a chat on the terminal.

Answers stream to stdout; prompts, hints and errors go to stderr. ``/reset`` starts over (the
system message stays), ``/exit`` (or end of input) quits, ``/help`` lists the commands. Ctrl-C
while an answer streams stops that answer (between tokens) and the session goes on; Ctrl-C at
the input line asks again, twice in a row quits."""

from __future__ import annotations

import signal
import sys
import threading
from typing import TYPE_CHECKING, TextIO

from edge.errors import EdgeError, PromptError

if TYPE_CHECKING:
    from edge.runtime.model import Model

HELP = "commands: /reset (start over), /exit (quit), /help; Ctrl-C stops an answer"


class _SigintFlag:
    """While active, SIGINT sets an event instead of raising KeyboardInterrupt."""

    def __init__(self):
        self.event = threading.Event()
        self._old = None

    def __enter__(self) -> threading.Event:
        self.event.clear()
        if threading.current_thread() is threading.main_thread():
            self._old = signal.signal(signal.SIGINT, lambda *_: self.event.set())
        return self.event

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
            self._old = None


def _read_line(prompt: str, out: TextIO, tty: bool) -> str:
    if tty:
        return input(prompt)
    out.flush()
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\n")


def chat_loop(model: "Model", system: str | None = None, overflow: str = "refuse", stats: bool = False,
              **options) -> int:
    """Run the terminal chat until /exit or end of input; returns the exit status."""
    from edge.runtime.chat import GenerationOptions

    GenerationOptions(**options)  # a bad option is refused once, before the chat opens
    if model.tokenizer.chat_template is None:
        raise PromptError("this bundle has no chat template, which a chat needs; use --prompt TEXT --raw")
    session = model.chat_session(system=system, overflow=overflow)
    out, err = sys.stdout, sys.stderr
    tty = sys.stdin.isatty()
    if tty:
        print(f"edge chat ({model.bundle.path.name}); {HELP}", file=err)
    interrupted = False
    while True:
        try:
            line = _read_line("> " if tty else "", out, tty)
        except EOFError:
            if tty:
                print(file=err)
            return 0
        except KeyboardInterrupt:
            if interrupted:
                print(file=err)
                return 0
            interrupted = True
            print("\n(Ctrl-C again or /exit to quit)", file=err)
            continue
        except UnicodeDecodeError:
            print("edge-run: error: the input line is not valid UTF-8", file=err)
            continue
        interrupted = False
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            return 0
        if text == "/reset":
            session.reset()
            print("(conversation reset)", file=err)
            continue
        if text == "/help":
            print(HELP, file=err)
            continue
        if text.startswith("/") and " " not in text:
            print(f"edge-run: unknown command {text}; {HELP}", file=err)
            continue
        try:
            with _SigintFlag() as cancel:
                completion = session.stream(line, cancel=cancel, **options)
                for piece in completion:
                    out.write(piece)
                    out.flush()
        except EdgeError as e:
            print(f"edge-run: error: {e}", file=err)
            continue
        except KeyboardInterrupt:  # a Ctrl-C just before the answer began
            print("\n[stopped]", file=err)
            continue
        out.write("\n")
        out.flush()
        st = completion.stats
        if st.finish_reason == "cancelled":
            print("[stopped]", file=err)
        if stats:
            span = st.elapsed_s - (st.ttft_s or 0)
            decode = (st.completion_tokens - 1) / span if st.completion_tokens > 1 and span > 0 else 0.0
            print(f"[prompt {st.prompt_tokens} tokens: {st.cached_tokens} cached, {st.prefilled_tokens} prefilled | "
                  f"first token {1e3 * (st.ttft_s or 0):.0f} ms | {st.completion_tokens} new tokens, "
                  f"{decode:.1f} tok/s | {st.finish_reason}]", file=err)
