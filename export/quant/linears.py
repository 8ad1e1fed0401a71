"""Quantized linear emitters (see decoder.LinearEmitter) and the int8 token table.

Forms, each checked against onnxruntime 1.32 on x86 (AVX-512 VNNI). Every int8 weight is stored
once, transposed to the MatMul layout W^T[in, out] with one scale per output column, and read as
DQ(W^T, axis=1). (The HF layout read through a Transpose node made onnxruntime's constant folding
build a float copy of each weight at load: W8A8 SmolLM2 peaked near 2 GB.)
- W8A8 static (prefill): Q/DQ(x, uint8 zp 128) -> MatMul <- DQ(int8 W^T); onnxruntime fuses it
  into MatMulIntegerToFloat (~3x faster than fp32 at 128x576x1536). 16-bit activations are two
  int8 passes (hi + lo residual) on the same weights.
- shadow outliers: Gather(x, hot) - Clip(., lo, hi) -> small float MatMul -> Add.
- int8 weight-only (decode): the same tensors with float x; onnxruntime turns it into an 8-bit
  MatMulNBits (~4x faster than fp32 for one token).
- int4 (decode): MatMulNBits(q, scale, zero point 0) + a block-sum correction for the offset,
  i.e. GGUF Q4_1's w = d*q + m exactly (MatMulNBits' float zero points run 20x slower).
- a tied token table is the same int8 tensor: the lookup gathers columns and their scales.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from edge.export.quant.reference import ActQuant, LinearQuant, quantize_int4_blocks, quantize_weight_int8

from edge.export.graph.builder import GraphBuilder, WeightStore
from edge.export.graph.decoder import LinearEmitter, float_linear

MS = "com.microsoft"


class ScopedStore:
    """A graph's view of the shared WeightStore: a tensor equal to the stored one of the same name
    is shared; a different one (a smoothed norm weight, say) is stored as ``scope/name``."""

    def __init__(self, base: WeightStore, scope: str):
        self.base, self.scope, self._keys = base, scope, {}

    def add(self, name: str, array: np.ndarray) -> str:
        if name not in self._keys:
            old = self.base.get(name)
            same = old is None or old is array or (old.shape == array.shape and old.dtype == array.dtype
                                                   and np.array_equal(old, array))
            self._keys[name] = self.base.add(name if same else f"{self.scope}/{name}", array)
        return name

    def alias(self, name: str, of: str, shape: tuple[int, ...] | None = None) -> str:
        target = self._keys[of]
        if name not in self._keys:
            self._keys[name] = self.base.alias(name if target == of else f"{self.scope}/{name}", target, shape)
        return name

    def tensor_proto(self, name: str):
        t = self.base.tensor_proto(self._keys[name])
        t.name = name
        return t


def _emitted(g: GraphBuilder, node_name: str) -> bool:
    return any(n.name == node_name for n in reversed(g.nodes))


def act_qdq(g: GraphBuilder, x: str, aq: ActQuant) -> list[str]:
    """The quantized passes of x (8-bit: one; 16-bit: hi and lo, see reference.ActQuant), emitted
    once per graph whoever consumes them (q/k/v share one)."""
    tag = f"{x}/a{aq.bits}"
    if not _emitted(g, tag + "/hi"):
        z = g.const("act_zero_point", np.array(aq.zero_point, aq.dtype))
        s = g.const(tag + "/scale", np.array(aq.scale, np.float32))
        q = g.op("QuantizeLinear", [x, s, z], name=tag + "/q")
        g.op("DequantizeLinear", [q, s, z], name=tag + "/hi")
        if aq.bits == 16:  # the residual reads its own DQ of the same codes (one consumer per DQ)
            r = g.op("Sub", [x, g.op("DequantizeLinear", [q, s, z], name=tag + "/hi_for_residual")],
                     name=tag + "/residual")
            s2 = g.const(tag + "/lo_scale", np.array(aq.lo_scale, np.float32))
            g.op("DequantizeLinear", [g.op("QuantizeLinear", [r, s2, z], name=tag + "/q_lo"), s2, z], name=tag + "/lo")
    return [tag + "/hi"] + ([tag + "/lo"] if aq.bits == 16 else [])


def int8_rows(g: GraphBuilder, name: str, weight: np.ndarray) -> tuple[str, str]:
    """W[out, in] -> stored int8 W^T[in, out] and its per-output scales [out]."""
    q, scale = quantize_weight_int8(weight)
    return g.weight(name + ".w8", np.ascontiguousarray(q.T)), g.weight(name + ".w8_scale", scale)


def int8_weight(g: GraphBuilder, name: str, rows: tuple[str, str], n_out: int, tag: str = "") -> str:
    """[in, out] float view of the stored int8 W^T: DQ(axis=1). One per consumer MatMul (``tag``):
    onnxruntime fuses a Q/DQ group only where each DQ feeds one node."""
    zero = g.weight(name + ".w8_zero", np.zeros(n_out, np.int8))  # the QDQ/MatMulNBits fusions want it
    return g.op("DequantizeLinear", [*rows, zero], name=f"{name}/w_dq{tag}", axis=1)


def outlier_side_path(g: GraphBuilder, x: str, name: str, weight: np.ndarray, lq: LinearQuant) -> str:
    """(x - clip(x)) on the hot channels @ W[:, hot]^T, in float; the Gather/Clip is shared."""
    hot = np.asarray(lq.active_hot, np.int64)
    lo, hi = lq.act.bounds  # type: ignore[union-attr]
    tag = f"{x}/hot{len(hot)}_{lq.act.bits}"  # type: ignore[union-attr]
    if not _emitted(g, tag + "/residual"):
        xh = g.op("Gather", [x, g.const(tag + "/channels", hot)], name=tag + "/gather", axis=1)
        clipped = g.op("Clip", [xh, g.const(tag + "/lo", np.array(lo, np.float32)),
                                g.const(tag + "/hi", np.array(hi, np.float32))], name=tag + "/clip")
        g.op("Sub", [xh, clipped], name=tag + "/residual")
    w_hot = g.weight(name + ".hot_weight", np.ascontiguousarray(weight[:, hot].T))
    return g.op("MatMul", [tag + "/residual", w_hot], name=name + "/side_path")


def _keep_apart(g: GraphBuilder, y: str, name: str, width: int) -> str:
    """A no-op Reshape after a quantized MatMul. Without it onnxruntime first fuses MatMul + Add
    (a bias, or the residual add that follows o_proj / down_proj) into a float Gemm, and the QDQ
    and DQ->MatMulNBits fusions no longer match: the weights are then dequantized on every call."""
    return g.op("Reshape", [y, g.const(f"shape_rows_{width}", np.array([-1, width], np.int64))],
                name=name + "/keep_fused")


def _bias(g: GraphBuilder, y: str, name: str, bias: np.ndarray | None) -> str:
    return y if bias is None else g.op("Add", [y, g.weight(name + ".bias", bias)], name=name + "/bias")


def main_path(g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None,
              lq: LinearQuant) -> str:
    """The linear without its side path: fp32, int8 weight-only, or W8A8 / W8A16 (QDQ)."""
    if lq.weight == "fp32":
        return float_linear(g, x, name, weight, bias)
    rows, ys = int8_rows(g, name, weight), []
    for i, xin in enumerate([x] if lq.act is None else act_qdq(g, x, lq.act)):
        tag = "/lo" if i else ""  # 16 bits: one MatMul per pass, same int8 tensors
        w = int8_weight(g, name, rows, len(weight), tag)
        ys.append(_keep_apart(g, g.op("MatMul", [xin, w], name=name + tag), name + tag, len(weight)))
    y = ys[0] if len(ys) == 1 else g.op("Add", ys, name=name + "/hi_lo")
    return _bias(g, y, name, bias)


def quant_linear(g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None,
                 lq: LinearQuant) -> str:
    """Main path + float side path on the hot channels (if any)."""
    y = main_path(g, x, name, weight, bias, lq)
    if not lq.active_hot:
        return y
    return g.op("Add", [y, outlier_side_path(g, x, name, weight, lq)], name=name + "/add_side")


@dataclass(frozen=True)
class PlannedLinear:
    """LinearEmitter for linears planned by name (others: ``default``). Its main_path/side_path
    let the split plan run the int8 part on the accelerator and the side path on the CPU."""

    plans: Mapping[str, LinearQuant]
    default: LinearEmitter = float_linear

    def __call__(self, g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        lq = self.plans.get(name)
        return self.default(g, x, name, weight, bias) if lq is None else quant_linear(g, x, name, weight, bias, lq)

    def main_path(self, g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        lq = self.plans.get(name)
        return self.default(g, x, name, weight, bias) if lq is None else main_path(g, x, name, weight, bias, lq)

    def side_path(self, g: GraphBuilder, x: str, name: str, weight: np.ndarray) -> str | None:
        lq = self.plans.get(name)
        return outlier_side_path(g, x, name, weight, lq) if lq is not None and lq.active_hot else None


def int8_weight_linear(g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
    return quant_linear(g, x, name, weight, bias, LinearQuant("int8"))


def int4_linear(block: int = 32, accuracy_level: int = 4) -> LinearEmitter:
    """MatMulNBits emitter. accuracy_level 4 = int8 compute with per-block activation scales,
    the fast CPU kernel (level 0 runs fp32 and is no faster than a float Gemm for one token)."""

    def emit(g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
        b = quantize_int4_blocks(weight, block)
        n_out, nb = b.scale.shape
        zeros = np.zeros(n_out * -(-nb // 2), np.uint8)  # zero point 0 (the default would be 8)
        y = g.op("MatMulNBits", [x, g.weight(name + ".q4", b.packed), g.weight(name + ".q4_scale", b.scale.reshape(-1)),
                                 g.weight(f"{name}.q4_zero", zeros)],
                 name=name, domain=MS, K=weight.shape[1], N=n_out, bits=4, block_size=block,
                 accuracy_level=accuracy_level)
        # offset: sum_k m[n, block(k)] x[k] = (x @ S)[block] @ m^T with S the 0/1 block-membership matrix
        member = np.zeros((weight.shape[1], nb), np.float32)
        member[np.arange(weight.shape[1]), np.arange(weight.shape[1]) // block] = 1
        sums = g.op("MatMul", [x, g.weight(f"block_sums_{weight.shape[1]}_{block}", member)], name=name + "/block_sums")
        corr = g.op("MatMul", [sums, g.weight(name + ".q4_offset", np.ascontiguousarray(b.offset.T))],
                    name=name + "/offset")
        return _bias(g, g.op("Add", [y, corr], name=name + "/add_offset"), name, bias)

    return emit


DECODE_EMITTERS: dict[str, Callable[..., LinearEmitter]] = {
    "fp32": lambda block: float_linear,
    "int8": lambda block: int8_weight_linear,
    "int4": lambda block: int4_linear(block),
}


# ------------------------------------------------------------------ token table
