"""Prefill plans recorded in the manifest (``plans`` section): how a prompt chunk runs.

``cpu``: one graph (``graphs.cpu``) with a dynamic token count for prompt chunks and decode steps,
onnxruntime's fused CPU kernels, the KV cache bound in place, dynamically quantized block linears:
what a board without an accelerator runs (runtime/cpu_plan.py).
``fused``: one static-shape graph per chunk (``graphs.prefill``) + a decode graph: the
accelerator method's graphs on one processor.
``split``: per-layer subgraphs shared by all chunks, each with a lane affinity:
``accel`` for the int8 linear blocks, ``cpu`` for the float parts (norms, RoPE, attention against
the KV cache, outlier side paths). A chunk runs its stages in list order, the ``layer`` stages once
per layer; a stage marked ``cross_chunk`` (attention) also waits for the previous chunk's task of
the same layer, whose K/V rows it reads. Those two rules are every dependency there is.

Each stage maps graph inputs/outputs to named per-chunk *registers* (``h``, ``x``, ``q`` ...).
Registers starting with ``@`` are provided by the runtime:
``@embeds`` the chunk's inputs_embeds [1, C, H]; ``@start`` its first position [1];
``@past_key`` / ``@past_value`` the layer's static cache [L, kv_heads, head_dim] (rows at or after
``start`` are masked, as in the fused graph); ``@key`` / ``@value`` rows the
runtime writes into the cache at ``start``; ``@logits`` the result ([1, rows, V], rows chosen by
the runtime: the last real token, or every real token for perplexity).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from edge.errors import BundleError

LANES = ("cpu", "accel")
SCOPES = ("chunk", "layer")
RUNTIME_INPUTS = ("@embeds", "@start", "@past_key", "@past_value")
RUNTIME_OUTPUTS = ("@key", "@value", "@logits")


@dataclass(frozen=True)
class Stage:
    name: str
    lane: str                      # affinity: "cpu" | "accel"
    scope: str                     # "chunk" (once per chunk) | "layer" (once per layer)
    graphs: tuple[str, ...]        # keys of manifest.graphs: one, or one per layer (may repeat)
    inputs: dict[str, str]         # graph input name -> register
    outputs: dict[str, str]        # graph output name -> register
    cross_chunk: bool = False      # waits for the previous chunk's task of the same layer

    def graph(self, layer: int) -> str:
        return self.graphs[0] if len(self.graphs) == 1 else self.graphs[layer]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "lane": self.lane, "scope": self.scope, "graphs": list(self.graphs),
                "inputs": dict(self.inputs), "outputs": dict(self.outputs), "cross_chunk": self.cross_chunk}


@dataclass(frozen=True)
class SplitPlan:
    chunk_length: int
    stages: tuple[Stage, ...]
    side_paths: bool = False       # CPU stages add the linears' float outlier side paths

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "split", "chunk_length": self.chunk_length, "side_paths": self.side_paths,
                "stages": [s.to_dict() for s in self.stages]}


CPU_LINEARS = ("int8", "int4", "int4exact", "fp32", "int8dyn")


@dataclass(frozen=True)
class CpuPlan:
    graph: str = "cpu"          # the decoder (prompt chunks and decode steps)
    embed: str = "cpu_embed"    # token ids -> embeddings, from the same table the head reads
    linears: str = "int8"       # MatMulNBits int8 / int4 blocks, or fp32
    block: int = 32
    chunk: int = 128            # most prompt tokens one call takes (bounds activation memory)
    kv: str = "fp32"            # KV cache element type: fp32 or fp16

    def to_dict(self) -> dict[str, Any]:
        return {"kind": "cpu", "graph": self.graph, "embed": self.embed, "linears": self.linears,
                "block": self.block, "chunk": self.chunk, "kv": self.kv}


@dataclass(frozen=True)
class Plans:
    default: str = "fused"
    split: SplitPlan | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # plans this runtime does not know, kept as read
    cpu: CpuPlan | None = None
    fused: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        return ((("cpu",) if self.cpu else ()) + (("fused",) if self.fused else ()) + (("split",) if self.split else ())
                + tuple(self.extra))

    @property
    def cache_element_bytes(self) -> int:
        """Bytes per KV cache element the bundle's plans may use: 2 only for a CPU plan alone with
        an fp16 cache (the static plans' caches are fp32)."""
        return 2 if self.names == ("cpu",) and self.cpu.kv == "fp16" else 4

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"default": self.default}
        if self.cpu:
            d["cpu"] = self.cpu.to_dict()
        if self.fused:
            d["fused"] = {"kind": "fused", "graph": "prefill"}
        if self.split:
            d["split"] = self.split.to_dict()
        d.update(self.extra)
        return d


def _str_map(d: Any, where: str) -> dict[str, str]:
    if not isinstance(d, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in d.items()):
        raise BundleError(f"{where}: expected an object of names to names")
    return dict(d)


def _stage(d: Any, where: str, num_layers: int, graphs: dict) -> Stage:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object")
    try:
        s = Stage(name=d["name"], lane=d["lane"], scope=d["scope"], graphs=tuple(d["graphs"]),
                  inputs=_str_map(d["inputs"], f"{where}.inputs"), outputs=_str_map(d["outputs"], f"{where}.outputs"),
                  cross_chunk=bool(d.get("cross_chunk", False)))
    except (KeyError, TypeError) as e:
        raise BundleError(f"{where}: missing or malformed field ({e})") from None
    if not isinstance(s.name, str) or s.lane not in LANES or s.scope not in SCOPES:
        raise BundleError(f"{where}: name must be a string, lane one of {LANES}, scope one of {SCOPES}")
    if len(s.graphs) not in (1, num_layers if s.scope == "layer" else 1):
        raise BundleError(f"{where}.graphs: expected 1 graph or one per layer ({num_layers}), got {len(s.graphs)}")
    for g in s.graphs:
        if not isinstance(g, str) or g not in graphs:
            raise BundleError(f"{where}.graphs: {g!r} is not a graph of this bundle")
    for reg in s.inputs.values():
        if reg.startswith("@") and reg not in RUNTIME_INPUTS:
            raise BundleError(f"{where}.inputs: unknown runtime register {reg!r} (known: {RUNTIME_INPUTS})")
    for reg in s.outputs.values():
        if reg.startswith("@") and reg not in RUNTIME_OUTPUTS:
            raise BundleError(f"{where}.outputs: unknown runtime register {reg!r} (known: {RUNTIME_OUTPUTS})")
    return s


def parse_plans(d: Any, where: str, num_layers: int, graphs: dict) -> Plans:
    """Validate a manifest's ``plans`` section (absent = fused only)."""
    if d is None:
        return Plans()
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object")
    split = None
    if "split" in d:
        sd = d["split"]
        if not isinstance(sd, dict) or not isinstance(sd.get("stages"), list) or not sd["stages"]:
            raise BundleError(f"{where}.split.stages: expected a non-empty list")
        stages = tuple(_stage(s, f"{where}.split.stages[{i}]", num_layers, graphs) for i, s in enumerate(sd["stages"]))
        if len({s.name for s in stages}) != len(stages):
            raise BundleError(f"{where}.split.stages: stage names repeat")
        chunk = sd.get("chunk_length")
        if not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 1:
            raise BundleError(f"{where}.split.chunk_length: expected an integer >= 1, got {chunk!r}")
        _check_registers(stages, f"{where}.split")
        split = SplitPlan(chunk, stages, bool(sd.get("side_paths", False)))
    cpu = _cpu(d["cpu"], f"{where}.cpu", graphs) if "cpu" in d else None
    fused = "fused" in d or "cpu" not in d  # bundles from before the CPU plan list no fused entry
    missing = [g for g in ("embed", "prefill", "decode") if fused and g not in graphs]
    if missing:
        raise BundleError(f"{where}.fused: graphs.{missing[0]} missing (the fused plan needs embed, prefill, decode)")
    if split is not None and not fused:
        raise BundleError(f"{where}.split: the split plan needs the fused plan's decode and embed graphs")
    extra = {k: v for k, v in d.items() if k not in ("default", "fused", "split", "cpu")}
    plans = Plans(default=d.get("default", "fused"), split=split, extra=extra, cpu=cpu, fused=fused)
    if plans.default not in plans.names:
        raise BundleError(f"{where}.default: {plans.default!r} is not one of the bundle's plans {plans.names}")
    return plans


def _cpu(d: Any, where: str, graphs: dict) -> CpuPlan:
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object")
    try:
        plan = CpuPlan(graph=d["graph"], embed=d["embed"], linears=d["linears"], block=d["block"], chunk=d["chunk"],
                       kv=d.get("kv", "fp32"))
    except KeyError as e:
        raise BundleError(f"{where}: missing field {e}") from None
    for key in ("graph", "embed", "linears", "kv"):
        if not isinstance(getattr(plan, key), str):
            raise BundleError(f"{where}.{key}: expected a string, got {getattr(plan, key)!r}")
    for key in ("graph", "embed"):
        if getattr(plan, key) not in graphs:
            raise BundleError(f"{where}.{key}: {getattr(plan, key)!r} is not a graph of this bundle")
    if plan.linears not in CPU_LINEARS:
        raise BundleError(f"{where}.linears: expected one of {CPU_LINEARS}, got {plan.linears!r}")
    if plan.kv not in ("fp32", "fp16"):
        raise BundleError(f"{where}.kv: expected fp32 or fp16, got {plan.kv!r}")
    for key in ("block", "chunk"):
        v = getattr(plan, key)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise BundleError(f"{where}.{key}: expected an integer >= 1, got {v!r}")
    return plan


def _check_registers(stages: tuple[Stage, ...], where: str) -> None:
    """Every register a stage reads was written by an earlier stage (in chunk order)."""
    written: set[str] = set()
    for s in stages:
        for reg in s.inputs.values():
            if not reg.startswith("@") and reg not in written:
                raise BundleError(f"{where}: stage {s.name!r} reads register {reg!r} before any stage writes it")
        written.update(s.outputs.values())
