"""LLaMA-style decoders (SmolLM2, LLaMA 2/3 without rope scaling)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from edge.config import DecoderConfig
from edge.errors import UnsupportedModelError

from edge.export.checks import ConfigError, cfg_float, cfg_int, cfg_token_ids, check_tensors
from edge.export.families import Family, register


def rope_theta(cfg: dict[str, Any], where: str = "config.json") -> float:
    # transformers 5.x writes rope_parameters: {rope_theta: ...}; 4.x reads only rope_theta.
    params = cfg.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    if cfg.get("rope_theta") is not None:
        return cfg_float(cfg, "rope_theta", where)
    return cfg_float(params, "rope_theta", f"{where} rope_parameters", default=10000.0)


def check_rope_scaling(cfg: dict[str, Any]) -> None:
    scaling = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    if not isinstance(scaling, dict) or not isinstance(params, dict):
        raise UnsupportedModelError("config.json: rope_scaling / rope_parameters: expected objects")
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if kind not in ("default", None):
        raise UnsupportedModelError(f"config.json: rope scaling {kind!r} is not supported (only plain RoPE)")


def decoder_config(cfg: dict[str, Any], special: dict[str, Any], attention_bias: bool | None = None,
                   where: str = "config.json") -> DecoderConfig:
    """Every field read typed and in range (export/checks.py), so a bad config.json is one message."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"{where}: expected a JSON object, got {type(cfg).__name__}")
    check_rope_scaling(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"{where}: hidden_act {act!r} is not supported (only silu)")
    heads = cfg_int(cfg, "num_attention_heads", where)
    hidden = cfg_int(cfg, "hidden_size", where)
    kv = cfg_int(cfg, "num_key_value_heads", where, default=heads)
    if heads % kv:
        raise ConfigError(f"{where}: num_key_value_heads: expected a divisor of num_attention_heads {heads}, got {kv}")
    if cfg.get("head_dim") is None and hidden % heads:
        raise ConfigError(f"{where}: hidden_size {hidden} is not a multiple of num_attention_heads {heads} (and "
                          f"there is no head_dim)")
    vocab = cfg_int(cfg, "vocab_size", where)
    eos = special.get("eos_token_ids", cfg.get("eos_token_id"))
    eos_ids = cfg_token_ids(eos, where, "eos_token_id")
    bos = special.get("bos_token_id", cfg.get("bos_token_id"))
    bos_ids = cfg_token_ids(bos, where, "bos_token_id")
    for key, ids in (("bos_token_id", bos_ids), ("eos_token_id", eos_ids)):
        if any(i >= vocab for i in ids):
            raise ConfigError(f"{where}: {key}: expected ids in [0, {vocab}) (vocab_size), got {ids}")
    arch = cfg.get("architectures")
    return DecoderConfig(
        architecture=arch[0] if isinstance(arch, list) and arch and isinstance(arch[0], str) else "",
        hidden_size=hidden,
        intermediate_size=cfg_int(cfg, "intermediate_size", where),
        num_layers=cfg_int(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=cfg_int(cfg, "head_dim", where, default=hidden // heads),
        vocab_size=vocab,
        rope_theta=rope_theta(cfg, where),
        rms_norm_eps=cfg_float(cfg, "rms_norm_eps", where, default=1e-6),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)) if attention_bias is None else attention_bias,
        bos_token_id=bos_ids[0] if bos_ids else None,
        eos_token_ids=tuple(eos_ids),
    )


def sanitize(weights: Mapping[str, np.ndarray], cfg: DecoderConfig, where: str = "weights") -> dict[str, np.ndarray]:
    """HF names, float32; drop what the graphs do not need by design (rotary caches, a tied lm_head
    copy); then every tensor the config implies must be there with its shape, and nothing else."""
    out = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items() if "rotary_emb" not in k}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    check_tensors(expected_shapes(cfg), out, where, cfg.num_layers, why=shape_sources(cfg))
    return out


def expected_shapes(cfg: DecoderConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a LLaMA-style decoder and the shape its config implies."""
    H, V, I, D = cfg.hidden_size, cfg.vocab_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_heads * D, cfg.num_kv_heads * D
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (V, H)
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (H,), p + "post_attention_layernorm.weight": (H,),
                       p + "self_attn.q_proj.weight": (q, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, q),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I)})
        if cfg.attention_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                           p + "self_attn.v_proj.bias": (kv,)})
    return shapes


def shape_sources(cfg: DecoderConfig) -> dict[str, str]:
    """Which config fields a tensor's shape comes from (for error messages)."""
    heads = f"num_attention_heads {cfg.num_heads} x head_dim {cfg.head_dim}"
    kv = f"num_key_value_heads {cfg.num_kv_heads} x head_dim {cfg.head_dim}"
    out = {}
    for name in expected_shapes(cfg):
        if "embed_tokens" in name or "lm_head" in name:
            out[name] = f"vocab_size {cfg.vocab_size}, hidden_size {cfg.hidden_size}"
        elif "q_proj" in name or "o_proj" in name:
            out[name] = f"{heads}, hidden_size {cfg.hidden_size}"
        elif "k_proj" in name or "v_proj" in name:
            out[name] = f"{kv}, hidden_size {cfg.hidden_size}"
        elif "mlp" in name:
            out[name] = f"intermediate_size {cfg.intermediate_size}, hidden_size {cfg.hidden_size}"
        else:
            out[name] = f"hidden_size {cfg.hidden_size}"
    return out


def expected_names(cfg: DecoderConfig) -> list[str]:
    return list(expected_shapes(cfg))


FAMILY = register(Family("llama", ("LlamaForCausalLM",), decoder_config, sanitize))
