"""Calibration: run the float prefill graph over text and record, at the input of every linear,
per-channel absolute maxima and per-channel histograms of |x| (what static scales, hot channels,
smoothing and the clip search are computed from).

The float graph is instrumented rather than re-implemented: a recording emitter notes which tensor
feeds each linear, and those tensors become extra graph outputs. Linears fed by the same tensor
(q/k/v, gate/up) form one *group*: they share one activation quantizer.

Histograms are 8 bins per octave of |x|, keyed straight off the float32 bits (exponent + 3 mantissa
bits): no log, exact bin edges, and smoothing (x / s per channel) is a shift of whole octaves/8 bins.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from edge.config import DecoderConfig
from edge.progress import Progress

from edge.export.graph.builder import GraphBuilder, WeightStore
from edge.export.graph.decoder import DecoderGraph, float_linear

F32 = onnx.TensorProto.FLOAT
LOG2_LO, OCTAVES, PER_OCTAVE = -24, 40, 8  # |x| in [2^-24, 2^16); below -> bin 0, above -> last bin
NBINS = OCTAVES * PER_OCTAVE + 1
_KEY_LO = int(np.array(2.0 ** LOG2_LO, np.float32).view(np.uint32)) >> 20



def bin_edges() -> np.ndarray:
    """[NBINS + 1] edges; bin 0 = [0, 2^LOG2_LO), bin b >= 1 = [edge b, edge b+1)."""
    keys = (np.arange(NBINS, dtype=np.uint32) + _KEY_LO) << 20
    lows = keys.view(np.float32).astype(np.float64)
    return np.concatenate([[0.0], lows])


# float32 bits >> 20 (sign masked) = exponent and 3 mantissa bits -> histogram bin
_BIN_OF_KEY = np.clip(np.arange(2048) - _KEY_LO + 1, 0, NBINS - 1).astype(np.int32)


def bin_keys(x: np.ndarray) -> np.ndarray:
    bits = (np.ascontiguousarray(x, np.float32).view(np.uint32) >> 20) & np.uint32(0x7FF)
    return _BIN_OF_KEY[bits]


@dataclass(frozen=True)
class ChannelStats:
    """Statistics of one linear input over calibration tokens."""

    absmax: np.ndarray  # [channels] float32
    hist: np.ndarray  # [channels, NBINS] int64 counts of |x| bins
    sumsq: np.ndarray  # [channels] float64, sum of x^2
    tokens: int

    def scaled(self, s: np.ndarray) -> ChannelStats:
        """Statistics of x / s (per channel): what smoothing leaves at the linear's input.
        Bins move by round(8 log2 s); bin 0 (zeros and tiny values) stays put."""
        s = np.asarray(s, np.float64)
        c = len(s)
        shift = np.rint(np.log2(s) * PER_OCTAVE).astype(np.int64)
        target = np.clip(np.arange(NBINS)[None, :] - shift[:, None], 1, NBINS - 1)
        target[:, 0] = 0
        target += np.arange(c)[:, None] * NBINS
        hist = np.bincount(target.ravel(), weights=self.hist.ravel(), minlength=c * NBINS)
        return ChannelStats((self.absmax / s).astype(np.float32), np.rint(hist).astype(np.int64).reshape(c, NBINS),
                            self.sumsq / (s * s), self.tokens)


class _Accumulator:
    """In-place sums for one linear input (frozen into ChannelStats at the end)."""

    def __init__(self, channels: int):
        self.absmax = np.zeros(channels, np.float32)
        self.hist = np.zeros(channels * NBINS, np.int64)
        self.sumsq = np.zeros(channels, np.float64)
        self.offsets = np.arange(channels, dtype=np.int32) * NBINS
        self.tokens = 0

    def update(self, x: np.ndarray) -> None:
        np.maximum(self.absmax, np.abs(x).max(0), out=self.absmax)
        self.hist += np.bincount((bin_keys(x) + self.offsets).ravel(), minlength=self.hist.size)
        self.sumsq += np.einsum("tc,tc->c", x, x, dtype=np.float64)
        self.tokens += x.shape[0]

    def freeze(self) -> ChannelStats:
        return ChannelStats(self.absmax.copy(), self.hist.reshape(len(self.absmax), NBINS).copy(),
                            self.sumsq.copy(), self.tokens)


@dataclass(frozen=True)
class Calibration:
    groups: dict[str, tuple[str, ...]]  # input key -> linears fed by it (graph order)
    stats: dict[str, ChannelStats]  # input key -> statistics
    tokens: int
    domains: dict[str, int] = field(default_factory=dict)  # calibration tokens per corpus domain
    # input key -> weighted sum of x x^T over the windows hessian_weights picked (GPTQ), float32
    hessians: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    @property
    def channels(self) -> int:
        """All linear input channels (one set per group input): what the hot budget is a fraction of."""
        return sum(len(s.absmax) for s in self.stats.values())


class _RecordingGraph(DecoderGraph):
    """The float decoder, noting which tensor feeds each linear. The output projection is not
    among them: it runs on the CPU lane in every plan (logit rows only), int8 weights with float
    activations, so it needs no static activation scale."""

    def __init__(self, *args, **kw):
        self.fed_by: dict[str, str] = {}

        def record(g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
            self.fed_by[name] = x
            return float_linear(g, x, name, weight, bias)

        super().__init__(*args, linear=record, **kw)


def instrumented_prefill(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore,
                         chunk: int, context: int) -> tuple[onnx.ModelProto, dict[str, tuple[str, ...]]]:
    """The float prefill graph with every linear input as an extra output ``calib:<tensor>``."""
    dec = _RecordingGraph(cfg, weights, store, context)
    model = dec.build("prefill", chunk, context)
    groups: dict[str, list[str]] = {}
    for name, x in dec.fed_by.items():
        groups.setdefault(x, []).append(name)
    widths = {x: weights[names[0] + ".weight"].shape[1] for x, names in groups.items()}
    for x in groups:
        model.graph.node.append(onnx.helper.make_node("Identity", [x], [f"calib:{x}"], name=f"calib:{x}"))
        model.graph.output.append(onnx.helper.make_tensor_value_info(f"calib:{x}", F32, [chunk, widths[x]]))
    return model, {x: tuple(v) for x, v in groups.items()}


def calibrate(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], windows: Sequence[Sequence[int]],
              chunk: int = 128, threads: int = 0, progress: Progress | None = None,
              hessian: Sequence[float] | None = None) -> Calibration:
    """Statistics of every linear input over the token ``windows``, each run as a fresh context
    (each starts like a prompt does: its first tokens are where the largest activations appear,
    so a calibration without window starts would miss them). ``hessian``: per window, its weight
    in the inputs' second-moment matrices (0 or None: not accumulated)."""
    from edge.runtime.chunks import ChunkRunner
    from edge.runtime.kv_cache import KVCache
    from edge.runtime.sessions import open_session, session_options

    progress = progress or Progress(enabled=False)
    pairs = [(list(w), h) for w, h in zip(windows, hessian if hessian is not None else [0.0] * len(windows)) if len(w)]
    wins, hessian = [w for w, _ in pairs], [h for _, h in pairs]
    window = -(-max(map(len, wins)) // chunk) * chunk
    with tempfile.TemporaryDirectory(prefix="edge-calib-") as tmp:
        store = WeightStore()
        model, groups = instrumented_prefill(cfg, weights, store, chunk, window)
        store.write(Path(tmp))
        onnx.save_model(model, str(Path(tmp) / "calib.onnx"))
        runner = ChunkRunner(open_session(Path(tmp) / "calib.onnx", session_options(threads)), chunk)
    emb = weights["model.embed_tokens.weight"]
    acc: dict[str, _Accumulator] = {}
    xtx: dict[str, np.ndarray] = {}
    seen = 0
    for wi, w in enumerate(wins):
        weight = np.float32(hessian[wi])
        for c, out in runner.run(emb[w][None], KVCache(cfg, window), logits="none"):
            for key in groups:
                a = out[f"calib:{key}"][:c.count]
                acc.setdefault(key, _Accumulator(a.shape[1])).update(a)
                if weight:
                    h = (a.T @ a) * weight
                    if key in xtx:
                        xtx[key] += h
                    else:
                        xtx[key] = h
        seen += len(w)
        progress.bar(wi + 1, len(wins), f"calibration ({seen} tokens)")
    return Calibration(groups, {k: a.freeze() for k, a in acc.items()}, seen, hessians=xtx)
