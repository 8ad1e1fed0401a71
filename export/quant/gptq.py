"""GPTQ rounding of the int8 weights (Frantar et al., 2022): each column's rounding error is
pushed onto the columns not yet rounded, weighted by the inverse of the input's second-moment
matrix H = sum x x^T, so the linear's output error sum ||x (W - Q)||^2 shrinks, where plain
round-to-nearest treats every weight alone.

The grid is unchanged: symmetric int8, one scale per output row = the row's absmax / 127. The
result is a float weight lying on that grid, with each row's absmax element kept at +-127 (so
quantize_weight_int8 recovers exactly these integers and scales, and the decode graph and the
split plan, which re-quantize the same tensors, read the very same bytes).
"""

from __future__ import annotations

import numpy as np

BLOCK = 128  # columns updated together (the lazy batch of the GPTQ paper)
DAMP = 0.01  # of the mean diagonal, added to H: keeps the inverse well conditioned


def gptq_int8(w: np.ndarray, h: np.ndarray, block: int = BLOCK, damp: float = DAMP) -> np.ndarray:
    """W[out, in], H[in, in] (inputs as the linear sees them) -> W on its per-row int8 grid."""
    w = np.asarray(w, np.float64)
    n, k = w.shape
    absmax = np.abs(w).max(1)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0)
    h = np.array(h, np.float64)
    dead = np.diag(h) <= 0  # channels never active: nothing to compensate with
    h[dead, dead] = 1.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor: the GPTQ update rows
    work = w.copy()
    q = np.empty_like(w)
    for i0 in range(0, k, block):
        i1 = min(i0 + block, k)
        cols, errs, hb = work[:, i0:i1].copy(), np.empty((n, i1 - i0)), hinv[i0:i1, i0:i1]
        for j in range(i1 - i0):
            qc = np.clip(np.rint(cols[:, j] / scale), -127, 127)
            q[:, i0 + j] = qc
            e = (cols[:, j] - qc * scale) / hb[j, j]
            cols[:, j:] -= np.outer(e, hb[j, j:])
            errs[:, j] = e
        work[:, i1:] -= errs @ hinv[i0:i1, i1:]
    # keep each row's grid: its absmax element back at +-127 where the updates moved it
    top = np.abs(w).argmax(1)
    rows = np.arange(n)
    q[rows, top] = np.where(absmax > 0, np.sign(w[rows, top]) * 127, 0)
    return (q * scale[:, None]).astype(np.float32)
