"""A manifest against its own graphs: the sizes the runtime feeds (chunk length, hidden size, KV heads,
head size, layers, vocabulary, context) must be the graphs' input/output shapes, checked before
anything runs (otherwise onnxruntime fails mid-generation with InvalidArgument).

The graph specs in the manifest are checked against the ONNX files themselves when their sessions
open (``runtime/bundle.check_session_io``); together the two checks tie the manifest's numbers to
the graphs. A symbolic (named) axis agrees with any size; a fixed one must be the size implied.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Sequence

from edge.errors import BundleError

if TYPE_CHECKING:
    from edge.manifest import GraphSpec, Manifest, TensorSpec

_PAST = re.compile(r"past_(key|value)_(\d+)$")
_PRESENT = re.compile(r"present_(key|value)_(\d+)$")


def _agree(t: "TensorSpec", expected: Sequence,  # of (size, manifest field) or None (any size)
            graph: str, kind: str, where: str) -> None:
    shape = list(t.shape)
    ok = len(shape) == len(expected) and all(
        e is None or isinstance(s, str) or s == e[0] for s, e in zip(shape, expected))
    if ok:
        return
    want = ["*" if e is None else e[0] for e in expected]
    fields = ", ".join(dict.fromkeys(f"{e[1]} {e[0]}" for e in expected if e is not None))
    raise BundleError(f"{where}: graphs.{graph} {kind} {t.name} has shape {shape}, but {fields} make {want}; the "
                      f"manifest does not describe this graph (edited, or from another export)")


def check_graphs_match(m: "Manifest", where: str) -> None:
    cfg = m.model
    H, V = (cfg.hidden_size, "model.hidden_size"), (cfg.vocab_size, "model.vocab_size")
    C, T = (m.chunk_length, "chunk_length"), (m.max_context, "max_context")
    KV, D = (cfg.num_kv_heads, "model.num_kv_heads"), (cfg.head_dim, "model.head_dim")
    one = (1, "batch")
    rows = {"prefill": C, "decode": (1, "one decode token")}
    for key in ("prefill", "decode"):
        spec = m.graphs.get(key)
        if spec is None:
            continue
        for t in spec.inputs:
            if t.name == "inputs_embeds":
                _agree(t, (one, C, H), key, "input", where)
            elif t.name == "input_ids":
                _agree(t, (one, (1, "one decode token")), key, "input", where)
        for t in spec.outputs:
            if t.name == "logits":
                _agree(t, (one, None, V), key, "output", where)
        _check_cache_io(spec, key, cfg.num_layers, (T, KV, D), rows[key], where)
    embed = m.graphs.get("embed")
    for t in embed.outputs if embed else ():
        if t.name == "inputs_embeds":
            _agree(t, (one, None, H), "embed", "output", where)
    if m.plans.cpu is not None:
        _check_cpu(m, where, one, H, V, T, KV, D)
    if m.plans.split is not None:
        if m.plans.split.chunk_length != m.chunk_length:
            raise BundleError(f"{where}: plans.split.chunk_length {m.plans.split.chunk_length} but chunk_length "
                              f"{m.chunk_length}")
        _check_split(m, where, one, C, H, V, T, KV, D)


def _check_cache_io(spec: "GraphSpec", key: str, layers: int, past_dims: tuple, rows: tuple, where: str) -> None:
    seen = set()
    for t in spec.inputs:
        if (match := _PAST.match(t.name)):
            seen.add(int(match.group(2)))
            _agree(t, past_dims, key, "input", where)
    for t in spec.outputs:
        if _PRESENT.match(t.name):
            _agree(t, (rows, *past_dims[1:]), key, "output", where)
    if seen and seen != set(range(layers)):
        raise BundleError(f"{where}: model.num_layers {layers} but graphs.{key} has a KV cache for "
                          f"{len(seen)} layers (past_key_{min(seen)}..past_key_{max(seen)})")


def _check_cpu(m: "Manifest", where: str, one, H, V, T, KV, D) -> None:
    """The CPU plan's one graph: any token count, the cache one [1, KV, max_context, D] buffer per
    layer and kind, bound as past and present alike."""
    key = m.plans.cpu.graph
    spec = m.graphs[key]
    cache = (one, KV, T, D)
    for t in spec.inputs:
        if t.name == "inputs_embeds":
            _agree(t, (one, None, H), key, "input", where)
    for t in spec.outputs:
        if t.name == "logits":
            _agree(t, (one, None, V), key, "output", where)
    _check_cache_io(spec, key, m.model.num_layers, cache, one, where)


def _check_split(m: "Manifest", where: str, one, C, H, V, T, KV, D) -> None:
    q = (m.model.num_heads * m.model.head_dim, "model.num_heads x head_dim")
    for stage in m.plans.split.stages:
        for graph in dict.fromkeys(stage.graphs):
            spec = m.graphs[graph]
            tensors = {t.name: t for t in spec.inputs}
            for name, reg in stage.inputs.items():
                t = tensors.get(name)
                if t is None:
                    continue
                if reg == "@embeds":
                    _agree(t, (one, C, H), graph, "input", where)
                elif reg in ("@past_key", "@past_value"):
                    _agree(t, (None, KV, D), graph, "input", where)
                elif stage.cross_chunk and name == "q":
                    _agree(t, (C, q), graph, "input", where)
            outs = {t.name: t for t in spec.outputs}
            for name, reg in stage.outputs.items():
                t = outs.get(name)
                if t is None:
                    continue
                if reg in ("@key", "@value"):
                    _agree(t, (C, KV, D), graph, "output", where)
                elif reg == "@logits":
                    _agree(t, (one, None, V), graph, "output", where)
