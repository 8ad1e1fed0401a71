"""Qwen2 decoders: LLaMA layout plus biases on the q/k/v projections."""

from __future__ import annotations

from typing import Any

from edge.config import DecoderConfig
from edge.errors import UnsupportedModelError

from edge.export.families import Family, register
from edge.export.families.llama import decoder_config, sanitize


def qwen2_config(cfg: dict[str, Any], special: dict[str, Any]) -> DecoderConfig:
    if cfg.get("use_sliding_window"):
        raise UnsupportedModelError("config.json: use_sliding_window=true is not supported for Qwen2")
    return decoder_config(cfg, special, attention_bias=True)


FAMILY = register(Family("qwen2", ("Qwen2ForCausalLM",), qwen2_config, sanitize))
