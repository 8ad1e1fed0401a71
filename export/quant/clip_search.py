"""Choosing a static activation quantizer from calibration histograms: the clip range, the hot
channels and (with smoothing) the migration strength, by an estimate of the output error.

Error model for y = x @ W^T with x quantized per tensor (step d = clip / 127) and W int8 per row,
errors taken as independent (the usual assumption of MSE calibrators):
    E = sum_j |W[:, j]|^2 * (rounding_j + clipping_j)  +  sum_i d_w[i]^2 / 12 * sum_j E[x_j^2]
rounding: a value below d/2 becomes 0 (error x^2), others err by d^2/12; clipping: (|x| - clip)^2
for values beyond the range, except on hot channels, whose excess the float side path restores.
Everything is computed from the per-channel |x| histograms, vectorized over a grid of clips.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge.export.quant.reference import LO_STEPS

from edge.export.quant.calibrate import ChannelStats, bin_edges

_EDGES = bin_edges()
_MID = np.concatenate([[0.0], (_EDGES[1:-1] + _EDGES[2:]) / 2])  # bin 0 (|x| tiny) counts as 0


@dataclass(frozen=True)
class Choice:
    clip: float
    hot: tuple[int, ...]  # most beneficial first
    error: float  # estimated output error (activation part), same units as ``signal``
    signal: float  # estimated output power sum_j |W[:, j]|^2 E[x_j^2]


@dataclass(frozen=True)
class Curve:
    """Best choice per number of hot channels k = 0..K for one group."""

    choices: tuple[Choice, ...]
    weight_error: float

    def nsr(self, k: int) -> float:
        c = self.choices[min(k, len(self.choices) - 1)]
        return (c.error + self.weight_error) / max(c.signal, 1e-30)


def weight_error(weights: list[np.ndarray], sumsq: np.ndarray) -> float:
    """Rounding error of per-row symmetric int8 weights, propagated through E[x^2]."""
    total = 0.0
    for w in weights:
        d = np.abs(w).max(axis=1) / 127.0
        total += float((d.astype(np.float64) ** 2).sum() / 12.0 * sumsq.sum())
    return total


def search(stats: ChannelStats, col_norm2: np.ndarray, bits: int = 8, max_hot: int = 16,
           grid: int = 160) -> tuple[Choice, ...]:
    """For k = 0..max_hot hot channels: the clip minimizing the estimated activation error."""
    qmax = 127 if bits == 8 else 127 * LO_STEPS  # 16 bits: two int8 passes (reference.ActQuant)
    n = stats.hist.astype(np.float64)  # [C, B]
    v, v2 = _MID[None, :], _MID[None, :] ** 2
    w = np.asarray(col_norm2, np.float64)
    # prefix sums (bins < b) and suffix sums (bins >= b), one extra column for "none"/"all"
    p0 = np.concatenate([np.zeros((len(n), 1)), np.cumsum(n, 1)], 1)
    p2 = np.concatenate([np.zeros((len(n), 1)), np.cumsum(n * v2, 1)], 1)
    s0, s1, s2 = (np.concatenate([np.cumsum(a[:, ::-1], 1)[:, ::-1], np.zeros((len(n), 1))], 1)
                  for a in (n, n * v, n * v2))
    top = float(stats.absmax.max())
    if top <= 0:
        return tuple(Choice(1.0, (), 0.0, 0.0) for _ in range(max_hot + 1))
    clips = top * np.geomspace(1e-3, 1.0, grid)
    bc = np.searchsorted(_MID, clips)  # first bin counted as beyond the clip
    bz = np.searchsorted(_MID, clips / qmax / 2)  # bins below it round to zero
    d2 = (clips / qmax) ** 2
    rounding = p2[:, bz] + d2[None, :] / 12 * (p0[:, bc] - p0[:, bz])  # [C, G]
    clipping = s2[:, bc] - 2 * clips[None, :] * s1[:, bc] + clips[None, :] ** 2 * s0[:, bc]
    clipping = np.maximum(clipping, 0) * w[:, None]
    base = (rounding * w[:, None]).sum(0) + clipping.sum(0)  # [G], no hot channel
    k = min(max_hot, len(w))
    order = np.argsort(-clipping, axis=0)[:k]  # [k, G] best hot candidates per clip
    gains = np.cumsum(np.take_along_axis(clipping, order, 0), 0)  # [k, G]
    signal = float((w * stats.sumsq).sum())
    out = []
    for kk in range(max_hot + 1):
        err = base - (gains[min(kk, k) - 1] if kk and k else 0.0)
        g = int(np.argmin(err))
        hot = tuple(int(j) for j in order[:min(kk, k), g] if clipping[j, g] > 0)
        out.append(Choice(float(clips[g]), hot, float(err[g]), signal))
    return tuple(out)
