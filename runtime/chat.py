"""Multi-turn chat that keeps its KV cache: a follow-up turn prefills only what is new.

A ``ChatSession`` owns one KV cache and the keys of the rows it holds (token ids; image rows by
image digest, runtime/chat_prompt.py). Each turn renders the whole conversation with the chat
template, finds the longest common prefix with the cached rows, rolls the cache back to it
(``cache.length = n``: rows beyond the length are ignored) and prefills only the rest. Comparing
token ids, not texts, is what makes this exact: the template may render the previous answer to
different ids than the ones generated (the end-of-turn token was sampled, never fed; a text may
re-tokenize differently), and then the cache is rolled back to where they part.

Context full: ``overflow="refuse"`` (default) refuses a turn whose prompt leaves no room for one
new token (``ContextFullError``) and cuts an answer at the end of the context (finish reason
"length"); ``overflow="drop_oldest"`` drops the oldest turns (never leading system messages nor
the last message) until the prompt leaves room for ``max_new_tokens`` (at most half the context).

Only ``Model.new_cache``, ``cache.length``, ``Model.embed`` / ``generate_ids`` and the tokenizer
are used, so any prefill plan and cache class serve.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Hashable, Iterator, Protocol, Sequence

from edge.errors import PromptError

from edge.runtime.chat_prompt import Prompt, chat_prompt, split_image_markers, text_prompt
from edge.runtime.sampling import SamplingParams

if TYPE_CHECKING:
    from edge.runtime.model import Model

OVERFLOW_POLICIES = ("refuse", "drop_oldest")
MAX_STOPS = 16
FINISH_REASONS = ("stop", "length", "cancelled")


class ContextFullError(PromptError):
    """A conversation does not fit in the bundle's context (under the session's overflow policy)."""


class Cancel(Protocol):
    def is_set(self) -> bool: ...


@dataclass(frozen=True)
class GenerationOptions:
    """How one answer is generated. ``stop``: strings that end the answer (not included in it);
    ``ignore_eos``: do not stop at the model's end tokens (benchmarks, fixed-length answers)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise PromptError(f"max_new_tokens must be an integer >= 0, got {n!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) and s for s in stop):
            raise PromptError(f"stop must be a non-empty str or a list of them, got {self.stop!r:.80}")
        if len(stop) > MAX_STOPS:
            raise PromptError(f"at most {MAX_STOPS} stop strings, got {len(stop)}")
        object.__setattr__(self, "stop", tuple(stop))
        self.sampling  # validates temperature / top_k / top_p / seed

    @property
    def sampling(self) -> SamplingParams:
        return SamplingParams(self.temperature, self.top_k, self.top_p, self.seed)


@dataclass
class TurnStats:
    """What one answer cost. ``cached_tokens``: prompt rows reused from the KV cache;
    ``prefilled_tokens``: the rest, run through prefill."""

    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    dropped_messages: int = 0
    finish_reason: str | None = None  # "stop" (end token or stop string), "length", "cancelled"
    ttft_s: float | None = None  # from the start of the turn to its first token
    elapsed_s: float = 0.0

    @property
    def prefilled_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


class StopMatcher:
    """Cuts streamed text at the first stop string; holds back a tail that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.pending, self.hit = tuple(stops), "", False

    def push(self, piece: str) -> str:
        if self.hit or not piece:
            return ""
        if not self.stops:
            return piece
        self.pending += piece
        found = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if found:
            self.hit = True
            out, self.pending = self.pending[:min(found)], ""
            return out
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(self.pending)), 0, -1)
                    if self.pending.endswith(s[:k])), default=0)
        out, self.pending = self.pending[:len(self.pending) - hold], self.pending[len(self.pending) - hold:]
        return out

    def flush(self) -> str:
        out, self.pending = ("" if self.hit else self.pending), ""
        return out


def common_prefix(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class Completion:
    """One answer: iterate for its text pieces; afterwards ``text`` and ``stats`` hold the result.
    Generation runs while it is iterated; stopping early (``close()``, a break) leaves the session
    consistent."""

    def __init__(self, session: "ChatSession", prompt: Prompt, options: GenerationOptions,
                 cancel: Cancel | None, stats: TurnStats, started: float, on_end=None):
        self.session, self.prompt, self.options, self.cancel = session, prompt, options, cancel
        self.stats, self._started, self._on_end = stats, started, on_end
        self.text = ""
        self.token_ids: list[int] = []
        self._it = self._run()

    def __iter__(self) -> Iterator[str]:
        return self._it

    def __next__(self) -> str:
        return next(self._it)

    def close(self) -> None:
        self._it.close()

    def _cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def _run(self) -> Iterator[str]:
        s, model, opts, st = self.session, self.session.model, self.options, self.stats
        prompt = self.prompt
        if not s._lock.acquire(blocking=False):
            raise RuntimeError("this ChatSession is already generating (one answer at a time)")
        stops = StopMatcher(opts.stop)
        decoder = model.tokenizer.stream_decoder()
        keys = list(prompt.keys)
        gen = None
        try:
            start = s._reuse(prompt.keys)
            st.prompt_tokens, st.cached_tokens = len(prompt), start
            if self._cancelled():
                st.finish_reason = "cancelled"
                return
            stop_ids = () if opts.ignore_eos else None
            gen = model.generate_ids(prompt.ids[start:], opts.max_new_tokens, opts.sampling, stop_ids,
                                     cache=s.cache, embeds=prompt.embeds_from(model, start), context_ids=prompt.ids[:start])
            for token in gen:
                if st.ttft_s is None:
                    st.ttft_s = time.perf_counter() - self._started
                self.token_ids.append(token)
                keys.append(token)
                st.completion_tokens += 1
                piece = stops.push(decoder.push(token))
                if piece:
                    self.text += piece
                    yield piece
                if stops.hit:
                    st.finish_reason = "stop"
                    return
                if self._cancelled():
                    st.finish_reason = "cancelled"
                    return
            full = len(prompt) + st.completion_tokens > model.max_context
            st.finish_reason = "length" if st.completion_tokens >= opts.max_new_tokens or full else "stop"
            tail = stops.push(decoder.flush())
            tail += stops.flush()
            if tail:
                self.text += tail
                yield tail
        finally:
            if gen is not None:
                gen.close()
            s._keys = keys[:s.cache.length]  # what the cache holds now, however generation ended
            st.elapsed_s = time.perf_counter() - self._started
            if st.finish_reason is None:  # closed early by the consumer, or an error
                st.finish_reason = "cancelled"
            s.last = st
            s._lock.release()
            if self._on_end is not None:
                self._on_end(self)


class ChatSession:
    """A conversation with its own KV cache. ``send``/``stream`` add a user turn to the session's
    history and the answer after it; ``complete(messages)`` answers a conversation given whole
    (as an OpenAI client sends it) and ``complete_text(prompt)`` a raw prompt, both reusing the
    cached rows they share. One answer at a time per session; sessions of one Model may run in
    parallel threads."""

    def __init__(self, model: "Model", system: str | None = None, overflow: str = "refuse"):
        if overflow not in OVERFLOW_POLICIES:
            raise PromptError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
        if system is not None and not isinstance(system, str):
            raise PromptError(f"system must be a str, got {type(system).__name__}")
        self.model, self.system, self.overflow = model, system, overflow
        self.cache = model.new_cache()
        self._keys: list[Hashable] = []  # keys of cache rows [0, cache.length)
        self._lock = threading.Lock()
        self.messages: list[dict[str, Any]] = []
        self.last: TurnStats | None = None
        self.reset()

    @property
    def cached_keys(self) -> tuple[Hashable, ...]:
        return tuple(self._keys)

    def reset(self) -> None:
        """Start the conversation over (the system message stays; so do its cached rows)."""
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def clear_cache(self) -> None:
        self.cache.length = 0
        self._keys = []

    # ---------------------------------------------------------------- turns
    def stream(self, content: str | list, images: Sequence[Any] | None = None, cancel: Cancel | None = None,
               **options) -> Completion:
        """Add a user turn (str, or content parts; ``images`` go at ``<image>`` markers, else first)
        and answer it; the answer joins the history when it ends (a cancelled one as far as it got;
        a turn cancelled before any text is taken back)."""
        if images:
            if not isinstance(content, str):
                raise PromptError("images= goes with str content; put images in the content parts instead")
            if self.model.vision is None:
                from edge.errors import ImageError

                raise ImageError(f"{self.model.bundle.path}: this bundle is text-only (no vision encoder); "
                                 f"it cannot take images")
            content = split_image_markers(content, list(images), self.model.vision.cfg.image_token)
        if isinstance(content, str) and not content:
            raise PromptError("message is empty")
        opts = GenerationOptions(**options)
        messages = self.messages + [{"role": "user", "content": content}]
        started = time.perf_counter()
        prompt, kept, dropped = fit_messages(self.model, messages, opts.max_new_tokens, self.overflow)

        def on_end(c: Completion) -> None:
            if c.text or c.stats.finish_reason != "cancelled":
                self.messages = kept + [{"role": "assistant", "content": c.text}]

        return Completion(self, prompt, opts, cancel, TurnStats(dropped_messages=dropped), started, on_end)

    def send(self, content: str | list, images: Sequence[Any] | None = None, **options) -> str:
        return "".join(self.stream(content, images, **options))

    def complete(self, messages: list[dict[str, Any]], cancel: Cancel | None = None, **options) -> Completion:
        """Answer ``messages`` (the whole conversation); the session's own history is not used."""
        opts = GenerationOptions(**options)
        started = time.perf_counter()
        prompt, _, dropped = fit_messages(self.model, list(messages), opts.max_new_tokens, self.overflow)
        return Completion(self, prompt, opts, cancel, TurnStats(dropped_messages=dropped), started)

    def generate(self, prompt: Prompt, options: GenerationOptions, cancel: Cancel | None = None,
                 dropped: int = 0, started: float | None = None) -> Completion:
        """Answer a prompt built beforehand (``fit_messages``, ``text_prompt``): what a server does
        when it tokenizes before it picks the session with the most rows to reuse."""
        check_room(self.model, len(prompt), 1)
        return Completion(self, prompt, options, cancel, TurnStats(dropped_messages=dropped),
                          time.perf_counter() if started is None else started)

    def complete_text(self, prompt: str | Sequence[int], cancel: Cancel | None = None, **options) -> Completion:
        """Continue a raw prompt (no chat template; control-token text is the control token), or
        token ids."""
        opts = GenerationOptions(**options)
        started = time.perf_counter()
        if isinstance(prompt, str):
            p = text_prompt(self.model.encode_prompt(prompt, raw=True))
        else:
            p = text_prompt(prompt)
            vocab = self.model.config.vocab_size
            if not p.ids or any(not 0 <= i < vocab for i in p.ids):
                raise PromptError(f"prompt token ids must be a non-empty list in [0, {vocab})")
        check_room(self.model, len(p), 1)
        return Completion(self, p, opts, cancel, TurnStats(), started)

    # ---------------------------------------------------------------- cache and context
    def _reuse(self, keys: Sequence[Hashable]) -> int:
        """Roll the cache back to the longest common prefix with ``keys`` (at least one row is left
        to prefill: its logits start the answer). Returns the rows kept."""
        n = min(common_prefix(self._keys, keys), len(keys) - 1)
        self.cache.length = n
        del self._keys[n:]
        return n

def fit_messages(model: "Model", messages: list[dict[str, Any]], max_new_tokens: int, overflow: str = "refuse"
                 ) -> tuple[Prompt, list[dict[str, Any]], int]:
    """(prompt, the messages it renders, how many were dropped) under the overflow policy: refuse a
    prompt that leaves no room for one new token, or drop the oldest turns (a user message and
    what answered it; never leading system messages nor the last message) until it leaves room
    for ``max_new_tokens`` (at most half the context)."""
    if overflow not in OVERFLOW_POLICIES:
        raise PromptError(f"overflow must be one of {', '.join(OVERFLOW_POLICIES)}, got {overflow!r}")
    limit = model.max_context
    if not isinstance(messages, list):
        raise PromptError("messages must be a non-empty list of {'role': ..., 'content': ...}")
    chars = sum(len(m["content"]) for m in messages if isinstance(m, dict) and isinstance(m.get("content"), str))
    if overflow == "refuse" and chars > model.tokenizer.max_token_chars * limit:  # refused before tokenizing
        raise ContextFullError(f"the conversation's {chars} characters cannot fit in the context of {limit} tokens")
    prompt = chat_prompt(model, messages)
    if overflow == "refuse":
        check_room(model, len(prompt), 1, overflow)
        return prompt, messages, 0
    room = max(1, min(max_new_tokens, limit // 2))
    dropped = 0
    while len(prompt) + room > limit:
        first = next((i for i, m in enumerate(messages) if m.get("role") != "system"), len(messages))
        end = first + 1
        while end < len(messages) - 1 and messages[end].get("role") != "user":
            end += 1  # a whole turn: the user message and what answered it
        if end >= len(messages):  # only the last message (and system messages) left
            check_room(model, len(prompt), room, overflow)
        dropped += end - first
        messages = messages[:first] + messages[end:]
        prompt = chat_prompt(model, messages)
    return prompt, messages, dropped


def check_room(model: "Model", n: int, room: int, overflow: str = "refuse") -> None:
    limit = model.max_context
    if n + room > limit:
        hint = "start over (reset)" if overflow == "drop_oldest" else \
            "start over (reset) or drop old turns (overflow='drop_oldest')"
        raise ContextFullError(f"the conversation has {n} tokens and needs {room} more for the answer, but the "
                               f"context holds {limit}; {hint}")


def chat_once(model: "Model", messages: list[dict[str, Any]], **options) -> Iterator[str]:
    """Model.stream_chat: a throwaway session (fresh cache) answering ``messages``."""
    return iter(ChatSession(model).complete(messages, **options))


__all__ = ["ChatSession", "Completion", "ContextFullError", "GenerationOptions", "TurnStats", "OVERFLOW_POLICIES",
           "FINISH_REASONS", "StopMatcher", "common_prefix", "chat_once", "fit_messages", "check_room"]
