"""Decoder graphs of the static W8A8 plans (fused, split) and their decode graph: the planned
linears, and the token table and output projection as 8-bit blocks of 32.

The table and head are the CPU plan's own tensors (CpuDecoderGraph.embed_lookup / lm_head, the
same stored bytes): GatherBlockQuantized for the lookup, MatMulNBits (accuracy level 4) for the
head, which runs on the CPU lane in every plan (logit rows only), so it needs no static
activation scale. A GGUF source's Q8_0 table goes in as stored: the round trip through per-row
int8 that these plans had before cost +0.25% perplexity on its own (docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import TensorProto

from edge.config import DecoderConfig

from edge.export.graph.builder import GraphBuilder, WeightStore
from edge.export.graph.cpu_decoder import CpuDecoderGraph
from edge.export.graph.decoder import DecoderGraph, LinearEmitter
from edge.export.quant.blocks import Blocks, at_width

TABLE = "model.embed_tokens"


def tables(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore,
           blocks: Mapping[str, Blocks] | None) -> CpuDecoderGraph:
    """The builder of the 8-bit block table and head (only its lookup and head are used)."""
    return CpuDecoderGraph(cfg, weights, store, 1, "int8", blocks)


class QuantDecoderGraph(DecoderGraph):
    def __init__(self, cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store, max_context: int,
                 linear: LinearEmitter, blocks: Mapping[str, Blocks] | None = None):
        super().__init__(cfg, weights, store, max_context, linear=linear)
        self.tables = tables(cfg, weights, store, blocks)

    def embed_tokens(self, g: GraphBuilder, ids: str) -> str:
        return self.tables.embed_lookup(g, ids)

    def lm_head(self, g: GraphBuilder, h: str) -> str:
        return self.tables.lm_head(g, h)


def build_block_embed_graph(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore,
                            blocks: Mapping[str, Blocks] | None):
    """Token ids [1, n] -> embeddings [1, n, H] from the 8-bit block table (any n)."""
    g = GraphBuilder("embed", store)
    ids = g.input("input_ids", TensorProto.INT64, [1, "tokens"])
    g.output(tables(cfg, weights, store, blocks).embed_lookup(g, ids), "inputs_embeds", TensorProto.FLOAT,
             [1, "tokens", cfg.hidden_size])
    return g.build()


def table_lookup(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], blocks: Mapping[str, Blocks] | None) -> np.ndarray:
    """The float rows the block table dequantizes to (what the graph evaluator embeds with)."""
    return at_width(weights[TABLE + ".weight"], (blocks or {}).get(TABLE + ".weight"), 8).dequantize()
