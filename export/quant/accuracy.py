"""Accuracy at export: perplexity of a prefill graph over held-out text, chunked as the runtime
chunks it, each window a fresh context (edge.runtime.perplexity does the scoring)."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

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
    from edge.runtime.kv_cache import KVCache
    from edge.runtime.model import session_options
    from edge.runtime.perplexity import perplexity

    context = -(-window // chunk) * chunk
    with tempfile.TemporaryDirectory(prefix="edge-eval-") as tmp:
        store = WeightStore()
        model = graph(cfg, weights, store, context, linear=linear, **graph_kw).build("prefill", chunk, context)
        store.write(Path(tmp))
        onnx.save_model(model, str(Path(tmp) / "prefill.onnx"))
        sess = ort.InferenceSession(str(Path(tmp) / "prefill.onnx"), session_options(threads),
                                    providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    emb = weights["model.embed_tokens.weight"] if lookup is None else lookup

    def logits_fn(w: list[int]) -> np.ndarray:
        cache, out = KVCache(cfg, context), []
        for off in range(0, len(w), chunk):
            part = w[off:off + chunk]
            x = np.zeros((1, chunk, cfg.hidden_size), np.float32)
            x[0, :len(part)] = emb[part]
            res = dict(zip(names, sess.run(names, {"inputs_embeds": x, "start": np.array([off], np.int64),
                                                     **cache.feeds()})))
            cache.write(off, len(part), res)
            out.append(res["logits"][0, :len(part)])
        return np.concatenate(out, 0)

    bar: Callable[[int, int], None] | None = (lambda d, t: progress.bar(d, t, label)) if progress else None
    return perplexity(logits_fn, ids, window, tokens, bar)


def report(float_ppl: float, quant_ppl: float, **extra) -> dict:
    return {"float": round(float_ppl, 4), "quantized": round(quant_ppl, 4),
            "change_percent": round(100 * (quant_ppl / float_ppl - 1), 3), **extra}
