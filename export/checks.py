"""Cross-checks at export: a model whose config, weights and tokenizer disagree is refused before any
graph is built, naming the file and field, never exported into a bundle that fails (or answers
wrongly) later.

- config values: typed readers (``cfg_int``, ``cfg_float``) for config.json fields and GGUF metadata
  alike: integers >= 1 where a size is meant, finite floats > 0 for epsilons and RoPE bases;
- weights: every tensor a family expects is present with the shape its config implies, and every
  tensor of the source is consumed, or named (``check_tensors``): a config that has fewer layers than
  the weights is an error listing the tensors it would drop;
- tokenizer: loads, round-trips a sample text, its ids fit the embedding, the chat template
  compiles and renders a sample conversation within the template bounds (``check_tokenizer``).
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from typing import Any, Mapping

import numpy as np

from edge.errors import ModelSourceError, UnsupportedModelError

_MISSING = object()
SHOWN = 4
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
ROUND_TRIP = "Hello, world! The year 2026: 42 cats and 7 dogs."  # ASCII: tokenizers without byte fallback too


class ConfigError(ModelSourceError):
    """A config value is missing, of the wrong type or out of range."""


def _typename(v: Any) -> str:
    return type(v).__name__


def _value(d: Mapping[str, Any], key: str, where: str, default: Any, expected: str) -> Any:
    """``d[key]``, or ``default`` when absent or null (an error without one); _MISSING never returns."""
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where}: expected a JSON object, got {_typename(d)}")
    v = d.get(key)
    if v is None and default is _MISSING:
        raise ConfigError(f"{where}: {key}: missing (expected {expected})")
    return v


def cfg_int(d: Mapping[str, Any], key: str, where: str, default: Any = _MISSING, minimum: int = 1) -> int:
    """``d[key]`` as an integer >= minimum (``default`` when absent or null, if given)."""
    v = _value(d, key, where, default, f"an integer >= {minimum}")
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ConfigError(f"{where}: {key}: expected an integer >= {minimum}, got {_typename(v)} {v!r:.60}")
    return int(v)


def cfg_float(d: Mapping[str, Any], key: str, where: str, default: Any = _MISSING) -> float:
    """``d[key]`` as a finite number > 0 (epsilons, RoPE bases)."""
    v = _value(d, key, where, default, "a number > 0")
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not 0 < v < math.inf:
        raise ConfigError(f"{where}: {key}: expected a finite number > 0, got {_typename(v)} {v!r:.60}")
    return float(v)


def cfg_token_ids(v: Any, where: str, key: str) -> list[int]:
    """An id or a list of ids (eos_token_id may be either), each an integer >= 0."""
    ids = [] if v is None else [v] if not isinstance(v, (list, tuple)) else list(v)
    for i in ids:
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ConfigError(f"{where}: {key}: expected token ids (integers >= 0), got {v!r:.80}")
    return [int(i) for i in ids]


# ---------------------------------------------------------------- weights


def _names(names: list[str]) -> str:
    return ", ".join(names[:SHOWN]) + (f" and {len(names) - SHOWN} more" if len(names) > SHOWN else "")


def _layers(names) -> set[int]:
    return {int(m.group(1)) for n in names if (m := _LAYER.search(n))}


def check_tensors(expected: Mapping[str, tuple[int, ...]], weights: Mapping[str, np.ndarray], where: str,
                  num_layers: int | None = None, layers_field: str = "config.json num_hidden_layers",
                  why: Mapping[str, str] | None = None) -> None:
    """Every expected tensor present with its shape, and nothing else in ``weights``.

    ``why``: for a tensor name, which config fields its shape comes from (for the message)."""
    missing = [n for n in expected if n not in weights]
    extra = sorted(n for n in weights if n not in expected)
    if extra:
        hint = ""
        beyond = sorted(i for i in _layers(extra) if num_layers is not None and i >= num_layers)
        if beyond:
            hint = (f"; {layers_field} is {num_layers} but the weights hold {max(_layers(weights)) + 1} layers "
                    f"(layers {beyond[0]}..{beyond[-1]} would be dropped)")
        raise UnsupportedModelError(f"{where}: {len(extra)} tensors the model's config does not use: "
                                    f"{_names(extra)}{hint}; refusing to export a model without them")
    if missing:
        hint = ""
        held = _layers(weights)
        if num_layers is not None and held and max(held) + 1 < num_layers:
            hint = f"; {layers_field} is {num_layers} but the weights hold {max(held) + 1} layers"
        raise UnsupportedModelError(f"{where}: {len(missing)} tensors missing: {_names(missing)}{hint}")
    by_kind: dict[str, list[str]] = defaultdict(list)
    for name, shape in expected.items():
        got = tuple(int(d) for d in np.shape(weights[name]))
        if got != tuple(shape):
            by_kind[_LAYER.sub(".layers.*.", name)].append(f"{name}: expected shape {tuple(shape)}, got {got}")
    if by_kind:
        first = next(iter(by_kind.values()))[0]
        name = first.split(":")[0]
        src = f" (from {why[name]})" if why and name in why else ""
        count = sum(map(len, by_kind.values()))
        raise UnsupportedModelError(f"{where}: {count} tensors have the wrong shape for the config, e.g. "
                                    f"{first}{src}")


# ---------------------------------------------------------------- tokenizer


def check_token_ids(cfg, where: str) -> None:
    """bos/eos ids within the vocabulary (an id past it has no embedding row)."""
    for key, ids in (("bos_token_id", [] if cfg.bos_token_id is None else [cfg.bos_token_id]),
                     ("eos_token_id", list(cfg.eos_token_ids))):
        bad = [i for i in ids if not 0 <= i < cfg.vocab_size]
        if bad:
            raise ConfigError(f"{where}: {key}: expected ids in [0, {cfg.vocab_size}) (vocab_size), got {bad}")


def check_tokenizer(tokenizer_json: str, chat_template: str | None, cfg, origin: str) -> None:
    """The tokenizer the bundle will carry works: it loads, a sample text round-trips, every id it
    can produce has an embedding row, and the chat template renders a sample conversation."""
    from edge.errors import EdgeError
    from edge.runtime.tokenizer import Tokenizer

    try:
        tok = Tokenizer.from_json_text(tokenizer_json, chat_template, origin=origin,
                                       manifest={"model": cfg.to_dict()})  # bos_token/eos_token as at runtime
    except EdgeError as e:
        raise ModelSourceError(str(e)) from None
    top = tok.max_token_id
    if top >= cfg.vocab_size:
        raise ModelSourceError(f"{origin}: token ids up to {top}, but the model's vocab_size is {cfg.vocab_size}: "
                               f"ids {cfg.vocab_size}..{top} have no embedding row")
    try:
        ids = tok.encode(ROUND_TRIP, special=False)
        back = tok.decode(ids, skip_special=False)
    except Exception as e:  # the tokenizers library raises plain Exceptions
        raise ModelSourceError(f"{origin}: the tokenizer fails on a sample text ({type(e).__name__}: {e})") from None
    if not ids or back.strip() != ROUND_TRIP.strip():
        raise ModelSourceError(f"{origin}: the tokenizer does not round-trip a sample text: {ROUND_TRIP!r} -> "
                               f"{len(ids)} ids -> {back!r:.120}")
    if max(ids) >= cfg.vocab_size:
        raise ModelSourceError(f"{origin}: encodes a sample text to id {max(ids)}, outside vocab_size {cfg.vocab_size}")
    if chat_template:
        try:
            tok.apply_chat_template([{"role": "user", "content": "Hi!"}])
        except EdgeError as e:
            raise ModelSourceError(f"{origin}: the chat template fails on a sample conversation: {e}") from None
