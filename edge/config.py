"""Frozen configuration records shared by the exporter (writes them) and the runtime (reads them)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edge.errors import BundleError


@dataclass(frozen=True)
class DecoderConfig:
    """A LLaMA-style decoder, as the graphs need it. Family-specific switches are plain fields."""

    architecture: str
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool = False  # Qwen2: q/k/v projections carry a bias
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
                     "vocab_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("rope_theta", "rms_norm_eps"):
            if not 0 < getattr(self, name) < float("inf"):  # also refuses NaN (json accepts NaN/Infinity)
                raise ValueError(f"{name} must be a finite number > 0, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        for name, ids in (("bos_token_id", () if self.bos_token_id is None else (self.bos_token_id,)),
                          ("eos_token_ids", self.eos_token_ids)):
            bad = [i for i in ids if not 0 <= i < self.vocab_size]
            if bad:
                raise ValueError(f"{name}: expected token ids in [0, {self.vocab_size}) (vocab_size), got {bad}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "model") -> "DecoderConfig":
        return _from_dict(cls, d, where)


KV_CACHES = ("auto", "fp32", "fp16")  # ExportOptions.kv_cache


@dataclass(frozen=True)
class ExportOptions:
    """What the user chose at export time (recorded in the manifest)."""

    chunk_length: int = 128
    max_context: int = 2048
    # prefill plans to emit (edge.plans): cpu (boards without an accelerator), fused, split (needs fused)
    plans: tuple[str, ...] = ("cpu", "fused", "split")
    vision_weights: str = "fp32"  # multimodal bundles: the vision graph's linears, fp32 or int8 (edge.vision)
    # the CPU plan's KV cache element type: fp32, fp16 (half the memory) or auto: fp16 with quantized
    # CPU linears (no measurable perplexity change, docs/cpu_plan.md), fp32 for a float bundle
    kv_cache: str = "auto"

    def cpu_kv(self, quantized: bool) -> str:
        """The CPU plan's KV cache type (auto resolved) for quantized or float CPU linears."""
        if self.kv_cache != "auto":
            return self.kv_cache
        return "fp16" if quantized else "fp32"

    def __post_init__(self) -> None:
        from edge.vision import VISION_WEIGHTS

        if self.vision_weights not in VISION_WEIGHTS:
            raise ValueError(f"vision weights must be one of {', '.join(VISION_WEIGHTS)}, got {self.vision_weights!r}")
        unknown = set(self.plans) - {"cpu", "fused", "split"}
        if unknown or not self.plans or ("split" in self.plans and "fused" not in self.plans):
            raise ValueError(f"plans: a comma-separated choice of cpu, fused, split (split needs fused), "
                             f"got {','.join(self.plans) or 'none'}")
        if self.kv_cache not in KV_CACHES:
            raise ValueError(f"KV cache must be one of {', '.join(KV_CACHES)}, got {self.kv_cache!r}")
        if self.chunk_length < 1:
            raise ValueError(f"chunk length must be >= 1, got {self.chunk_length}")
        if self.max_context < self.chunk_length:
            raise ValueError(f"max context {self.max_context} is shorter than the chunk length {self.chunk_length}")
        from edge.budget import MAX_CONTEXT

        if self.max_context > MAX_CONTEXT:
            raise ValueError(f"--context: expected at most {MAX_CONTEXT} positions (edge's limit), got {self.max_context}")


_TYPES = {"int": int, "float": (int, float), "bool": bool, "str": str}


def _from_dict(cls, d: dict[str, Any], where: str):
    """Build a frozen dataclass from JSON, checking every field's presence and type."""
    if not isinstance(d, dict):
        raise BundleError(f"{where}: expected an object, got {type(d).__name__}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in d:
            if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                continue
            raise BundleError(f"{where}.{f.name}: missing")
        v = d[f.name]
        t = str(f.type)
        if t.startswith("tuple"):
            if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) for x in v):
                raise BundleError(f"{where}.{f.name}: expected a list of integers, got {v!r}")
            v = tuple(v)
        else:
            base = t.split("|")[0].strip()
            ok = v is None if "None" in t and v is None else (
                isinstance(v, _TYPES[base]) and not (base != "bool" and isinstance(v, bool)))
            if not ok:
                raise BundleError(f"{where}.{f.name}: expected {t}, got {type(v).__name__} {v!r}")
            if base == "float":
                v = float(v)
        kwargs[f.name] = v
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise BundleError(f"{where}: {e}") from None
