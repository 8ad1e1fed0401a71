"""Decoder graphs with an int8 token table and a quantized output projection.

When the token table is tied to the output projection, both read the same stored int8 tensor, so
a quantized bundle holds the 49k x 576 table once, at a quarter of its float size.

The output projection is DQ(int8 table^T) -> MatMul like every other int8 linear; in the
decode graph (float activations) onnxruntime turns it into an 8-bit MatMulNBits at load time. That
fusion needs the DequantizeLinear's inputs to itself: the lookup reads the int8 bytes under a
second initializer name and its own copy of the row scales (linears.gather_int8_rows). With one shared scale tensor the head stays unfused and
dequantizes the whole table on every step: SmolLM2 decode 46 ms/step instead of 9 ms
(tests/test_quant.py::test_decode_head_reads_the_token_table_and_fuses guards it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from onnx import TensorProto

from edge.config import DecoderConfig
from edge.export.quant.reference import LinearQuant

from edge.export.graph.builder import GraphBuilder, WeightStore
from edge.export.graph.decoder import DecoderGraph, LinearEmitter
from edge.export.quant.linears import gather_int8_rows, quant_linear

TABLE = "model.embed_tokens"


class QuantDecoderGraph(DecoderGraph):
    def __init__(self, cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store, max_context: int,
                 linear: LinearEmitter, head: LinearQuant | None):
        super().__init__(cfg, weights, store, max_context, linear=linear)
        self.head = head  # None: the float output projection

    def embed_tokens(self, g: GraphBuilder, ids: str) -> str:
        return gather_int8_rows(g, ids, TABLE, self.w[TABLE + ".weight"])

    def lm_head(self, g: GraphBuilder, h: str) -> str:
        if self.head is None:
            return super().lm_head(g, h)
        name = TABLE if self.cfg.tie_word_embeddings else "lm_head"
        return quant_linear(g, h, name, self.w[name + ".weight"], None, self.head)


def build_int8_embed_graph(cfg: DecoderConfig, weights: Mapping[str, np.ndarray], store: WeightStore):
    """Token ids [1, n] -> embeddings [1, n, H] from the int8 table (any n)."""
    g = GraphBuilder("embed", store)
    ids = g.input("input_ids", TensorProto.INT64, [1, "tokens"])
    g.output(gather_int8_rows(g, ids, TABLE, weights[TABLE + ".weight"]), "inputs_embeds", TensorProto.FLOAT,
             [1, "tokens", cfg.hidden_size])
    return g.build()
