"""The CPU plan's decoder: ONE graph with a dynamic token count that serves prompt chunks and
decode steps in a single onnxruntime session, built from onnxruntime's fused CPU kernels.

- GroupQueryAttention (com.microsoft) with do_rotary and packed q|k|v: RoPE, the cache append and
  causal attention in one node. The cache is [1, kv_heads, capacity, head_dim] per layer; the
  runtime binds ONE buffer as both past_* input and present_* output, and the kernel then appends
  in place (it compares the pointers; two buffers would cost a copy of the whole cache per call).
  ``seqlens_k`` = tokens in the cache after this call - 1, ``total_sequence_length`` = that count.
- SkipSimplifiedLayerNormalization: residual add + RMSNorm in one node (output 3 = the sum).
- Linears: MatMulNBits (int8 / int4 blocks of 32, accuracy level 4 = int8 compute with per-block
  activation scales computed on the fly: dynamic, so no calibration and nothing fitted to a text)
  or float MatMul. A GGUF source's Q4_1 / Q8_0 blocks go in as stored (export/quant/blocks.py).
- The output projection runs only on the ``logits_rows`` the runtime reads (one per prompt).
Inputs: inputs_embeds [1, S, H] (the embed graph's lookup, or image-merged embeddings), logits_rows
[R], seqlens_k [1] int32, total_sequence_length [] int32, past_key_i / past_value_i.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

import numpy as np
from onnx import TensorProto

from edge.config import DecoderConfig

from edge.export.graph.builder import GraphBuilder, WeightStore
from edge.export.graph.decoder import rope_tables
from edge.export.quant.blocks import BLOCK, Blocks, at_width, offsets_as_rows
from edge.export.quant.reference import quantize_weight_int8
from edge.export.quant.rotation import rotate_weights, stream_rotation, unrotate

F32, F16, I32, I64 = TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.INT32, TensorProto.INT64
KV_DTYPES = {"fp32": F32, "fp16": F16}
MS = "com.microsoft"
ACCURACY_LEVEL = 4  # int8 compute: the fast MLAS kernels (VNNI on x86, SDOT/I8MM on ARM)
PREFIX = "cpu."     # the plan's own tensors: other plans may store smoothed copies under HF names

# y = x @ W^T for x [1, S, in]: emitter(g, x, name, W float [out, in], the source's blocks or None)
CpuLinear = Callable[[GraphBuilder, str, str, np.ndarray, "Blocks | None"], str]


def float_matmul(g: GraphBuilder, x: str, name: str, w: np.ndarray, blocks: Blocks | None) -> str:
    return g.op("MatMul", [x, g.weight(PREFIX + name + ".wT", np.ascontiguousarray(w.T))], name=name)


HEAD_PART_ROWS = 8192  # rows per MatMulNBits of a split head (lm_head)


def nbits_weights(name: str, b: Blocks) -> dict[str, np.ndarray]:
    """MatMulNBits' B, scales and zero points for linear ``name``, under their stored names."""
    return {f"{PREFIX}{name}.q{b.bits}": b.matmulnbits_b(),
            f"{PREFIX}{name}.scale": np.ascontiguousarray(b.scale.reshape(-1)),
            f"{PREFIX}{name}.zero": b.matmulnbits_zero_points()}


def nbits_op(g: GraphBuilder, inputs: list[str], name: str, b: Blocks, k: int, n: int) -> str:
    """One MatMulNBits node: x, B, scales, zero points of ``b``'s width and block, K = k, N = n."""
    return g.op("MatMulNBits", inputs, name=name, domain=MS, K=k, N=n, bits=b.bits, block_size=b.q.shape[2],
                accuracy_level=ACCURACY_LEVEL)


def _matmulnbits(g: GraphBuilder, x: str, name: str, b: Blocks, offsets: str = "rows") -> str:
    """MatMulNBits over ``b``; a Q4_1 source's residual offsets (blocks.py) either as extra input
    rows of the same node (``offsets="rows"``: x's block means appended to x) or exact, as a float
    MatMul of the block means added after it (``"float"``)."""
    def node(x: str, b: Blocks, k: int) -> str:
        return nbits_op(g, [x] + [g.weight(key, a) for key, a in nbits_weights(name, b).items()], name, b, k, b.shape[0])

    if b.offset is None:
        return node(x, b, b.shape[1])
    # mean over each block of 32 inputs: 1-D pooling over [1, S, K]
    means = g.op("AveragePool", [x], name=name + "/block_means", kernel_shape=[BLOCK], strides=[BLOCK])
    if offsets == "rows":
        return node(g.op("Concat", [x, means], name=name + "/with_block_means", axis=-1), *offsets_as_rows(b))
    y = node(x, b, b.shape[1])
    # sum_k r[n, blk(k)] x[k] = (32 * block means of x) @ r^T
    corr = g.op("MatMul", [means, g.weight(f"{PREFIX}{name}.offsetT", np.ascontiguousarray(b.offset.T * BLOCK))],
                name=name + "/offset")
    return g.op("Add", [y, corr], name=name + "/add_offset")


def nbits_linear(bits: int, offsets: str = "rows") -> CpuLinear:
    """MatMulNBits at ``bits``: the source's own blocks where they have that width (GGUF Q4_1 for
    4 bits, Q8_0 for 8), else the float weight rounded to asymmetric blocks of 32."""
    def emit(g: GraphBuilder, x: str, name: str, w: np.ndarray, blocks: Blocks | None) -> str:
        return _matmulnbits(g, x, name, at_width(w, blocks, bits), offsets)
    return emit


def dynamic_int8_linear(g: GraphBuilder, x: str, name: str, w: np.ndarray, blocks: Blocks | None) -> str:
    """x quantized to uint8 with one scale per call at run time (DynamicQuantizeLinear), W int8
    [in, out] with one scale per output column, as DQ -> MatMul <- DQ: onnxruntime fuses that into
    DynamicQuantizeMatMul (its int8 GEMM, B prepacked once), and the runtime opens it unfused
    where that GEMM saturates (edge.runtime.sessions.int8_gemm_saturates). Only for inputs whose
    channels a rotation has evened out (CpuScheme.rotate)."""
    q, scale = quantize_weight_int8(w)
    xq, xs, xz = g.op("DynamicQuantizeLinear", [x], name=name + "/quantize_input", n_out=3)
    xd = g.op("DequantizeLinear", [xq, xs, xz], name=name + "/input")
    wd = g.op("DequantizeLinear", [g.weight(PREFIX + name + ".i8T", np.ascontiguousarray(q.T)),
                                   g.weight(PREFIX + name + ".i8scale", scale),
                                   g.weight(PREFIX + name + ".i8zero", np.zeros(len(scale), np.int8))],
              name=name + "/weight", axis=1)
    return g.op("MatMul", [xd, wd], name=name)


LINEAR_FORMS = {  # for the manifest
    "int8": "MatMulNBits 8-bit blocks of 32, accuracy_level 4 (int8 compute, activations quantized per block "
            "of 32 at run time)",
    "int4": "MatMulNBits 4-bit blocks of 32, accuracy_level 4 (a Q4_1 source: its per-block offsets as extra "
            "input rows of the same node, x's block means appended to x, the offsets rounded to 4 bits)",
    "int4exact": "MatMulNBits 4-bit blocks of 32, accuracy_level 4 (a Q4_1 source: + its per-block offsets "
                 "exactly, a float MatMul of x's block means)",
    "dyn8": "DynamicQuantizeLinear -> DQ -> MatMul <- DQ (int8 weights, one scale per output channel; "
            "activations uint8, one scale per call, at run time), fused by onnxruntime into DynamicQuantizeMatMul",
    "fp32": "MatMul, float32",
}
CPU_LINEARS: dict[str, CpuLinear] = {"fp32": float_matmul, "int8": nbits_linear(8), "int4": nbits_linear(4),
                                     "int4exact": nbits_linear(4, offsets="float"),
                                     "dyn8": dynamic_int8_linear}


@dataclass(frozen=True)
class CpuScheme:
    """Which CPU_LINEARS kind each role gets: the linears fed by a norm (q|k|v, gate|up), the
    ones that write the residual stream (o, down: their inputs keep their outlier channels) and
    the output projection (with the token table it shares when tied)."""

    norm_fed: str
    writers: str
    head: str
    rotate: bool = False  # the residual stream rotated (export/quant/rotation.py)

    @property
    def quantized(self) -> bool:
        return {self.norm_fed, self.writers, self.head} != {"fp32"}


CPU_SCHEMES: dict[str, CpuScheme] = {
    "fp32": CpuScheme("fp32", "fp32", "fp32"),
    "int8": CpuScheme("int8", "int8", "int8"),
    "int4": CpuScheme("int4", "int4", "int8"),  # the head stays 8-bit (4-bit blocks cost ~8% perplexity)
    "int4exact": CpuScheme("int4exact", "int4exact", "int8"),
    "int8dyn": CpuScheme("dyn8", "int8", "int8", rotate=True),
}
ROTATION_SEED = 0


class CpuDecoderGraph:
    """``linears``: a CPU_SCHEMES key."""

    def __init__(self, cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore, max_context: int,
                 linears: str = "int8", blocks: Mapping[str, Blocks] | None = None, kv: str = "fp32"):
        if linears not in CPU_SCHEMES:
            raise ValueError(f"CPU linears {linears!r}: expected one of {', '.join(CPU_SCHEMES)}")
        if kv not in KV_DTYPES:
            raise ValueError(f"KV cache {kv!r}: expected one of {', '.join(KV_DTYPES)}")
        self.kv = kv
        self.cfg, self.w, self.store, self.max_context = cfg, weights, store, max_context
        self.scheme = CPU_SCHEMES[linears]
        self.linears, self.head = linears, self.scheme.head
        self.blocks = dict(blocks or {})
        self.rotation = self.unrotation = self.rotation_kind = None
        if self.scheme.rotate:
            q, self.rotation_kind = stream_rotation(cfg.hidden_size, ROTATION_SEED)
            self.rotation, self.unrotation = q.astype(np.float32), unrotate(weights, q)
            self.w = rotate_weights(cfg, weights, q)
            # a source's blocks of the tensors the rotation replaced no longer apply
            self.blocks = {k: v for k, v in self.blocks.items() if self.w.get(k) is weights.get(k)}

    def record(self) -> dict:
        """What the linears are, for the manifest's quantization.cpu."""
        if self.linears == "fp32":
            return {"linears": "fp32", "form": "MatMul, float32"}
        s = self.scheme
        kinds = sorted({"Q4_1" if b.offset is not None else "Q8_0" for b in self.blocks.values()})
        rec = {"linears": self.linears, "head": s.head,
               "form": {role: LINEAR_FORMS[kind] for role, kind in
                        (("q|k|v, gate|up", s.norm_fed), ("o, down", s.writers), ("head", s.head))},
               "token_table": "GatherBlockQuantized on the head's 8-bit blocks" if self.cfg.tie_word_embeddings
                              else "GatherBlockQuantized, 8-bit blocks of 32",
               "source_blocks": f"the source's own {', '.join(kinds)} blocks where their width matches"
                                if kinds else "none (round to nearest, asymmetric blocks)"}
        if s.rotate:
            rec["rotation"] = {"kind": self.rotation_kind, "size": self.cfg.hidden_size, "seed": ROTATION_SEED,
                               "folded": "norm weights into q|k|v and gate|up; o and down write the rotated stream"}
        return rec

    def linear(self, g: GraphBuilder, x: str, name: str, parts: list[str], kind: str) -> str:
        """One linear over the stacked rows of ``parts`` (HF names without .weight), of CPU_LINEARS
        ``kind``."""
        w = np.concatenate([self.w[p + ".weight"] for p in parts]) if len(parts) > 1 else self.w[parts[0] + ".weight"]
        blocks = Blocks.stack([self.blocks.get(p + ".weight") for p in parts])
        y = CPU_LINEARS[kind](g, x, name, w, blocks)
        biases = [self.w.get(p + ".bias") for p in parts]
        if any(b is not None for b in biases):
            bias = np.concatenate([b if b is not None else np.zeros(len(self.w[p + ".weight"]), np.float32)
                                   for b, p in zip(biases, parts)])
            y = g.op("Add", [y, g.weight(PREFIX + name + ".bias", bias)], name=name + "/bias")
        return y

    def norm_weight(self, g: GraphBuilder, name: str) -> str:
        return g.weight(PREFIX + name, self.w[name])

    def build(self):
        cfg, L = self.cfg, self.max_context
        g = GraphBuilder("cpu", self.store)
        # the cache's capacity is the runtime's (it grows with the context used, up to L)
        kv, kv_t = [1, cfg.num_kv_heads, "cache_rows", cfg.head_dim], KV_DTYPES[self.kv]
        half = kv_t == F16  # the CPU kernel takes query, cache and cos/sin in one type: cast around it
        h = g.input("inputs_embeds", F32, [1, "tokens", cfg.hidden_size])
        rows = g.input("logits_rows", I64, ["rows"])
        seqlens = g.input("seqlens_k", I32, [1])
        total = g.input("total_sequence_length", I32, [])
        cos_t, sin_t = rope_tables(cfg, L)
        if half:
            cos_t, sin_t = cos_t.astype(np.float16), sin_t.astype(np.float16)
        cos, sin = g.weight(PREFIX + "rope.cos", cos_t), g.weight(PREFIX + "rope.sin", sin_t)
        eps = cfg.rms_norm_eps
        if self.rotation is not None:
            h = g.op("MatMul", [h, g.weight(PREFIX + "rotation", self.rotation)], name="rotate_stream")
        x = g.op("SimplifiedLayerNormalization", [h, self.norm_weight(g, "model.layers.0.input_layernorm.weight")],
                 name="model.layers.0.input_layernorm", axis=-1, epsilon=eps)
        residual = h
        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            for t in ("key", "value"):
                g.input(f"past_{t}_{i}", kv_t, kv)
            qkv = self.linear(g, x, f"{p}.self_attn.qkv_proj", [f"{p}.self_attn.{t}_proj" for t in "qkv"],
                              self.scheme.norm_fed)
            if half:
                qkv = g.op("Cast", [qkv], name=f"{p}.self_attn/to_fp16", to=F16)
            # present_* are the node's own outputs (an Identity to a graph output would be a second
            # buffer, and the kernel would no longer see present == past)
            attn = g.op("GroupQueryAttention", [qkv, "", "", f"past_key_{i}", f"past_value_{i}", seqlens, total, cos, sin],
                        name=f"{p}.self_attn", n_out=3, domain=MS, num_heads=cfg.num_heads,
                        kv_num_heads=cfg.num_kv_heads, do_rotary=1, rotary_interleaved=0,
                        outs=[f"{p}.self_attn:0", f"present_key_{i}", f"present_value_{i}"])
            g.output(attn[1], f"present_key_{i}", kv_t, kv)
            g.output(attn[2], f"present_value_{i}", kv_t, kv)
            ctx = g.op("Cast", [attn[0]], name=f"{p}.self_attn/to_fp32", to=F32) if half else attn[0]
            o = self.linear(g, ctx, f"{p}.self_attn.o_proj", [f"{p}.self_attn.o_proj"], self.scheme.writers)
            x, _, _, residual = g.op("SkipSimplifiedLayerNormalization",
                                     [o, residual, self.norm_weight(g, f"{p}.post_attention_layernorm.weight")],
                                     name=f"{p}.post_attention_layernorm", n_out=4, domain=MS, epsilon=eps)
            gu = self.linear(g, x, f"{p}.mlp.gate_up_proj", [f"{p}.mlp.gate_proj", f"{p}.mlp.up_proj"],
                             self.scheme.norm_fed)
            gate, up = g.op("Split", [gu, g.const("split_ffn", np.array([cfg.intermediate_size] * 2, np.int64))],
                            name=f"{p}.mlp/split", n_out=2, axis=-1)
            act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}.mlp/sigmoid")], name=f"{p}.mlp/silu"),
                               up], name=f"{p}.mlp/gated")
            down = self.linear(g, act, f"{p}.mlp.down_proj", [f"{p}.mlp.down_proj"], self.scheme.writers)
            nxt = "model.norm.weight" if i == cfg.num_layers - 1 else f"model.layers.{i + 1}.input_layernorm.weight"
            x, _, _, residual = g.op("SkipSimplifiedLayerNormalization", [down, residual, self.norm_weight(g, nxt)],
                                     name=f"{p}/next_norm", n_out=4, domain=MS, epsilon=eps)
        # the norm is per row: gathering the rows read after it equals gathering before it
        picked = g.op("Gather", [x, rows], name="select_logit_rows", axis=1)
        if self.unrotation is not None:  # back to the head's basis, with the final norm's weight
            picked = g.op("MatMul", [picked, g.weight(PREFIX + "unrotation", self.unrotation)], name="unrotate_rows")
        g.output(self.lm_head(g, picked), "logits", F32, [1, "rows", cfg.vocab_size])
        g.outputs.insert(0, g.outputs.pop())  # logits first
        return g.build()

    def lm_head(self, g: GraphBuilder, x: str) -> str:
        """The output projection at the scheme's head kind (8-bit blocks for quantized plans).
        A block-quantized head of more than HEAD_PART_ROWS rows runs as several MatMulNBits over
        row views of its one stored copy: onnxruntime holds a weight's mapped original until its
        packed copy is made, so a whole 49,152-row head raised the load's peak by 27 MiB."""
        head = "model.embed_tokens" if self.cfg.tie_word_embeddings else "lm_head"
        bits = {"int8": 8, "int4": 4}.get(self.head)
        V = self.cfg.vocab_size
        blocks = at_width(self.w[head + ".weight"], self.blocks.get(head + ".weight"), bits) if bits else None
        if blocks is None or blocks.offset is not None or V <= HEAD_PART_ROWS:
            return self.linear(g, x, "lm_head", [head], kind=self.head)
        stored = nbits_weights("lm_head", blocks)
        for key, array in stored.items():
            self.store.add(key, array)  # whole: the token table reads it too (embed_lookup)
        parts = []
        for start in range(0, V, HEAD_PART_ROWS):
            stop = min(V, start + HEAD_PART_ROWS)
            views = [g.weight_rows(f"{key}.rows{start}", key, start, stop, V) for key in stored]
            parts.append(nbits_op(g, [x] + views, f"lm_head/rows{start}", blocks, blocks.shape[1], stop - start))
        return g.op("Concat", parts, name="lm_head", axis=-1)

    def build_embed(self):
        """Token ids [1, n] -> embeddings [1, n, H]."""
        g = GraphBuilder("cpu_embed", self.store)
        ids = g.input("input_ids", I64, [1, "tokens"])
        g.output(self.embed_lookup(g, ids), "inputs_embeds", F32, [1, "tokens", self.cfg.hidden_size])
        return g.build()

    def embed_lookup(self, g: GraphBuilder, ids: str) -> str:
        """Token rows of ``ids``. Quantized plans read the output projection's 8-bit blocks (the
        same stored bytes when the head is tied) with GatherBlockQuantized."""
        cfg = self.cfg
        table = self.w["model.embed_tokens.weight"]
        tied, V, H = cfg.tie_word_embeddings, cfg.vocab_size, cfg.hidden_size
        if self.head == "fp32":
            if tied:  # the head's W^T [H, vocab]: gather columns, then rows
                cols = g.op("Gather", [g.weight_alias(PREFIX + "embed_tokens.T", PREFIX + "lm_head.wT"), ids],
                            name="embed_tokens/columns", axis=1)
                return g.op("Transpose", [cols], name="embed_tokens", perm=[1, 2, 0])
            return g.op("Gather", [g.weight(PREFIX + "embed_tokens", table), ids], name="embed_tokens", axis=0)
        b = at_width(table, self.blocks.get("model.embed_tokens.weight"), 8)
        nb = b.q.shape[1]
        # GatherBlockQuantized reads [vocab, H] data with [vocab, H / 32] scales and zero points:
        # the head's MatMulNBits bytes viewed in that shape when tied (stored once, whichever
        # graph is built first)
        if tied:
            for name, array in nbits_weights("lm_head", b).items():
                self.store.add(name, array)
            data = g.weight_alias(PREFIX + "embed_tokens.q8", PREFIX + "lm_head.q8", (V, H))
            scale = g.weight_alias(PREFIX + "embed_tokens.scale", PREFIX + "lm_head.scale", (V, nb))
            zero = g.weight_alias(PREFIX + "embed_tokens.zero", PREFIX + "lm_head.zero", (V, nb))
        else:
            data = g.weight(PREFIX + "embed_tokens.q8", b.matmulnbits_b().reshape(V, H))
            scale, zero = g.weight(PREFIX + "embed_tokens.scale", b.scale), g.weight(PREFIX + "embed_tokens.zero", b.zero)
        return g.op("GatherBlockQuantized", [data, ids, scale, zero], name="embed_tokens", domain=MS,
                    gather_axis=0, quantize_axis=1, block_size=b.q.shape[2], bits=8)
