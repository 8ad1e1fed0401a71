"""Calibration text: what the static activation scales, hot channels and smoothing are fitted to.

The default corpus mixes four domains that exist offline on any machine running edge-export, and
none of it comes from an evaluation text (edge.runtime.perplexity.EVAL_TEXTS):
- docs: docstrings of pure-Python standard-library modules (read with ``ast``, nothing imported);
- code: the source of other standard-library modules;
- prose: short narrative, news, letters and recipes written for edge (prose.txt, in this folder);
- chat: questions and answers rendered in the model's own chat template (chats.json), each
  conversation a fresh context, as prompts reach the model at run time.
Windows are taken from the domains in turn, so each gets an equal share of the token budget until
it runs out (prose and chat are small; docs and code fill the rest).

``--calib PATH...`` replaces the corpus with a user's files: plain text, or ``.jsonl`` files of
``{"messages": [...]}`` chats (rendered in the template); a folder is read recursively.
"""

from __future__ import annotations

import ast
import json
import sysconfig
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from edge.errors import EdgeError

HERE = Path(__file__).parent
# disjoint sets: documentation is read from the first, code from the second
DOCS_MODULES = ("_pydecimal.py", "argparse.py", "statistics.py", "fractions.py", "difflib.py", "textwrap.py",
                "shutil.py", "subprocess.py", "inspect.py", "pathlib.py", "calendar.py", "random.py",
                "heapq.py", "string.py", "tarfile.py", "typing.py", "functools.py", "threading.py")
CODE_MODULES = ("json/decoder.py", "json/encoder.py", "csv.py", "configparser.py", "sched.py", "queue.py",
                "dataclasses.py", "ipaddress.py", "tokenize.py", "base64.py", "glob.py", "fnmatch.py",
                "gettext.py", "enum.py", "locale.py", "mailbox.py", "smtplib.py", "zipfile.py")
MAX_FILES, MAX_FILE_BYTES = 10_000, 64 << 20  # --calib folders: bounded work
CHARS_PER_TOKEN = 8  # generous: text is read up to budget * this many characters


@dataclass(frozen=True)
class Text:
    """One calibration source: plain text (cut into windows) or chats (one window each)."""

    domain: str
    text: str = ""
    chats: tuple[tuple[dict, ...], ...] = ()


class Encoder(Protocol):
    """What the corpus needs of a tokenizer (edge.runtime.tokenizer.Tokenizer)."""

    def encode(self, text: str, special: bool = ...) -> list[int]: ...
    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = ...) -> list[int]: ...


def _stdlib(names: Iterable[str]) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / n for n in names if (root / n).is_file()]


def docstrings(path: Path) -> str:
    """The module's documentation as text: each documented object's name and docstring."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    parts = [ast.get_docstring(tree) or ""]
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc) > 40:  # one-liners add little but window starts
                parts.append(f"{node.name}\n\n{doc}")
    return "\n\n".join(p for p in parts if p)


def _chat_messages(pairs: Sequence[Sequence[str]]) -> tuple[dict, ...]:
    return tuple(m for q, a in pairs for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a}))


def default_texts() -> list[Text]:
    return [
        Text("docs", "\n\n".join(docstrings(p) for p in _stdlib(DOCS_MODULES))),
        Text("code", "\n\n".join(p.read_text(encoding="utf-8") for p in _stdlib(CODE_MODULES))),
        Text("prose", (HERE / "prose.txt").read_text(encoding="utf-8")),
        Text("chat", chats=tuple(_chat_messages(c) for c in json.loads((HERE / "chats.json").read_text("utf-8")))),
    ]


DEFAULT_LABEL = ("default corpus: Python stdlib docstrings (docs) and source (code), edge's prose and "
                 "chat samples in the model's template")


def as_plain(t: Text) -> Text:
    """Chats as plain text, for a model without a chat template."""
    if not t.chats:
        return t
    turns = ("\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in c) for c in t.chats)
    return Text(t.domain, "\n\n".join(turns))


def _files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise EdgeError(f"--calib {path}: no such file or folder")
    found = sorted(p for p in path.rglob("*") if p.is_file() and not any(s.startswith(".") for s in p.relative_to(path).parts))
    if len(found) > MAX_FILES:
        raise EdgeError(f"--calib {path}: {len(found)} files, more than {MAX_FILES}; point it at a smaller folder")
    return found


def _user_text(path: Path) -> Text:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise EdgeError(f"--calib {path}: {path.stat().st_size} bytes, more than {MAX_FILE_BYTES} per file")
    try:
        raw = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeError(f"--calib {path}: cannot read as UTF-8 text ({e})") from None
    if path.suffix != ".jsonl":
        return Text(str(path), raw)
    chats = []
    for n, line in enumerate(raw.splitlines(), 1):
        if not line.strip():
            continue
        try:
            msgs = json.loads(line)["messages"]
            ok = isinstance(msgs, list) and msgs and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in msgs)
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            raise EdgeError(f"--calib {path}:{n}: expected a JSON object {{\"messages\": [{{\"role\": ..., "
                            "\"content\": ...}}, ...]}} per line")
        chats.append(tuple(msgs))
    return Text(str(path), chats=tuple(chats))


def user_texts(paths: Sequence[Path]) -> list[Text]:
    """The user's --calib files (folders read recursively, hidden entries skipped, sorted)."""
    texts = [_user_text(f) for p in paths for f in _files(Path(p))]
    texts = [t for t in texts if t.text.strip() or t.chats]
    if not texts:
        raise EdgeError(f"--calib {' '.join(map(str, paths))}: no text found")
    return texts


def _windows(t: Text, tok: Encoder, window: int, budget: int) -> list[list[int]]:
    if t.chats:
        return [tok.encode_chat(list(c), add_generation_prompt=False)[:window] for c in t.chats]
    ids = tok.encode(t.text[: budget * CHARS_PER_TOKEN], special=False)
    return [ids[i:i + window] for i in range(0, len(ids), window)]


def windows(texts: Sequence[Text], tok: Encoder, window: int, tokens: int) -> list[tuple[str, list[int]]]:
    """``tokens`` tokens in windows of at most ``window``, taken from the sources in turn (each a
    fresh context when calibrated), as (domain, token ids)."""
    queues = [_windows(t, tok, window, tokens) for t in texts]
    out, total = [], 0
    pos = [0] * len(queues)
    while total < tokens and any(p < len(q) for p, q in zip(pos, queues)):
        for i, q in enumerate(queues):
            if pos[i] >= len(q) or total >= tokens:
                continue
            piece = q[pos[i]][: tokens - total]
            pos[i] += 1
            if piece:
                out.append((texts[i].domain, piece))
                total += len(piece)
    return out


def tokens_per_domain(wins: Sequence[tuple[str, Sequence[int]]]) -> dict[str, int]:
    used: dict[str, int] = {}
    for domain, ids in wins:
        used[domain] = used.get(domain, 0) + len(ids)
    return used


def hessian_weights(wins: Sequence[tuple[str, Sequence[int]]], budget: int) -> list[float]:
    """Per window, its weight in the input second-moment matrices GPTQ rounds with (0 = unused):
    the first windows up to ``budget`` tokens (the domains alternate, so these span them all),
    every domain given an equal share whatever its token count. Measured: balanced, GPTQ helps
    the texts of other domains too; pooled, the largest domains (docs, code) pull it their way."""
    picked, total = [], 0
    for domain, ids in wins:
        picked.append(total < budget)
        total += len(ids) if picked[-1] else 0
    used = tokens_per_domain([w for w, p in zip(wins, picked) if p])
    return [1.0 / (len(used) * used[d]) if p else 0.0 for (d, _), p in zip(wins, picked)]
