"""Model families, one small module each, found by the config's architecture name."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np

from edge.config import DecoderConfig
from edge.errors import UnsupportedModelError

if TYPE_CHECKING:
    from edge.vision import VisionConfig

    from edge.export.sources import SourceModel


@dataclass(frozen=True)
class Family:
    name: str
    architectures: tuple[str, ...]
    config: Callable[[dict[str, Any], dict[str, Any]], DecoderConfig]  # (hf_config, special_tokens)
    sanitize: Callable[[Mapping[str, np.ndarray], DecoderConfig], dict[str, np.ndarray]]
    # multimodal families: (source, decoder config) -> the vision record; weights keep their HF names
    vision: "Callable[[SourceModel, DecoderConfig], VisionConfig] | None" = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
    for arch in family.architectures:
        FAMILIES[arch] = family
    return family


def family_for(architecture: str) -> Family:
    from edge.export.families import idefics3, llama, qwen2  # noqa: F401  (registration)

    if architecture not in FAMILIES:
        raise UnsupportedModelError(
            f"architecture {architecture!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    return FAMILIES[architecture]
