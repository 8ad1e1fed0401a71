"""Perplexity of a bundle over real text: the accuracy number every quantization is judged by."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edge.errors import PromptError


def default_text() -> str:
    """Python's own documentation topics (~465k chars), present in every CPython: real English prose
    and code. Topics in sorted key order, so the text is the same on every machine."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def split_text(text: str) -> tuple[str, str]:
    """(calibration part, held-out part): the first and second half, cut at a paragraph break.
    Quantization calibrates on the first and is judged on the second, never on what it saw."""
    cut = text.find("\n\n", len(text) // 2)
    cut = len(text) // 2 if cut < 0 else cut
    return text[:cut], text[cut:].lstrip("\n")


def heldout_text() -> str:
    return split_text(default_text())[1]


LICENSES = Path("/usr/share/common-licenses")
LICENSE_FILES = ("GPL-3", "Apache-2.0", "MPL-2.0")


def license_text() -> str:
    """Legal prose far from the pydoc calibration text: the GPL-3, Apache-2.0 and MPL-2.0 texts
    Debian's base-files installs, joined in that order."""
    missing = [n for n in LICENSE_FILES if not (LICENSES / n).is_file()]
    if missing:
        raise PromptError(f"{LICENSES}: no {', '.join(missing)} (Debian's base-files installs them)")
    return "\n\n".join((LICENSES / n).read_text(encoding="utf-8") for n in LICENSE_FILES)


CHANGELOG = Path("/usr/share/doc/dpkg/changelog.gz")


def changelog_text() -> str:
    """Release notes, a domain no calibration text comes from: dpkg's own changelog (entries with
    versions, bug numbers, people's names and e-mail addresses), which every Debian system has."""
    import gzip

    try:
        with gzip.open(CHANGELOG, "rt", encoding="utf-8") as f:
            return f.read()
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise PromptError(f"{CHANGELOG}: cannot read ({e}; Debian's dpkg package installs it)") from None


# the evaluation texts of an export's accuracy report: name -> (description, loader)
EVAL_TEXTS: dict[str, tuple[str, Callable[[], str]]] = {
    "pydoc-heldout": ("pydoc_data.topics, second half (held out from calibration)", heldout_text),
    "licenses": ("GPL-3 + Apache-2.0 + MPL-2.0 from /usr/share/common-licenses (another domain)", license_text),
    "changelog": ("dpkg's changelog from /usr/share/doc/dpkg (release notes: a third domain)", changelog_text),
}


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood (nats / token)
    tokens: int  # predicted tokens
    windows: int
    window: int

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "nll": self.nll, "tokens": self.tokens,
                "windows": self.windows, "window": self.window}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z -= z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def windows_of(ids: Sequence[int], window: int, tokens: int) -> list[list[int]]:
    """Consecutive non-overlapping windows that together predict ``tokens`` next tokens
    (a window of w ids predicts w - 1). Fewer if the text runs out."""
    if window < 2:
        raise PromptError(f"perplexity window must be >= 2 tokens, got {window}")
    ids, out, i, remaining = list(ids), [], 0, tokens
    while remaining > 0 and i + 1 < len(ids):
        w = ids[i:i + min(window, remaining + 1)]
        out.append(w)
        remaining -= len(w) - 1
        i += len(w)
    return out


def perplexity(logits_fn: Callable[[list[int]], np.ndarray], ids: Sequence[int], window: int, tokens: int,
               progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """``logits_fn(window_ids) -> [len, V]`` logits of a fresh context; NLL of each next token."""
    wins = windows_of(ids, window, tokens)
    if not wins:
        raise PromptError("text too short for a perplexity measurement")
    total, count = 0.0, 0
    for i, w in enumerate(wins):
        lp = log_softmax(logits_fn(w)[:-1])
        total -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
        if progress:
            progress(i + 1, len(wins))
    nll = total / count
    return PerplexityResult(math.exp(nll), nll, count, len(wins), window)


def bundle_perplexity(model, text: str, tokens: int = 4096, window: int | None = None,
                      progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of a loaded runtime Model: each window is one fresh prefill (chunked as exported)."""
    if not isinstance(tokens, int) or isinstance(tokens, bool) or tokens < 1:
        raise PromptError(f"tokens: expected an integer >= 1 (tokens to predict), got {tokens!r}")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 2):
        raise PromptError(f"perplexity window must be >= 2 tokens, got {window!r}")
    window = min(1024 if window is None else window, model.max_context)
    ids = model.tokenizer.encode(text)

    def logits_fn(w: list[int]) -> np.ndarray:
        return model.prefill(model.embed(w), model.new_cache(), all_logits=True)

    return perplexity(logits_fn, ids, window, tokens, progress)
