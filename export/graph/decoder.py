"""Decoder graphs built straight from weight arrays.

Shapes are static where an accelerator needs them: a prefill chunk has C tokens and reads a KV
cache of L positions (entries at or after ``start`` are masked). The decode graph (CPU only) takes
one token and a cache of any length P = the number of tokens already seen.

Hidden states are 2-D [tokens, hidden] inside the graph; linears are Gemm(transB=1) on the HF
[out, in] weights, so the tied embedding serves as the output projection without a copy.
KV tensors are position-major [positions, kv_heads, head_dim] so the runtime can hand the
first P rows of its cache to onnxruntime without copying.
"""

from __future__ import annotations

from typing import Mapping, Protocol

import numpy as np
from onnx import TensorProto

from edge.config import DecoderConfig

from edge.export.graph.builder import GraphBuilder, WeightStore

F32, I64 = TensorProto.FLOAT, TensorProto.INT64
NEG_INF = np.float32(-3.0e38)  # finite: a fully masked row can never turn into NaN


def rope_tables(cfg: DecoderConfig, max_positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin [L, head_dim/2], computed in float32 the way transformers does."""
    half = cfg.head_dim // 2
    inv_freq = (1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.int64).astype(np.float32)
                                          / cfg.head_dim))).astype(np.float32)
    freqs = np.arange(max_positions, dtype=np.float32)[:, None] * inv_freq[None, :]
    assert freqs.shape[1] == half
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class LinearEmitter(Protocol):
    """Emits y = x @ W^T (+ b) for x [tokens, in] and HF weight W [out, in]; returns y's name.
    The quantizer swaps this per graph (W8A8 QDQ + outlier side path, int4 MatMulNBits, ...)."""

    def __call__(self, g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str: ...


def float_linear(g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str:
    inputs = [x, g.weight(name + ".weight", weight)]
    if bias is not None:
        inputs.append(g.weight(name + ".bias", bias))
    return g.op("Gemm", inputs, name=name, transB=1)


class DecoderGraph:
    """Emits one decoder graph (prefill chunk or decode step) into a GraphBuilder."""

    def __init__(self, cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore,
                 max_context: int, linear: "LinearEmitter | None" = None):
        self.cfg, self.w, self.store, self.max_context = cfg, weights, store, max_context
        self.emit_linear = linear or float_linear

    # ---------------------------------------------------------------- pieces
    def linear(self, g: GraphBuilder, x: str, name: str, bias: bool = False) -> str:
        b = self.w[name + ".bias"] if bias else None
        return self.emit_linear(g, x, name, self.w[name + ".weight"], b)

    def rms_norm(self, g: GraphBuilder, x: str, name: str) -> str:
        """x / sqrt(mean(x^2) + eps) * w as one node: SimplifiedLayerNormalization
        (onnxruntime's RMSNorm kernel, default domain; QNN maps it too). Seven
        elementwise nodes would cost a launch each on every decode step."""
        return g.op("SimplifiedLayerNormalization", [x, g.weight(name + ".weight", self.w[name + ".weight"])],
                    name=f"{name}/rms_norm", axis=-1, epsilon=float(self.cfg.rms_norm_eps),
                    stash_type=1)

    def rope(self, g: GraphBuilder, x: str, cos: str, sin: str, name: str) -> str:
        """x [C, heads, head_dim], cos/sin [C, 1, head_dim/2]; rotate-half convention of HF."""
        x1, x2 = g.op("Split", [x], name=f"{name}/split", n_out=2, axis=-1)
        a = g.op("Sub", [g.op("Mul", [x1, cos], name=f"{name}/x1cos"), g.op("Mul", [x2, sin], name=f"{name}/x2sin")],
                 name=f"{name}/first")
        b = g.op("Add", [g.op("Mul", [x2, cos], name=f"{name}/x2cos"), g.op("Mul", [x1, sin], name=f"{name}/x1sin")],
                 name=f"{name}/second")
        return g.op("Concat", [a, b], name=f"{name}/concat", axis=-1)

    def attention(self, g: GraphBuilder, x: str, i: int, n: int, cos: str, sin: str, mask: str) -> tuple[str, str, str]:
        cfg = self.cfg
        p = f"model.layers.{i}.self_attn"
        q = self.linear(g, x, f"{p}.q_proj", cfg.attention_bias)
        k = self.linear(g, x, f"{p}.k_proj", cfg.attention_bias)
        v = self.linear(g, x, f"{p}.v_proj", cfg.attention_bias)
        ctx, k, v = self.attend(g, q, k, v, i, n, cos, sin, mask, f"past_key_{i}", f"past_value_{i}")
        return self.linear(g, ctx, f"{p}.o_proj"), k, v

    def attend(self, g: GraphBuilder, q: str, k: str, v: str, i: int, n: int, cos: str, sin: str, mask: str,
               past_key: str, past_value: str) -> tuple[str, str, str]:
        """Projected q [C, heads*hd], k/v [C, kv_heads*hd] -> (context [C, heads*hd], roped k, v [C, kvh, hd])."""
        cfg = self.cfg
        p = f"model.layers.{i}.self_attn"
        hd, nh, kvh = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
        groups = nh // kvh
        q = g.op("Reshape", [q, g.const("shape_q", np.array([n, nh, hd], np.int64))], name=f"{p}/q_heads")
        k = g.op("Reshape", [k, g.const("shape_kv", np.array([n, kvh, hd], np.int64))], name=f"{p}/k_heads")
        v = g.op("Reshape", [v, "shape_kv"], name=f"{p}/v_heads")
        q = self.rope(g, q, cos, sin, f"{p}/q_rope")
        k = self.rope(g, k, cos, sin, f"{p}/k_rope")
        keys = g.op("Concat", [past_key, k], name=f"{p}/keys", axis=0)               # [P+C, kvh, hd]
        values = g.op("Concat", [past_value, v], name=f"{p}/values", axis=0)
        # Grouped-query attention without repeating K/V: fold the query groups into rows.
        q = g.op("Mul", [q, g.const("attn_scale", np.array(hd ** -0.5, np.float32))], name=f"{p}/q_scale")
        q = g.op("Reshape", [q, g.const("shape_q_groups", np.array([n, kvh, groups, hd], np.int64))], name=f"{p}/q_groups")
        q = g.op("Transpose", [q], name=f"{p}/q_t", perm=[1, 2, 0, 3])                   # [kvh, g, C, hd]
        q = g.op("Reshape", [q, g.const("shape_q_rows", np.array([kvh, groups * n, hd], np.int64))], name=f"{p}/q_rows")
        kt = g.op("Transpose", [keys], name=f"{p}/k_t", perm=[1, 2, 0])                  # [kvh, hd, P+C]
        vt = g.op("Transpose", [values], name=f"{p}/v_t", perm=[1, 0, 2])                # [kvh, P+C, hd]
        scores = g.op("MatMul", [q, kt], name=f"{p}/scores")                              # [kvh, g*C, P+C]
        scores = g.op("Reshape", [scores, g.const("shape_scores", np.array([kvh, groups, n, -1], np.int64))],
                      name=f"{p}/scores_4d")
        scores = g.op("Add", [scores, mask], name=f"{p}/mask")  # mask: additive bias, 0 or NEG_INF
        probs = g.op("Softmax", [scores], name=f"{p}/softmax", axis=-1)
        probs = g.op("Reshape", [probs, g.const("shape_probs", np.array([kvh, groups * n, -1], np.int64))],
                     name=f"{p}/probs_rows")
        ctx = g.op("MatMul", [probs, vt], name=f"{p}/context")                             # [kvh, g*C, hd]
        ctx = g.op("Reshape", [ctx, g.const("shape_ctx", np.array([kvh, groups, n, hd], np.int64))], name=f"{p}/ctx_4d")
        ctx = g.op("Transpose", [ctx], name=f"{p}/ctx_t", perm=[2, 0, 1, 3])             # [C, kvh, g, hd]
        ctx = g.op("Reshape", [ctx, g.const("shape_hidden_attn", np.array([n, nh * hd], np.int64))], name=f"{p}/merge")
        return ctx, k, v

    def mlp(self, g: GraphBuilder, x: str, i: int) -> str:
        p = f"model.layers.{i}.mlp"
        gate = self.linear(g, x, f"{p}.gate_proj")
        up = self.linear(g, x, f"{p}.up_proj")
        act = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}/sigmoid")], name=f"{p}/silu")
        return self.linear(g, g.op("Mul", [act, up], name=f"{p}/gated"), f"{p}.down_proj")

    def rope_and_mask(self, g: GraphBuilder, n: int, start: str, past_key: str) -> tuple[str, str, str]:
        """RoPE rows cos/sin [C, 1, hd/2] of positions start..start+n-1 and the mask [C, P+C] that hides
        cache rows at or after ``start`` (P = rows of ``past_key``); shared by all layers."""
        cfg = self.cfg
        positions = g.op("Add", [start, g.const("chunk_offsets", np.arange(n, dtype=np.int64))], name="positions")
        # A padded last chunk can reach past the table (start + n > L): clamp; those rows are discarded.
        positions = g.op("Min", [positions, g.const("last_position", np.array(self.max_context - 1, np.int64))],
                         name="positions_clamped")
        cos_t, sin_t = rope_tables(cfg, self.max_context)
        cos = g.op("Gather", [g.weight("rope.cos", cos_t), positions], name="rope/cos", axis=0)
        sin = g.op("Gather", [g.weight("rope.sin", sin_t), positions], name="rope/sin", axis=0)
        cos = g.op("Unsqueeze", [cos, g.const("axis_1", np.array([1], np.int64))], name="rope/cos_heads")
        sin = g.op("Unsqueeze", [sin, "axis_1"], name="rope/sin_heads")
        past_len = g.op("Gather", [g.op("Shape", [past_key], name="mask/past_shape"),
                                   g.const("zero", np.array(0, np.int64))], name="mask/past_len", axis=0)
        past_pos = g.op("Range", [g.const("zero", np.array(0, np.int64)), past_len,
                                  g.const("one", np.array(1, np.int64))], name="mask/past_positions")
        past_ok = g.op("Less", [past_pos, start], name="mask/past_valid")                   # [P]
        past_ok = g.op("Expand", [g.op("Unsqueeze", [past_ok, g.const("axis_0", np.array([0], np.int64))],
                                       name="mask/past_row"),
                                  g.const("shape_mask_rows", np.array([n, 1], np.int64))], name="mask/past_rows")
        causal = g.const("mask_causal", np.tril(np.ones((n, n), dtype=bool)))
        mask = g.op("Concat", [past_ok, causal], name="mask/full", axis=1)                 # [C, P+C]
        # as an additive bias, built once: a broadcast Add per layer costs ~1/5 of a Where
        bias = g.op("Where", [mask, g.const("zero_f", np.array(0, np.float32)), g.const("neg_inf", NEG_INF)],
                    name="mask/bias")
        return cos, sin, bias

    # hooks: a quantizing subclass swaps the token table and the output projection
    def embed_tokens(self, g: GraphBuilder, ids: str) -> str:
        emb = g.weight("model.embed_tokens.weight", self.w["model.embed_tokens.weight"])
        return g.op("Gather", [emb, ids], name="embed_tokens", axis=0)

    def lm_head(self, g: GraphBuilder, h: str) -> str:
        head = "model.embed_tokens.weight" if self.cfg.tie_word_embeddings else "lm_head.weight"
        return g.op("Gemm", [h, g.weight(head, self.w[head])], name="lm_head", transB=1)

    # ---------------------------------------------------------------- graphs
    def build(self, role: str, n: int, past: int | str, logits_rows: bool = False):
        """role "prefill": inputs_embeds [1, n, H]; role "decode": input_ids [1, n]. ``past``: cache
        rows the graph reads, static (an int) or an axis name (the runtime hands over only the rows
        below ``start``, so attention costs what the prompt so far costs, not the whole context).
        ``logits_rows``: an input [R] choosing the token rows that get logits (generation needs one
        per prompt; the output projection over all C rows is ~1/3 of a chunk's work)."""
        cfg = self.cfg
        g = GraphBuilder(f"{role}", self.store)
        kvh, hd, hidden = cfg.num_kv_heads, cfg.head_dim, cfg.hidden_size
        if role == "decode":
            x = self.embed_tokens(g, g.input("input_ids", I64, [1, n]))
        else:
            x = g.input("inputs_embeds", F32, [1, n, hidden])
        start = g.input("start", I64, [1])
        for i in range(cfg.num_layers):
            g.input(f"past_key_{i}", F32, [past, kvh, hd])
            g.input(f"past_value_{i}", F32, [past, kvh, hd])
        h = g.op("Reshape", [x, g.const("shape_hidden", np.array([n, hidden], np.int64))], name="flatten_tokens")

        cos, sin, mask = self.rope_and_mask(g, n, start, "past_key_0")

        for i in range(cfg.num_layers):
            p = f"model.layers.{i}"
            attn, k, v = self.attention(g, self.rms_norm(g, h, f"{p}.input_layernorm"), i, n, cos, sin, mask)
            h = g.op("Add", [h, attn], name=f"{p}/attn_residual")
            h = g.op("Add", [h, self.mlp(g, self.rms_norm(g, h, f"{p}.post_attention_layernorm"), i)],
                     name=f"{p}/mlp_residual")
            g.output(k, f"present_key_{i}", F32, [n, kvh, hd])
            g.output(v, f"present_value_{i}", F32, [n, kvh, hd])
        rows = n
        if logits_rows:
            h = g.op("Gather", [h, g.input("logits_rows", I64, ["rows"])], name="select_logit_rows", axis=0)
            rows = "rows"
        h = self.rms_norm(g, h, "model.norm")
        logits = self.lm_head(g, h)
        logits = g.op("Unsqueeze", [logits, g.const("axis_0", np.array([0], np.int64))], name="logits_3d")
        g.output(logits, "logits", F32, [1, rows, cfg.vocab_size])
        # keep outputs in a stable order: logits first
        g.outputs.insert(0, g.outputs.pop())
        return g.build()


def build_embed_graph(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore):
    """Token ids [1, n] -> embeddings [1, n, H] (any n): feeds prefill, and later image merging."""
    g = GraphBuilder("embed", store)
    ids = g.input("input_ids", I64, [1, "tokens"])
    emb = g.weight("model.embed_tokens.weight", weights["model.embed_tokens.weight"])
    g.output(g.op("Gather", [emb, ids], name="embed_tokens", axis=0), "inputs_embeds", F32, [1, "tokens", cfg.hidden_size])
    return g.build()
