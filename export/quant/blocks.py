"""Block-quantized weights for onnxruntime's MatMulNBits / GatherBlockQuantized (the CPU plan),
numpy only, and GGUF's own block formats, so a GGUF source's weights go into the bundle as they are.

MatMulNBits computes x @ W^T with W[n, k] = (q[n, k] - zp[n, b]) * scale[n, b], b = k // block;
its B input is [N, n_blocks, block * bits / 8] uint8 (4 bits: element 2i in the low nibble).
GGUF blocks (32 weights each): Q4_1 = fp16 d, fp16 m, 16 nibble bytes (elements 0..15 low,
16..31 high), w = d * q + m; Q8_0 = fp16 d, 32 int8, w = d * q.
- Q8_0 is MatMulNBits 8-bit exactly: q + 128 with zero point 128, scale d.
- Q4_1 is MatMulNBits 4-bit plus a per-block offset: w = d * (q - z) + r with the integer zero point
  z = round(-m / d) and r = m + d * z, so x @ W^T = MatMulNBits(q, d, z) + blocksum(x) @ r^T.
  z keeps q - z near 0 (as a symmetric grid would): the kernel quantizes x to int8 per block
  (accuracy level 4), and its error is multiplied by q - z, not by q. The blocksum term costs as
  much as the 4-bit GEMM itself at a decode step as a float MatMul of its own (fp32 r: 13 MB per
  token for SmolLM2, four more nodes per linear), so by default r goes into the same MatMulNBits as
  extra input rows (``offsets_as_rows``; exact float offsets: the int4exact CPU weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BLOCK = 32  # GGUF's block; also every CPU-plan block-quantized weight's


@dataclass(frozen=True)
class Blocks:
    """W[out, in] = scale * (q - zero) + offset per block of ``block`` input values."""

    q: np.ndarray       # uint8 [out, n_blocks, block], 0 .. 2^bits - 1
    scale: np.ndarray   # float32 [out, n_blocks]
    zero: np.ndarray    # uint8 [out, n_blocks]
    offset: np.ndarray | None  # float32 [out, n_blocks] or None (no residual offset)
    bits: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.q.shape[0], self.q.shape[1] * self.q.shape[2]

    def dequantize(self) -> np.ndarray:
        w = (self.q.astype(np.float32) - self.zero[..., None]) * self.scale[..., None]
        if self.offset is not None:
            w = w + self.offset[..., None]
        return w.reshape(self.shape).astype(np.float32)

    def rows(self, index: np.ndarray) -> "Blocks":
        """The same blocks with output rows reordered (llama.cpp's q/k row permutation moves whole rows)."""
        pick = lambda a: None if a is None else a[index]  # noqa: E731
        return Blocks(self.q[index], self.scale[index], self.zero[index], pick(self.offset), self.bits)

    @staticmethod
    def stack(parts: "list[Blocks | None]") -> "Blocks | None":
        """Output rows stacked (q|k|v, gate|up): one MatMulNBits for a packed projection; None when
        a part has no blocks or the parts differ in form (the caller rounds the float weight)."""
        if any(p is None for p in parts) or len({(p.bits, p.offset is None) for p in parts}) != 1:
            return None
        cat = lambda f: np.concatenate([getattr(p, f) for p in parts])  # noqa: E731
        return Blocks(cat("q"), cat("scale"), cat("zero"), None if parts[0].offset is None else cat("offset"),
                      parts[0].bits)

    # -- onnxruntime layouts
    def matmulnbits_b(self) -> np.ndarray:
        if self.bits == 8:
            return np.ascontiguousarray(self.q)
        return np.ascontiguousarray(self.q[..., 0::2] | (self.q[..., 1::2] << 4))

    def matmulnbits_zero_points(self) -> np.ndarray:
        if self.bits == 8:
            return np.ascontiguousarray(self.zero.reshape(-1))
        z = self.zero if self.zero.shape[1] % 2 == 0 else np.pad(self.zero, ((0, 0), (0, 1)))
        return np.ascontiguousarray((z[:, 0::2] | (z[:, 1::2] << 4)).reshape(-1))


def offsets_as_rows(b: Blocks) -> tuple[Blocks, int]:
    """Q4_1's residual offsets moved into the same 4-bit MatMulNBits: x's block means appended to
    its input ([x, mean_b(x)], K + n_blocks values) meet extra weight rows 32 * r[n, b], themselves
    rounded to asymmetric 4-bit blocks (error at most 1/30 of the row's offset range, i.e. of one
    source step d). The source's codes, scales and zero points stay exact. Returns the blocks
    (K padded to whole blocks, the padding at the zero point) and the augmented input width."""
    k, nb = b.shape[1], b.q.shape[1]
    # the padding is 0, which quantize_blocks keeps in range: it rounds to the zero point exactly
    rows = quantize_blocks(np.pad(b.offset * BLOCK, ((0, 0), (0, (-nb) % BLOCK))), 4)
    return (Blocks(np.concatenate([b.q, rows.q], 1), np.concatenate([b.scale, rows.scale], 1),
                   np.concatenate([b.zero, rows.zero], 1), None, 4), k + nb)


# ------------------------------------------------------------------ from float weights


def quantize_blocks(w: np.ndarray, bits: int, block: int = BLOCK) -> Blocks:
    """Asymmetric blocks over each block's [min, max] (0 kept inside the range, so zero weights
    stay exact), round to nearest: what a float source gets."""
    if w.shape[1] % block:
        raise ValueError(f"{w.shape[1]} input features are not a multiple of the block size {block}")
    levels = (1 << bits) - 1
    b = w.reshape(w.shape[0], -1, block).astype(np.float64)
    lo, hi = np.minimum(b.min(-1), 0), np.maximum(b.max(-1), 0)
    scale = np.where(hi > lo, (hi - lo) / levels, 1.0)
    zero = np.clip(np.rint(-lo / scale), 0, levels)
    q = np.clip(np.rint(b / scale[..., None]) + zero[..., None], 0, levels)
    return Blocks(q.astype(np.uint8), scale.astype(np.float32), zero.astype(np.uint8), None, bits)


def at_width(w: np.ndarray, source: Blocks | None, bits: int) -> Blocks:
    """The source's own blocks where they have this width (a GGUF Q4_1 / Q8_0 tensor), else ``w``
    rounded to asymmetric blocks: what every block-quantized linear and table is built from."""
    return source if source is not None and source.bits == bits else quantize_blocks(w, bits)


# ------------------------------------------------------------------ GGUF block formats


def _fp16(raw: np.ndarray, at: int) -> np.ndarray:
    return np.ascontiguousarray(raw[..., at:at + 2]).view(np.float16)[..., 0].astype(np.float32)


def from_q4_1(raw: np.ndarray, out_features: int) -> Blocks:
    blk = np.asarray(raw, np.uint8).reshape(out_features, -1, 20)
    d, m, qs = _fp16(blk, 0), _fp16(blk, 2), blk[..., 4:]
    q = np.concatenate([qs & 0x0F, qs >> 4], -1).astype(np.uint8)
    safe = np.where(d > 0, d, 1).astype(np.float64)
    z = np.where(d > 0, np.clip(np.rint(-m / safe), 0, 15), 0)
    offset = (m.astype(np.float64) + d.astype(np.float64) * z).astype(np.float32)
    return Blocks(q, d, z.astype(np.uint8), offset, 4)


def from_q8_0(raw: np.ndarray, out_features: int) -> Blocks:
    blk = np.asarray(raw, np.uint8).reshape(out_features, -1, 34)
    q = (np.ascontiguousarray(blk[..., 2:]).view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    return Blocks(q, _fp16(blk, 0), np.full(q.shape[:2], 128, np.uint8), None, 8)


GGUF_FORMATS = {"Q4_1": from_q4_1, "Q8_0": from_q8_0}  # GGMLQuantizationType name -> reader
