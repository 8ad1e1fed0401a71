"""The quantization plan: from calibration statistics to a decision per linear-input group
(activation bits and scale, hot channels, side path kept or not, smoothing strength).

A group is the set of linears fed by one tensor (q/k/v, gate/up, o, down, the output projection);
they share one static activation quantizer. Choices minimize the estimated output error
(clip_search); the hot-channel budget is spread over all groups where it lowers that error most.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from edge.plans import CPU_LINEARS

from edge.export.quant.reference import ActQuant, LinearQuant

from edge.export.quant import smooth
from edge.export.quant.calibrate import Calibration
from edge.export.quant.clip_search import Curve, search, weight_error
from edge.export.quant.gptq import gptq_int8

PREFILL_SCHEMES = ("w8a8", "w8a8-nooutliers", "fp32")
DECODE_SCHEMES = ("int8", "int4", "fp32")
# strengths above 0.75 win in a few 8-bit groups (gate/up); the grid's measured effect: docs/quantization.md
AUTO_ALPHAS = (0.0, 0.25, 0.4, 0.5, 0.6, 0.75, 0.85, 0.95, 1.0)
LINEAR_KINDS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ROUNDINGS = ("gptq", "nearest")
AUTO_MAX_HOT = 16  # per group, in auto mode (the global budget is the real limit)


@dataclass(frozen=True)
class QuantOptions:
    prefill: str = "w8a8"
    decode: str = "int8"
    outliers: str = "auto"  # "auto" | "off" | a number K (at most K hot channels per group)
    outlier_layers: float = 1.0  # fraction of groups (most important first) that keep the side path
    hot_budget: float = 0.005  # auto: hot channels <= this fraction of all linear input channels
    smooth: str = "auto"  # "auto" (alpha searched per group) | "off" | an alpha in [0, 1]
    # linear inputs that get 16-bit activations (two int8 passes), by kind, or ("auto",): the groups
    # where a second pass lowers the estimated noise-to-signal ratio most per multiply-add, until
    # they hold ``act16_budget`` of the prefill linears' multiply-adds. auto is faster but not the
    # default: its estimate underrates the q/k/v inputs, whose errors reach every attention score
    # (measured trade-offs: docs/quantization.md, "Which inputs get 16-bit activations")
    act16: tuple[str, ...] = ("q_proj", "o_proj", "down_proj")
    act16_budget: float = 0.25
    float_groups: int = 0  # keep the N groups with the largest estimated error in float
    block: int = 32  # int4 block size (decode)
    # int8 weight rounding: "gptq" (error feedback through the inputs' second moments, from the
    # calibration; measured in docs/quantization.md) or "nearest"
    rounding: str = "gptq"
    cpu: str = "int8dyn"  # the CPU plan's linears: edge.plans.CPU_LINEARS (export/graph/cpu_decoder.CPU_SCHEMES)

    def __post_init__(self) -> None:
        if self.prefill not in PREFILL_SCHEMES:
            raise ValueError(f"--quant must be one of {', '.join(PREFILL_SCHEMES)}, got {self.prefill!r}")
        if self.cpu not in CPU_LINEARS:
            raise ValueError(f"--cpu-weights must be one of {', '.join(CPU_LINEARS)}, got {self.cpu!r}")
        if self.decode not in DECODE_SCHEMES:
            raise ValueError(f"--decode-weights must be one of {', '.join(DECODE_SCHEMES)}, got {self.decode!r}")
        if self.outliers not in ("auto", "off") and not (self.outliers.isdigit() and int(self.outliers) >= 0):
            raise ValueError(f"--outliers must be auto, off or a count >= 0, got {self.outliers!r}")
        if not 0.0 <= self.hot_budget <= 1.0:
            raise ValueError(f"--hot-budget must be a fraction in [0, 1], got {self.hot_budget}")
        if not 0.0 <= self.outlier_layers <= 1.0:
            raise ValueError(f"--outlier-layers must be a fraction in [0, 1], got {self.outlier_layers}")
        if self.smooth not in ("auto", "off"):
            try:
                ok = 0.0 <= float(self.smooth) <= 1.0
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"--smooth must be auto, off or an alpha in [0, 1], got {self.smooth!r}")
        unknown = set(self.act16) - set(LINEAR_KINDS)
        if self.act16_auto:
            if not 0.0 <= self.act16_budget <= 1.0:
                raise ValueError(f"--act16-budget must be a fraction in [0, 1], got {self.act16_budget}")
        elif unknown:
            raise ValueError(f"--act16: unknown linear kind(s) {sorted(unknown)}; choose from {', '.join(LINEAR_KINDS)}")
        if self.block < 16 or self.block & (self.block - 1):
            raise ValueError(f"--block must be a power of two >= 16, got {self.block}")
        if self.rounding not in ROUNDINGS:
            raise ValueError(f"--weight-rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.float_groups < 0:
            raise ValueError(f"--float-linears must be >= 0, got {self.float_groups}")

    @property
    def act16_auto(self) -> bool:
        return self.act16 == ("auto",)

    @property
    def quantized(self) -> bool:
        return self.prefill != "fp32"

    def alphas(self) -> tuple[float, ...]:
        return {"auto": AUTO_ALPHAS, "off": (0.0,)}.get(self.smooth) or (float(self.smooth),)

    def max_hot(self) -> int:
        if self.prefill == "w8a8-nooutliers" or self.outliers == "off":
            return 0
        return AUTO_MAX_HOT if self.outliers == "auto" else int(self.outliers)


@dataclass(frozen=True)
class GroupPlan:
    key: str  # the tensor feeding the group
    linears: tuple[str, ...]
    bits: int | None  # 8, 16, or None = float
    scale: float
    hot: tuple[int, ...]
    side_path: bool
    alpha: float  # smoothing strength (0 = none)
    importance: float  # largest hot-channel value / clip (the paper's pruning criterion)
    nsr: float  # estimated output noise-to-signal ratio
    smooth: np.ndarray | None = field(default=None, repr=False, compare=False)  # s, when alpha > 0

    def linear_quant(self) -> LinearQuant:
        if self.bits is None:
            return LinearQuant("fp32")
        return LinearQuant("int8", ActQuant(self.scale, self.bits), self.hot, self.side_path)

    def record(self) -> dict:
        return {"linears": list(self.linears), "bits": self.bits, "scale": self.scale, "hot": list(self.hot),
                "side_path": self.side_path and bool(self.hot) and self.bits is not None, "smooth_alpha": self.alpha,
                "importance": round(self.importance, 3), "estimated_nsr": float(f"{self.nsr:.3g}")}


@dataclass(frozen=True)
class QuantPlan:
    groups: tuple[GroupPlan, ...]
    weights: Mapping[str, np.ndarray] = field(repr=False)  # float weights after smoothing
    channels: int  # all linear input channels (one per group input)

    def linears(self) -> dict[str, LinearQuant]:
        return {name: g.linear_quant() for g in self.groups for name in g.linears}

    def cache_consistent(self, weights: Mapping[str, np.ndarray], head_dim: int) -> dict[str, np.ndarray]:
        """``weights`` (e.g. the originals) with just the migrations that change the KV cache's
        contents: what a graph sharing the prefill's cache must compute with."""
        out = dict(weights)
        for g in self.groups:
            if g.smooth is not None and smooth.changes_cache(g.linears[0]):
                out = smooth.apply(out, g.linears, g.smooth, head_dim)
        return out

    @property
    def hot_channels(self) -> int:
        return sum(len(g.hot) for g in self.groups if g.side_path and g.bits is not None)

    def summary(self) -> str:
        q = [g for g in self.groups if g.bits is not None]
        kept = sum(1 for g in q if g.side_path and g.hot)
        return (f"{self.hot_channels} hot channels in float side paths = {100 * self.hot_channels / self.channels:.2f}% "
                f"of {self.channels} linear input channels; side path kept in {kept}/{len(q)} groups; "
                f"{sum(1 for g in q if g.bits == 16)} groups with 16-bit activations, "
                f"{len(self.groups) - len(q)} in float")

    def record(self) -> dict:
        return {"hot_channels": self.hot_channels, "input_channels": self.channels,
                "hot_fraction": round(self.hot_channels / self.channels, 6),
                "groups": {g.key: g.record() for g in self.groups}}


def _consumers(weights: Mapping[str, np.ndarray], linears: tuple[str, ...]) -> list[np.ndarray]:
    return [weights[n + ".weight"] for n in linears]


def _smoothing(cal: Calibration, key: str, weights: Mapping[str, np.ndarray], alpha: float,
               head_dim: int) -> np.ndarray:
    """The group's per-channel migration scales s for ``alpha`` (ones for 0)."""
    stats = cal.stats[key]
    if not alpha:
        return np.ones_like(stats.absmax)
    w_absmax = np.max([np.abs(w).max(0) for w in _consumers(weights, cal.groups[key])], axis=0)
    return smooth.scales(cal.groups[key][0], stats.absmax, w_absmax, alpha, weights, head_dim)


def _curves(cal: Calibration, key: str, weights: Mapping[str, np.ndarray], opts: QuantOptions,
            bits: int, head_dim: int) -> dict[float, Curve]:
    """Error curve (per number of hot channels) for each candidate smoothing strength."""
    linears = cal.groups[key]
    ws = _consumers(weights, linears)
    col2 = np.sum([(w.astype(np.float64) ** 2).sum(0) for w in ws], axis=0)
    out = {}
    for a in opts.alphas() if smooth.producer(linears[0]) else (0.0,):
        s = _smoothing(cal, key, weights, a, head_dim)
        st = cal.stats[key].scaled(s) if a else cal.stats[key]
        werr = weight_error([w * s[None, :] for w in ws], st.sumsq)
        out[a] = Curve(search(st, col2 * s.astype(np.float64) ** 2, bits, opts.max_hot()), werr)
    return out


def _allocate(curves: dict[str, dict[float, Curve]], opts: QuantOptions, channels: int) -> dict[str, int]:
    """Hot channels per group: K each, or (auto) a global budget spent greedily where the
    estimated noise-to-signal ratio drops most."""
    best = {k: [min(c.nsr(n) for c in cs.values()) for n in range(opts.max_hot() + 1)] for k, cs in curves.items()}
    if opts.outliers != "auto" or opts.max_hot() == 0:
        return {k: opts.max_hot() for k in curves}
    budget = int(opts.hot_budget * channels)
    alloc = {k: 0 for k in curves}
    heap = [(-(b[0] - b[1]), k) for k, b in best.items() if len(b) > 1]
    heapq.heapify(heap)
    while heap and budget > 0:
        gain, k = heapq.heappop(heap)
        if -gain <= 0:
            break
        alloc[k] += 1
        budget -= 1
        n, b = alloc[k], best[k]
        if n + 1 < len(b):
            heapq.heappush(heap, (-(b[n] - b[n + 1]), k))
    return alloc


def _group_macs(cal: Calibration, key: str, weights: Mapping[str, np.ndarray]) -> int:
    """Multiply-adds per prefill token of the group's linears."""
    return sum(int(weights[n + ".weight"].size) for n in cal.groups[key])


def _auto_bits(cal: Calibration, weights: Mapping[str, np.ndarray], opts: QuantOptions,
               head_dim: int) -> tuple[dict[str, int], dict[str, dict[float, Curve]]]:
    """--act16 auto: 16 bits for the groups whose second pass lowers the estimated noise-to-signal
    ratio most per multiply-add, while their multiply-adds stay within ``act16_budget`` of all."""
    keys = list(cal.groups)
    macs = {k: _group_macs(cal, k, weights) for k in keys}
    c8 = {k: _curves(cal, k, weights, opts, 8, head_dim) for k in keys}
    c16 = {k: _curves(cal, k, weights, opts, 16, head_dim) for k in keys if macs[k]}  # candidates only
    alloc = _allocate(c8, opts, cal.channels)  # the hot channels 8 bits everywhere would get
    best = lambda cs, k: min(c.nsr(alloc[k]) for c in cs[k].values())  # noqa: E731
    left = opts.act16_budget * sum(macs.values())
    bits = dict.fromkeys(keys, 8)
    for k in sorted(c16, key=lambda k: -(best(c8, k) - best(c16, k)) / macs[k]):
        if macs[k] <= left:
            bits[k], left = 16, left - macs[k]
    return bits, {k: (c16 if bits[k] == 16 else c8)[k] for k in keys}


def plan_quantization(cal: Calibration, weights: Mapping[str, np.ndarray], opts: QuantOptions,
                      head_dim: int) -> QuantPlan:
    keys = list(cal.groups)
    channels = cal.channels
    if opts.act16_auto:
        bits, curves = _auto_bits(cal, weights, opts, head_dim)
    else:
        bits = {k: 16 if any(n.rsplit(".", 1)[-1] in opts.act16 for n in cal.groups[k]) else 8 for k in keys}
        curves = {k: _curves(cal, k, weights, opts, bits[k], head_dim) for k in keys}
    alloc = _allocate(curves, opts, channels)
    chosen, importance = {}, {}
    for k in keys:
        a = min(curves[k], key=lambda al: curves[k][al].nsr(alloc[k]))
        c = curves[k][a].choices[alloc[k]]
        chosen[k] = (a, c, curves[k][a].nsr(alloc[k]))
        hot = list(c.hot)  # importance in the units the clip is in (after smoothing)
        importance[k] = float((cal.stats[k].absmax[hot] / _smoothing(cal, k, weights, a, head_dim)[hot]).max()
                              / c.clip) if hot else 0.0
    # --outlier-layers: the least important side paths go; those groups re-choose with none
    ranked = sorted((k for k in keys if chosen[k][1].hot), key=lambda k: -importance[k])
    dropped = set(ranked[round(opts.outlier_layers * len(ranked)):])
    floated = set(sorted(keys, key=lambda k: -chosen[k][2])[:opts.float_groups])
    groups, new_weights = [], dict(weights)
    for k in keys:
        a, c, nsr = chosen[k]
        clip, side = c.clip, True
        if k in dropped:
            a = min(curves[k], key=lambda al: curves[k][al].nsr(0))
            clip, side, nsr = curves[k][a].choices[0].clip, False, curves[k][a].nsr(0)
        s = _smoothing(cal, k, weights, a, head_dim) if a and k not in floated else None
        if s is not None:
            new_weights = smooth.apply(new_weights, cal.groups[k], s, head_dim)
        act = ActQuant.for_clip(clip, bits[k])
        groups.append(GroupPlan(k, cal.groups[k], None if k in floated else bits[k], act.scale, c.hot, side,
                                a if s is not None else 0.0, importance[k], nsr, s))
    if opts.rounding == "gptq" and cal.hessians:  # after every migration: they change producers' rows too
        new_weights = _gptq_round(groups, cal, new_weights)
    return QuantPlan(tuple(groups), new_weights, channels)


def _gptq_round(groups: list[GroupPlan], cal: Calibration, weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The int8 linears' weights, GPTQ-rounded onto their grid (export/quant/gptq.py) with the
    second moments of the inputs they see (x / s after smoothing: H / (s s^T))."""
    out = dict(weights)
    for g in groups:
        h = cal.hessians.get(g.key)
        if g.bits is None or h is None:
            continue
        if g.smooth is not None:
            inv = 1.0 / g.smooth.astype(np.float64)
            h = h * inv[:, None] * inv[None, :]
        for name in g.linears:
            out[name + ".weight"] = gptq_int8(out[name + ".weight"], h)
    return out
