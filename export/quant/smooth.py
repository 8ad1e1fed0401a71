"""SmoothQuant-style migration, folded into the weights (static, so an NPU runs it as is).

A group's input x is divided per channel by s and its consumers' weight columns multiplied by s,
which leaves x @ W^T unchanged in float. The division is folded into whatever produces x:
- q/k/v input   <- input_layernorm weight
- gate/up input <- post_attention_layernorm weight
- o_proj input  <- v_proj rows: the context is probs @ V, so scaling V's channel scales it. With
  grouped-query attention a V row serves every query head of its group, so s is tied across them.
  The V cache then holds V / s: decode must apply the same migration (see changes_cache).
- down_proj input <- up_proj rows (x = silu(gate) * up)
The output projection's input is not smoothed: its own smoothed int8 copy (the tied table cannot
take the scales) measured worse than no smoothing (docs/quantization.md).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from edge.export.quant.reference import smooth_scales

# consumer (first linear of a group) suffix -> (producer tensor suffix, kind)
_PRODUCERS = {
    "self_attn.q_proj": ("input_layernorm.weight", "vector"),
    "mlp.gate_proj": ("post_attention_layernorm.weight", "vector"),
    "self_attn.o_proj": ("self_attn.v_proj", "kv_rows"),
    "mlp.down_proj": ("mlp.up_proj", "rows"),
}


def producer(first_linear: str) -> tuple[str, str] | None:
    """(tensor name, kind) that absorbs 1/s for the group led by ``first_linear``; None if none."""
    parts = first_linear.split(".")
    prefix, rest = ".".join(parts[:3]), ".".join(parts[3:])  # "model.layers.i", "mlp.down_proj"
    if not first_linear.startswith("model.layers.") or rest not in _PRODUCERS:
        return None
    tensor, kind = _PRODUCERS[rest]
    return f"{prefix}.{tensor}", kind


def _groups(n_channels: int, v_rows: int, head_dim: int) -> tuple[int, int]:
    kv_heads = v_rows // head_dim
    return kv_heads, n_channels // (kv_heads * head_dim)


def scales(first_linear: str, act_absmax: np.ndarray, weight_absmax: np.ndarray, alpha: float,
           weights: Mapping[str, np.ndarray], head_dim: int) -> np.ndarray:
    """Per-channel s for the group; for o_proj one value per (kv head, dim), shared by its query heads."""
    found = producer(first_linear)
    if found is None or found[1] != "kv_rows":
        return smooth_scales(act_absmax, weight_absmax, alpha)
    kvh, groups = _groups(len(act_absmax), len(weights[found[0] + ".weight"]), head_dim)
    pool = lambda v: np.asarray(v).reshape(kvh, groups, head_dim).max(1)
    s = smooth_scales(pool(act_absmax).ravel(), pool(weight_absmax).ravel(), alpha).reshape(kvh, 1, head_dim)
    return np.broadcast_to(s, (kvh, groups, head_dim)).reshape(-1).astype(np.float32)


def apply(weights: Mapping[str, np.ndarray], linears: tuple[str, ...], s: np.ndarray,
          head_dim: int) -> dict[str, np.ndarray]:
    """The weights after migrating ``s`` into the group's consumers (copy of the touched arrays)."""
    found = producer(linears[0])
    if found is None:
        raise ValueError(f"no producer to fold smoothing into for {linears[0]}")
    name, kind = found
    s = np.asarray(s, np.float32)
    out = dict(weights)
    for lin in linears:
        out[lin + ".weight"] = (weights[lin + ".weight"] * s[None, :]).astype(np.float32)
    if kind == "vector":
        out[name] = (weights[name] / s).astype(np.float32)
        return out
    if kind == "kv_rows":  # tied across each group's query heads: one value per V row
        kvh, groups = _groups(len(s), len(weights[name + ".weight"]), head_dim)
        s = s.reshape(kvh, groups, head_dim)[:, 0, :].reshape(-1)
    out[name + ".weight"] = (weights[name + ".weight"] / s[:, None]).astype(np.float32)
    if name + ".bias" in weights:
        out[name + ".bias"] = (weights[name + ".bias"] / s).astype(np.float32)
    return out


def changes_cache(first_linear: str) -> bool:
    """Whether smoothing this group changes what the KV cache holds (o_proj's: V / s). Every graph
    sharing the cache must then apply it too, whatever else it quantizes differently."""
    found = producer(first_linear)
    return found is not None and found[1] == "kv_rows"
