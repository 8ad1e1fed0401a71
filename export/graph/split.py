"""The split prefill plan: per-layer subgraphs for a CPU lane and an accelerator lane.

Per chunk of C tokens (static shapes; the CPU-only graphs leave two axes open: the attention's
cache rows, which the runtime feeds as the whole static cache exactly as the fused graph reads it,
and the head's rows, only those whose logits are wanted):

    pre        cpu    embeddings -> h, x = input_layernorm_0(h)
    per layer i:
    qkv.i      accel  x -> q, k, v                     (int8 linear block)
    attn.i     cpu    RoPE, attention over the cache (rows >= start masked) + the chunk, K/V rows
    o_proj.i   accel  ctx -> o
    post_attn.i cpu   h += o; x = post_attention_layernorm_i(h)
    gate_up.i  accel  x -> gate, up
    act.i      cpu    a = silu(gate) * up
    down.i     accel  a -> d
    post_mlp.i cpu    h += d; x = input_layernorm_{i+1}(h)   (model.norm after the last layer)
    head       cpu    x -> logits (only the rows the runtime asks for)

Accelerator graphs hold nothing but the linears' main path, as the LinearEmitter emits it. An
emitter that splits off a float outlier side path says so with two optional methods (see
``SplitLinear``); the side path then goes into the CPU stage that consumes the linear's output, so
it runs on the CPU, and its input register is fed to that stage. CPU stages without per-layer
weights (attention, activation when no side path) are one file shared by all layers.
"""

from __future__ import annotations

from typing import Callable, Protocol

import numpy as np
import onnx
from onnx import TensorProto

from edge.plans import SplitPlan, Stage

from edge.export.graph.builder import GraphBuilder
from edge.export.graph.decoder import DecoderGraph, LinearEmitter

F32, I64 = TensorProto.FLOAT, TensorProto.INT64


class SplitLinear(Protocol):
    """Optional methods of a LinearEmitter whose output is main path + float side path.

    ``main_path`` emits what runs on the accelerator (e.g. the W8A8 QDQ linear, with the bias);
    ``side_path`` emits the float side path x[:, idx] @ W[:, idx]^T (CPU), or returns None when that
    linear has none. The fused graph calls the emitter itself, which adds the two."""

    def main_path(self, g: GraphBuilder, x: str, name: str, weight: np.ndarray, bias: np.ndarray | None) -> str: ...

    def side_path(self, g: GraphBuilder, x: str, name: str, weight: np.ndarray) -> str | None: ...


def split_emitter(emit: LinearEmitter) -> tuple[LinearEmitter, Callable | None]:
    """(accelerator part, CPU side-path part or None) of a linear emitter."""
    main, side = getattr(emit, "main_path", None), getattr(emit, "side_path", None)
    return (main, side) if main is not None else (emit, None)


def _rename_value(g: GraphBuilder, value: str, name: str) -> str:
    """Rename a node output (producer and consumers) to ``name``, so that a graph output needs no
    Identity node (which an accelerator would otherwise have to run)."""
    producers = [n for n in g.nodes if value in n.output]
    if not producers:  # a graph input or a constant
        return value
    for node in g.nodes:
        for field in (node.input, node.output):
            for j, v in enumerate(field):
                if v == value:
                    field[j] = name
    return name


class SplitGraphs:
    """Builds the split plan's graphs from a DecoderGraph (same weights store, same linear emitter)."""

    def __init__(self, dec: DecoderGraph, chunk: int):
        self.dec, self.cfg, self.C = dec, dec.cfg, chunk
        self.main, self.side = split_emitter(dec.emit_linear)
        self.graphs: dict[str, onnx.ModelProto] = {}

    # ---------------------------------------------------------------- helpers
    def _graph(self, key: str) -> GraphBuilder:
        return GraphBuilder(key, self.dec.store)

    def _outputs(self, g: GraphBuilder, outs: dict[str, tuple[str, list]]) -> onnx.ModelProto:
        for name, (value, shape) in outs.items():
            g.output(_rename_value(g, value, name), name, F32, shape)
        return g.build()

    def _main(self, g: GraphBuilder, x: str, name: str, bias: bool = False) -> str:
        w = self.dec.w
        return self.main(g, x, name, w[name + ".weight"], w[name + ".bias"] if bias else None)

    def _plus_side(self, g: GraphBuilder, y: str, x: str, name: str, used: list) -> str:
        """y + side path of linear ``name`` fed by register ``x`` (noted in ``used``), if it has one."""
        s = self.side(g, x, name, self.dec.w[name + ".weight"]) if self.side else None
        if s is None:
            return y
        used.append(x)
        return g.op("Add", [y, s], name=f"{name}/add_side")

    def _side_inputs(self, g: GraphBuilder, used: list, shapes: dict[str, list]) -> None:
        for reg in dict.fromkeys(used):
            g.input(reg, F32, shapes[reg])

    # ---------------------------------------------------------------- stages
    def pre(self) -> onnx.ModelProto:
        cfg, C = self.cfg, self.C
        g = self._graph("split.pre")
        x = g.input("inputs_embeds", F32, [1, C, cfg.hidden_size])
        h = g.op("Reshape", [x, g.const("shape_hidden", np.array([C, cfg.hidden_size], np.int64))], name="flatten_tokens")
        xn = self.dec.rms_norm(g, h, "model.layers.0.input_layernorm")
        return self._outputs(g, {"h": (h, [C, cfg.hidden_size]), "x": (xn, [C, cfg.hidden_size])})

    def linears(self, key: str, i: int, x_in: str, in_dim: int, names: dict[str, tuple[str, int, bool]]):
        g = self._graph(key)
        x = g.input(x_in, F32, [self.C, in_dim])
        outs = {out: (self._main(g, x, f"model.layers.{i}.{lin}", bias), [self.C, dim])
                for out, (lin, dim, bias) in names.items()}
        return self._outputs(g, outs)

    def attn(self, i: int, key: str):
        cfg, C, dec = self.cfg, self.C, self.dec
        nh, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        g = self._graph(key)
        p, used = f"model.layers.{i}.self_attn", []
        q = self._plus_side(g, g.input("q", F32, [C, nh * hd]), "x", f"{p}.q_proj", used)
        k = self._plus_side(g, g.input("k", F32, [C, kvh * hd]), "x", f"{p}.k_proj", used)
        v = self._plus_side(g, g.input("v", F32, [C, kvh * hd]), "x", f"{p}.v_proj", used)
        start = g.input("start", I64, [1])
        g.input("past_key", F32, ["past", kvh, hd])
        g.input("past_value", F32, ["past", kvh, hd])
        self._side_inputs(g, used, {"x": [C, cfg.hidden_size]})
        cos, sin, mask = dec.rope_and_mask(g, C, start, "past_key")
        ctx, key_out, value_out = dec.attend(g, q, k, v, i, C, cos, sin, mask, "past_key", "past_value")
        return self._outputs(g, {"ctx": (ctx, [C, nh * hd]), "key": (key_out, [C, kvh, hd]),
                                 "value": (value_out, [C, kvh, hd])}), bool(used)

    def residual(self, key: str, delta: str, lin: str, side_reg: str, side_dim: int, norm: str):
        """h_out = h + delta (+ side path of ``lin``); x = norm(h_out)."""
        H, C = self.cfg.hidden_size, self.C
        g, used = self._graph(key), []
        h = g.input("h", F32, [C, H])
        d = self._plus_side(g, g.input(delta, F32, [C, H]), side_reg, lin, used)
        self._side_inputs(g, used, {side_reg: [C, side_dim]})
        h_out = g.op("Add", [h, d], name=f"{key}/residual")
        return self._outputs(g, {"h_out": (h_out, [C, H]), "x": (self.dec.rms_norm(g, h_out, norm), [C, H])})

    def act(self, i: int, key: str):
        F, C = self.cfg.intermediate_size, self.C
        g, used, p = self._graph(key), [], f"model.layers.{i}.mlp"
        gate = self._plus_side(g, g.input("gate", F32, [C, F]), "x", f"{p}.gate_proj", used)
        up = self._plus_side(g, g.input("up", F32, [C, F]), "x", f"{p}.up_proj", used)
        self._side_inputs(g, used, {"x": [C, self.cfg.hidden_size]})
        a = g.op("Mul", [gate, g.op("Sigmoid", [gate], name=f"{p}/sigmoid")], name=f"{p}/silu")
        return self._outputs(g, {"a": (g.op("Mul", [a, up], name=f"{p}/gated"), [C, F])}), bool(used)

    def head(self) -> onnx.ModelProto:
        cfg = self.cfg
        g = self._graph("split.head")
        x = g.input("x", F32, ["rows", cfg.hidden_size])
        logits = self.dec.lm_head(g, x)  # as the fused graph has it (float, or the int8 token rows)
        logits = g.op("Reshape", [logits, g.const("shape_logits", np.array([1, -1, cfg.vocab_size], np.int64))],
                      name="logits_3d")
        return self._outputs(g, {"logits": (logits, [1, "rows", cfg.vocab_size])})

    # ---------------------------------------------------------------- plan
    def _per_layer(self, name: str, build: Callable[[int, str], tuple[onnx.ModelProto, bool]]) -> tuple[str, ...]:
        """Graphs of a weightless CPU stage: one shared file unless some layer carries a side path."""
        built = [build(i, f"split.{name}.{i}") for i in range(self.cfg.num_layers)]
        if not any(side for _, side in built):
            self.graphs[f"split.{name}"] = build(0, f"split.{name}")[0]
            return (f"split.{name}",)
        for i, (proto, _) in enumerate(built):
            self.graphs[f"split.{name}.{i}"] = proto
        return tuple(f"split.{name}.{i}" for i in range(self.cfg.num_layers))

    def _layers(self, name: str, build: Callable[[int, str], onnx.ModelProto]) -> tuple[str, ...]:
        keys = tuple(f"split.{name}.{i}" for i in range(self.cfg.num_layers))
        for i, key in enumerate(keys):
            self.graphs[key] = build(i, key)
        return keys

    def build(self) -> tuple[dict[str, onnx.ModelProto], SplitPlan]:
        cfg = self.cfg
        H, F, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
        D, K, bias = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim, cfg.attention_bias
        self.graphs["split.pre"] = self.pre()
        self.graphs["split.head"] = self.head()
        nxt = lambda i: f"model.layers.{i + 1}.input_layernorm" if i + 1 < L else "model.norm"  # noqa: E731
        qkv = self._layers("qkv", lambda i, k: self.linears(k, i, "x", H, {
            "q": ("self_attn.q_proj", D, bias), "k": ("self_attn.k_proj", K, bias), "v": ("self_attn.v_proj", K, bias)}))
        attn = self._per_layer("attn", self.attn)
        o = self._layers("o_proj", lambda i, k: self.linears(k, i, "ctx", D, {"o": ("self_attn.o_proj", H, False)}))
        post_attn = self._layers("post_attn", lambda i, k: self.residual(
            k, "o", f"model.layers.{i}.self_attn.o_proj", "ctx", D, f"model.layers.{i}.post_attention_layernorm"))
        gate_up = self._layers("gate_up", lambda i, k: self.linears(k, i, "x", H, {
            "gate": ("mlp.gate_proj", F, False), "up": ("mlp.up_proj", F, False)}))
        act = self._per_layer("act", self.act)
        down = self._layers("down", lambda i, k: self.linears(k, i, "a", F, {"d": ("mlp.down_proj", H, False)}))
        post_mlp = self._layers("post_mlp", lambda i, k: self.residual(
            k, "d", f"model.layers.{i}.mlp.down_proj", "a", F, nxt(i)))
        same = lambda *names: {n: n for n in names}  # noqa: E731
        stages = (
            Stage("pre", "cpu", "chunk", ("split.pre",), {"inputs_embeds": "@embeds"}, same("h", "x")),
            Stage("qkv", "accel", "layer", qkv, same("x"), same("q", "k", "v")),
            Stage("attn", "cpu", "layer", attn,
                  {**same("q", "k", "v", "x"), "start": "@start", "past_key": "@past_key", "past_value": "@past_value"},
                  {"ctx": "ctx", "key": "@key", "value": "@value"}, cross_chunk=True),
            Stage("o_proj", "accel", "layer", o, same("ctx"), same("o")),
            Stage("post_attn", "cpu", "layer", post_attn, same("h", "o", "ctx"), {"h_out": "h", "x": "x"}),
            Stage("gate_up", "accel", "layer", gate_up, same("x"), same("gate", "up")),
            Stage("act", "cpu", "layer", act, same("gate", "up", "x"), same("a")),
            Stage("down", "accel", "layer", down, same("a"), same("d")),
            Stage("post_mlp", "cpu", "layer", post_mlp, same("h", "d", "a"), {"h_out": "h", "x": "x"}),
            Stage("head", "cpu", "chunk", ("split.head",), same("x"), {"logits": "@logits"}),
        )
        return self.graphs, SplitPlan(self.C, stages, side_paths=self.side is not None)


def build_split(dec: DecoderGraph, chunk: int) -> tuple[dict[str, onnx.ModelProto], SplitPlan]:
    """All split-plan graphs (key -> model; file = key + '.onnx') and the plan record."""
    return SplitGraphs(dec, chunk).build()
