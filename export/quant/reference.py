"""Quantization math, numpy only: the reference every emitted graph is tested against.

Conventions follow ONNX exactly, so a graph and its reference agree bit for bit where ONNX is exact:
- QuantizeLinear: q = saturate(round_half_to_even(x / scale) + zero_point)
- DequantizeLinear: x = (q - zero_point) * scale
Activations are static, per tensor, symmetric, stored as uint8 with zero point 128: the form NPU
execution providers (QNN) accept and onnxruntime fuses into its int8 GEMM on x86.
Weights are int8, symmetric, one scale per output channel (HF layout W[out, in]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# ------------------------------------------------------------------ QuantizeLinear / DequantizeLinear

_RANGE = {np.dtype(np.uint8): (0, 255), np.dtype(np.int8): (-128, 127),
          np.dtype(np.uint16): (0, 65535), np.dtype(np.int16): (-32768, 32767)}


def _along(scale, zero_point, ndim: int, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point as arrays, a 1-D pair reshaped to broadcast along ``axis`` (ONNX's per-axis form)."""
    scale, zp = np.asarray(scale, np.float32), np.asarray(zero_point, np.int64)
    if axis is not None and scale.ndim == 1:
        shape = [1] * ndim
        shape[axis] = -1
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


def quantize(x: np.ndarray, scale, zero_point, dtype, axis: int | None = None) -> np.ndarray:
    """ONNX QuantizeLinear: per tensor (scalar scale) or per axis (1-D scale along ``axis``)."""
    dtype = np.dtype(dtype)
    lo, hi = _RANGE[dtype]
    scale, zp = _along(scale, zero_point, x.ndim, axis)
    q = np.rint(np.asarray(x, np.float32) / scale)  # np.rint rounds half to even, as ONNX does
    return np.clip(q + zp, lo, hi).astype(dtype)


def dequantize(q: np.ndarray, scale, zero_point, axis: int | None = None) -> np.ndarray:
    scale, zp = _along(scale, zero_point, q.ndim, axis)
    return ((q.astype(np.int64) - zp).astype(np.float32) * scale).astype(np.float32)


# ------------------------------------------------------------------ activations


LO_STEPS = 254  # 16-bit form: the second pass's step is the first's / 254, so its +-127 steps span +-s/2


@dataclass(frozen=True)
class ActQuant:
    """A static per-tensor activation quantizer: symmetric range, uint8 storage (zero point 128).

    bits 8: one QuantizeLinear/DequantizeLinear pair, step ``scale``.
    bits 16: two int8 passes, hi = QDQ(x, scale) and lo = QDQ(x - hi, scale / 254); the linear runs
    on both (two int8 GEMMs) and adds them. Steps of scale / 254 (~15 bits) from int8 kernels alone:
    exact on every int8 NPU and on onnxruntime's CPU EP, where a uint16 QDQ input gets no int8 GEMM
    (it turns into MatMulNBits with dynamic per-block int8 activations, which big outliers spoil)."""

    scale: float
    bits: int = 8

    def __post_init__(self) -> None:
        if self.bits not in (8, 16):
            raise ValueError(f"activation bits must be 8 or 16, got {self.bits}")
        if not (np.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"activation scale must be a positive number, got {self.scale}")

    @classmethod
    def for_clip(cls, clip: float, bits: int = 8) -> ActQuant:
        """The quantizer whose first pass ends (127 steps) at ``clip``."""
        return cls(float(np.float32(clip / 127)), bits)

    dtype = np.dtype(np.uint8)
    zero_point = 128

    @property
    def lo_scale(self) -> float:
        return float(np.float32(np.float32(self.scale) / np.float32(LO_STEPS)))

    @property
    def bounds(self) -> tuple[float, float]:
        """The range the quantizer reproduces; beyond it values saturate (the side path's clip)."""
        s = np.float32(self.scale) + (np.float32(self.lo_scale) if self.bits == 16 else np.float32(0))
        return float(np.float32(-128) * s), float(np.float32(127) * s)

    def quantize(self, x: np.ndarray) -> np.ndarray:
        """The first (8-bit: only) pass's uint8 codes."""
        return quantize(x, self.scale, self.zero_point, self.dtype)

    def fake(self, x: np.ndarray) -> np.ndarray:
        """What the graph's QuantizeLinear/DequantizeLinear passes hand the linear (hi + lo)."""
        return sum(self.passes(x))  # type: ignore[return-value]

    def passes(self, x: np.ndarray) -> list[np.ndarray]:
        x = np.asarray(x, np.float32)
        hi = dequantize(self.quantize(x), self.scale, self.zero_point)
        if self.bits == 8:
            return [hi]
        lo = dequantize(quantize(x - hi, self.lo_scale, self.zero_point, self.dtype), self.lo_scale, self.zero_point)
        return [hi, lo]


# ------------------------------------------------------------------ int8 weights


def quantize_weight_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W[out, in] -> (int8 q[out, in] in [-127, 127], float32 scale[out]); w ~= q * scale[:, None]."""
    absmax = np.abs(w).max(axis=1).astype(np.float32)
    scale = np.where(absmax > 0, absmax / np.float32(127), np.float32(1)).astype(np.float32)
    return quantize(w, scale, np.zeros_like(scale, np.int64), np.int8, axis=0), scale


def dequantize_weight_int8(q: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return (q.astype(np.float32) * scale[:, None]).astype(np.float32)


# ------------------------------------------------------------------ outlier split


def outlier_residual(x: np.ndarray, act: ActQuant, hot: np.ndarray) -> np.ndarray:
    """What the int8 path loses on the hot channels: x - clip(x) there ([tokens, len(hot)])."""
    lo, hi = act.bounds
    xh = x[:, hot].astype(np.float32)
    return (xh - np.clip(xh, np.float32(lo), np.float32(hi))).astype(np.float32)


# ------------------------------------------------------------------ one quantized linear


@dataclass(frozen=True)
class LinearQuant:
    """How one linear runs. ``act`` None = float activations (weight-only)."""

    weight: str = "int8"  # "int8" | "fp32"
    act: ActQuant | None = None
    hot: tuple[int, ...] = ()  # input channels whose clipped-off part runs in float
    side_path: bool = True  # False: the hot channels are recorded but simply clipped

    def __post_init__(self) -> None:
        if self.weight not in ("int8", "fp32"):
            raise ValueError(f"weight scheme must be int8 or fp32, got {self.weight!r}")
        if self.weight == "fp32" and self.act is not None:
            raise ValueError("float weights run with float activations (act=None)")

    @property
    def active_hot(self) -> tuple[int, ...]:
        return self.hot if (self.side_path and self.act is not None) else ()


def fake_quant_linear(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, lq: LinearQuant) -> np.ndarray:
    """y = Q(x) @ Q(W)^T (+ b) + side path, computed the way the emitted graph computes it."""
    x = np.asarray(x, np.float32)
    wq = w if lq.weight == "fp32" else dequantize_weight_int8(*quantize_weight_int8(w))
    y = x @ wq.T if lq.act is None else sum(p @ wq.T for p in lq.act.passes(x))  # one GEMM per pass
    hot = np.asarray(lq.active_hot, np.int64)
    if hot.size:
        y = y + outlier_residual(x, lq.act, hot) @ w[:, hot].T  # type: ignore[arg-type]
    if b is not None:
        y = y + b
    return y.astype(np.float32)


# ------------------------------------------------------------------ SmoothQuant


def smooth_scales(act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float,
                  floor: float = 1e-5) -> np.ndarray:
    """SmoothQuant migration s_j = a_j^alpha / w_j^(1 - alpha): x / s and W * s leave x @ W^T as is.
    act_absmax: per input channel of x; weight_absmax: per input channel over all consumers."""
    a = np.maximum(np.asarray(act_absmax, np.float64), floor)
    w = np.maximum(np.asarray(weight_absmax, np.float64), floor)
    s = a ** alpha / w ** (1 - alpha)
    return (s / np.exp(np.mean(np.log(s)))).astype(np.float32)  # geometric mean 1: keeps ranges tame


# ------------------------------------------------------------------ int4 blocks (MatMulNBits layout)


@dataclass(frozen=True)
class Int4Blocks:
    """W[out, in] as blocks of ``block`` input values: w = scale * q + offset, q in 0..15.

    This is GGUF Q4_1's form (d * q + m), so Q4_1 weights re-quantize exactly. ``packed`` is
    MatMulNBits' B: [out, n_blocks, block/2] uint8, low nibble first; ``scale``/``offset``
    are [out, n_blocks]; ``in_features`` may be short of n_blocks * block (zero padding)."""

    packed: np.ndarray
    scale: np.ndarray
    offset: np.ndarray
    block: int
    in_features: int = field(default=0)


def quantize_int4_blocks(w: np.ndarray, block: int = 32) -> Int4Blocks:
    if block < 16 or block & (block - 1):
        raise ValueError(f"int4 block size must be a power of two >= 16, got {block}")
    out_f, in_f = w.shape
    nb = -(-in_f // block)
    wp = np.zeros((out_f, nb * block), np.float32)
    wp[:, :in_f] = w
    wb = wp.reshape(out_f, nb, block)
    if in_f % block:  # padding must not widen the last block's range
        last = wb[:, -1, : in_f - (nb - 1) * block]
        wb[:, -1, in_f - (nb - 1) * block:] = last[:, :1]
    lo, hi = wb.min(-1), wb.max(-1)
    scale = ((hi - lo) / np.float32(15)).astype(np.float32)
    safe = np.where(scale > 0, scale, np.float32(1))
    q = np.clip(np.rint((wb - lo[..., None]) / safe[..., None]), 0, 15).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    return Int4Blocks(packed, scale, lo.astype(np.float32), block, in_f)


def dequantize_int4_blocks(b: Int4Blocks) -> np.ndarray:
    q = np.empty(b.packed.shape[:2] + (b.block,), np.uint8)
    q[..., 0::2] = b.packed & 0x0F
    q[..., 1::2] = b.packed >> 4
    w = q.astype(np.float32) * b.scale[..., None] + b.offset[..., None]
    return w.reshape(w.shape[0], -1)[:, : b.in_features].astype(np.float32)
