"""LLaMA-style decoders (SmolLM2, LLaMA 2/3 without rope scaling)."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from edge.config import DecoderConfig
from edge.errors import UnsupportedModelError

from edge.export.families import Family, register


def rope_theta(cfg: dict[str, Any]) -> float:
    # transformers 5.x writes rope_parameters: {rope_theta: ...}; 4.x reads only rope_theta.
    params = cfg.get("rope_parameters") or {}
    theta = cfg.get("rope_theta", params.get("rope_theta"))
    return float(theta if theta is not None else 10000.0)


def check_rope_scaling(cfg: dict[str, Any]) -> None:
    scaling = cfg.get("rope_scaling") or {}
    params = cfg.get("rope_parameters") or {}
    kind = scaling.get("rope_type", scaling.get("type")) or params.get("rope_type", "default")
    if kind not in ("default", None):
        raise UnsupportedModelError(f"config.json: rope scaling {kind!r} is not supported (only plain RoPE)")


def decoder_config(cfg: dict[str, Any], special: dict[str, Any], attention_bias: bool | None = None) -> DecoderConfig:
    check_rope_scaling(cfg)
    act = cfg.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"config.json: hidden_act {act!r} is not supported (only silu)")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    eos = special.get("eos_token_ids", cfg.get("eos_token_id"))
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return DecoderConfig(
        architecture=cfg["architectures"][0],
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        vocab_size=int(cfg["vocab_size"]),
        rope_theta=rope_theta(cfg),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", False)) if attention_bias is None else attention_bias,
        bos_token_id=special.get("bos_token_id", cfg.get("bos_token_id")),
        eos_token_ids=tuple(int(e) for e in eos),
    )


def sanitize(weights: Mapping[str, np.ndarray], cfg: DecoderConfig) -> dict[str, np.ndarray]:
    """HF names, float32; drop what the graphs do not use (rotary caches, a tied lm_head copy)."""
    out = {k: np.asarray(v, dtype=np.float32) for k, v in weights.items() if "rotary_emb" not in k}
    if cfg.tie_word_embeddings:
        out.pop("lm_head.weight", None)
    missing = [n for n in expected_names(cfg) if n not in out]
    if missing:
        raise UnsupportedModelError(f"weights: {len(missing)} tensors missing, e.g. {missing[:3]}")
    return out


def expected_names(cfg: DecoderConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    if not cfg.tie_word_embeddings:
        names.append("lm_head.weight")
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "post_attention_layernorm.weight"]
        names += [p + f"self_attn.{n}_proj.weight" for n in "qkvo"]
        names += [p + f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
        if cfg.attention_bias:
            names += [p + f"self_attn.{n}_proj.bias" for n in "qkv"]
    return names


FAMILY = register(Family("llama", ("LlamaForCausalLM",), decoder_config, sanitize))
