"""Accuracy at export: perplexity of a prefill graph over held-out text, chunked as the runtime
chunks it, each window a fresh context (edge.runtime.perplexity does the scoring)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from edge.config import DecoderConfig
from edge.progress import Progress

from edge.export.graph.builder import WeightStore
from edge.export.graph.decoder import DecoderGraph, LinearEmitter

EVAL_TOKENS, EVAL_WINDOW = 8192, 1024


def graph_perplexity(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], ids: Sequence[int], chunk: int,
                     linear: LinearEmitter | None = None, tokens: int = EVAL_TOKENS, window: int = EVAL_WINDOW,
                     threads: int = 0, progress: Progress | None = None, label: str = "perplexity",
                     lookup: np.ndarray | None = None, graph: type[DecoderGraph] = DecoderGraph, **graph_kw):
    """Perplexity of the prefill graph built from ``weights`` with ``linear`` (float by default).
    The graph's context is the window: positions past it are masked anyway, and fewer are faster.
    ``lookup``: the token table to embed with (default: the float one)."""
    return graph_perplexities(cfg, weights, {label: ids}, chunk, linear, tokens, window, threads, progress, lookup,
                              graph, **graph_kw)[label]


def graph_perplexities(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], texts: Mapping[str, Sequence[int]],
                       chunk: int, linear: LinearEmitter | None = None, tokens: int = EVAL_TOKENS,
                       window: int = EVAL_WINDOW, threads: int = 0, progress: Progress | None = None,
                       lookup: np.ndarray | None = None, graph: type[DecoderGraph] = DecoderGraph, **graph_kw) -> dict:
    """graph_perplexity for several token sequences (label -> ids) with one graph and session
    (building and loading the float graph costs seconds per call)."""
    from edge.runtime.chunks import ChunkRunner
    from edge.runtime.kv_cache import KVCache
    from edge.runtime.sessions import open_session, session_options
    from edge.runtime.perplexity import perplexity

    context = -(-window // chunk) * chunk
    with tempfile.TemporaryDirectory(prefix="edge-eval-") as tmp:
        store = WeightStore()
        model = graph(cfg, weights, store, context, linear=linear, **graph_kw).build("prefill", chunk, context)
        store.write(Path(tmp))
        onnx.save_model(model, str(Path(tmp) / "prefill.onnx"))
        runner = ChunkRunner(open_session(Path(tmp) / "prefill.onnx", session_options(threads)), chunk)
    emb = weights["model.embed_tokens.weight"] if lookup is None else lookup

    def logits_fn(w: list[int]) -> np.ndarray:
        return np.concatenate([out["logits"] for _, out in runner.run(emb[w][None], KVCache(cfg, context), "all")], 0)

    out = {}
    for label, ids in texts.items():
        bar: Callable[[int, int], None] | None = (lambda d, t, label=label: progress.bar(d, t, label)) if progress else None
        out[label] = perplexity(logits_fn, ids, window, tokens, bar)
    return out


def report(float_ppl: float, quant_ppl: float, **extra) -> dict:
    return {"float": round(float_ppl, 4), "quantized": round(quant_ppl, 4),
            "change_percent": round(100 * (quant_ppl / float_ppl - 1), 3), **extra}


def texts_accuracy(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], model, chunk: int, tokens: int,
                   window: int, progress: Progress, reference: dict[str, Any], label: str) -> dict[str, dict]:
    """Perplexity of a loaded bundle ``model`` (as the runtime runs its plan) against the float
    graph on every evaluation text (edge.runtime.perplexity.EVAL_TEXTS) that this machine has;
    ``reference`` caches the float figures per text across calls."""
    from edge.errors import PromptError
    from edge.runtime.perplexity import EVAL_TEXTS, bundle_perplexity

    window = min(window, model.max_context)  # as bundle_perplexity (and edge-eval) will
    out: dict[str, dict] = {}
    texts: dict[str, tuple[str, str]] = {}
    for name, (description, load) in EVAL_TEXTS.items():
        try:
            texts[name] = (description, load())
        except PromptError as e:
            out[name] = {"text": description, "skipped": str(e)}
    missing = {f"float reference, {name}": (name, model.tokenizer.encode(text))
               for name, (_, text) in texts.items() if name not in reference}
    if missing:  # one float graph for every text
        got = graph_perplexities(cfg, weights, {k: ids for k, (_, ids) in missing.items()}, chunk, tokens=tokens,
                                 window=window, progress=progress)
        reference.update({name: got[k].perplexity for k, (name, _) in missing.items()})
    for name, (description, text) in texts.items():
        got = bundle_perplexity(model, text, tokens=tokens, window=window,
                                progress=lambda d, t: progress.bar(d, t, f"{label}, {name}"))
        out[name] = report(reference[name], got.perplexity, text=description, tokens=got.tokens, window=window)
    return {name: out[name] for name in EVAL_TEXTS}  # the registry's order, skipped texts included
