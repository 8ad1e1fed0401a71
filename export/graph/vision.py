"""The vision graph: image tiles -> image-token embeddings (SigLIP encoder + Idefics3 connector).

    pixel_values [B, 3, S, S]  (B = VisionConfig.tile_batch, static; S = image_size)
      -> patch embedding (Conv k=p, stride p) + position embeddings     [B, N*N, D]  (N = S / p)
      -> encoder layers: LayerNorm, attention (q/k/v/out with bias), LayerNorm, fc1, gelu, fc2
      -> post LayerNorm -> pixel shuffle (factor s) -> modality projection
    image_embeds [B, (N/s)^2, H_text]

Tiles are always full (the processor resizes to multiples of the tile), so the patch attention
mask of transformers is all ones and the position ids are a constant, computed here the way
Idefics3VisionEmbeddings buckets them. Hidden states are 2-D [B*N*N, D] around the linears so the
same LinearEmitter hook as the decoder's (float, or the quantizer's) applies.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np
from onnx import TensorProto

from edge.vision import VisionConfig

from edge.export.graph.builder import GraphBuilder, WeightStore
from edge.export.graph.decoder import LinearEmitter, float_linear

F32 = TensorProto.FLOAT
V = "model.vision_model."


def full_tile_position_ids(side: int) -> np.ndarray:
    """Idefics3VisionEmbeddings' bucketed position ids for a tile with all side x side patches."""
    boundaries = np.arange(1 / side, 1.0, 1 / side, dtype=np.float32)
    frac = (np.arange(side, dtype=np.float32) / np.float32(side) * np.float32(1 - 1e-6)).astype(np.float32)
    buckets = np.searchsorted(boundaries, frac, side="right")
    return (buckets[:, None] * side + buckets[None, :]).reshape(-1).astype(np.int64)


class VisionGraph:
    def __init__(self, cfg: VisionConfig, weights: Mapping[str, np.ndarray], store: WeightStore,
                 linear: LinearEmitter | None = None):
        self.cfg, self.w, self.store = cfg, weights, store
        self.emit_linear = linear or float_linear

    def linear(self, g: GraphBuilder, x: str, name: str, bias: bool = True) -> str:
        return self.emit_linear(g, x, name, self.w[name + ".weight"], self.w[name + ".bias"] if bias else None)

    def layer_norm(self, g: GraphBuilder, x: str, name: str) -> str:
        scale = g.weight(name + ".weight", self.w[name + ".weight"])
        bias = g.weight(name + ".bias", self.w[name + ".bias"])
        return g.op("LayerNormalization", [x, scale, bias], name=name, axis=-1, epsilon=self.cfg.layer_norm_eps)

    def gelu(self, g: GraphBuilder, x: str, name: str) -> str:
        half = g.const("gelu_half", np.array(0.5, np.float32))
        one = g.const("gelu_one", np.array(1.0, np.float32))
        if self.cfg.hidden_act == "gelu":  # exact (erf) form
            inner = g.op("Erf", [g.op("Mul", [x, g.const("gelu_rsqrt2", np.array(1 / math.sqrt(2), np.float32))],
                                      name=f"{name}/scale")], name=f"{name}/erf")
        else:  # tanh approximation: gelu_pytorch_tanh / gelu_new / gelu_fast
            cube = g.op("Mul", [g.op("Mul", [x, x], name=f"{name}/sq"), x], name=f"{name}/cube")
            poly = g.op("Add", [x, g.op("Mul", [cube, g.const("gelu_c", np.array(0.044715, np.float32))],
                                         name=f"{name}/c_cube")], name=f"{name}/poly")
            inner = g.op("Tanh", [g.op("Mul", [poly, g.const("gelu_k", np.array(math.sqrt(2 / math.pi), np.float32))],
                                       name=f"{name}/k_poly")], name=f"{name}/tanh")
        return g.op("Mul", [g.op("Mul", [x, half], name=f"{name}/half_x"),
                            g.op("Add", [inner, one], name=f"{name}/one_plus")], name=name)

    def attention(self, g: GraphBuilder, x: str, i: int, b: int, n: int) -> str:
        cfg = self.cfg
        p = f"{V}encoder.layers.{i}.self_attn"
        heads, hd = cfg.num_heads, cfg.hidden_size // cfg.num_heads
        shape = g.const("shape_heads", np.array([b, n, heads, hd], np.int64))
        q = self.linear(g, x, f"{p}.q_proj")
        q = g.op("Mul", [q, g.const("attn_scale", np.array(hd ** -0.5, np.float32))], name=f"{p}/q_scale")
        q = g.op("Transpose", [g.op("Reshape", [q, shape], name=f"{p}/q_heads")], name=f"{p}/q_t", perm=[0, 2, 1, 3])
        k = g.op("Reshape", [self.linear(g, x, f"{p}.k_proj"), shape], name=f"{p}/k_heads")
        k = g.op("Transpose", [k], name=f"{p}/k_t", perm=[0, 2, 3, 1])                    # [B, h, hd, n]
        v = g.op("Reshape", [self.linear(g, x, f"{p}.v_proj"), shape], name=f"{p}/v_heads")
        v = g.op("Transpose", [v], name=f"{p}/v_t", perm=[0, 2, 1, 3])                    # [B, h, n, hd]
        probs = g.op("Softmax", [g.op("MatMul", [q, k], name=f"{p}/scores")], name=f"{p}/softmax", axis=-1)
        ctx = g.op("Transpose", [g.op("MatMul", [probs, v], name=f"{p}/context")], name=f"{p}/ctx_t",
                   perm=[0, 2, 1, 3])
        ctx = g.op("Reshape", [ctx, g.const("shape_rows", np.array([b * n, cfg.hidden_size], np.int64))],
                   name=f"{p}/merge")
        return self.linear(g, ctx, f"{p}.out_proj")

    def build(self):
        cfg = self.cfg
        b, s, p, d = cfg.tile_batch, cfg.image_size, cfg.patch_size, cfg.hidden_size
        side = cfg.patches_per_side
        n = side * side
        g = GraphBuilder("vision", self.store)
        x = g.input("pixel_values", F32, [b, cfg.num_channels, s, s])
        e = f"{V}embeddings"
        x = g.op("Conv", [x, g.weight(f"{e}.patch_embedding.weight", self.w[f"{e}.patch_embedding.weight"]),
                          g.weight(f"{e}.patch_embedding.bias", self.w[f"{e}.patch_embedding.bias"])],
                 name=f"{e}.patch_embedding", kernel_shape=[p, p], strides=[p, p])              # [B, D, N, N]
        x = g.op("Reshape", [x, g.const("shape_patches", np.array([b, d, n], np.int64))], name=f"{e}/flatten")
        x = g.op("Transpose", [x], name=f"{e}/patch_major", perm=[0, 2, 1])                      # [B, n, D]
        table = self.w[f"{e}.position_embedding.weight"][full_tile_position_ids(side)]
        x = g.op("Add", [x, g.weight(f"{e}.position_embedding.full_tile", table)], name=f"{e}/add_positions")
        h = g.op("Reshape", [x, g.const("shape_rows", np.array([b * n, d], np.int64))], name=f"{e}/rows")
        for i in range(cfg.num_layers):
            q = f"{V}encoder.layers.{i}"
            h = g.op("Add", [h, self.attention(g, self.layer_norm(g, h, f"{q}.layer_norm1"), i, b, n)],
                     name=f"{q}/attn_residual")
            mlp = self.linear(g, self.layer_norm(g, h, f"{q}.layer_norm2"), f"{q}.mlp.fc1")
            mlp = self.linear(g, self.gelu(g, mlp, f"{q}.mlp.gelu"), f"{q}.mlp.fc2")
            h = g.op("Add", [h, mlp], name=f"{q}/mlp_residual")
        h = self.layer_norm(g, h, f"{V}post_layernorm")
        # pixel shuffle, as Idefics3Connector.pixel_shuffle: merge s x s neighbouring patches into one token
        f, m = cfg.scale_factor, side // cfg.scale_factor
        c = "model.connector"
        h = g.op("Reshape", [h, g.const("shape_shuffle_w", np.array([b, side, m, d * f], np.int64))], name=f"{c}/merge_w")
        h = g.op("Transpose", [h], name=f"{c}/swap_1", perm=[0, 2, 1, 3])
        h = g.op("Reshape", [h, g.const("shape_shuffle_h", np.array([b, m, m, d * f * f], np.int64))], name=f"{c}/merge_h")
        h = g.op("Transpose", [h], name=f"{c}/swap_2", perm=[0, 2, 1, 3])
        h = g.op("Reshape", [h, g.const("shape_tokens", np.array([b * m * m, d * f * f], np.int64))], name=f"{c}/tokens")
        h = self.linear(g, h, f"{c}.modality_projection.proj", bias=False)
        out = g.op("Reshape", [h, g.const("shape_out", np.array([b, m * m, cfg.text_hidden_size], np.int64))],
                   name=f"{c}/image_embeds")
        g.output(out, "image_embeds", F32, [b, m * m, cfg.text_hidden_size])
        return g.build()


def build_vision_graph(cfg: VisionConfig, weights: Mapping[str, np.ndarray], store: WeightStore,
                       linear: LinearEmitter | None = None):
    return VisionGraph(cfg, weights, store, linear).build()
