"""Weight sources: where a model to export comes from (HF folder, GGUF file, built-in alias).

Every source yields a :class:`SourceModel` with Hugging Face tensor names and a config.json-style
dict, so model families never care where the weights came from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edge.errors import ModelSourceError


@dataclass(frozen=True)
class SourceModel:
    hf_config: dict[str, Any]  # config.json contents (architectures, sizes, rope_theta, ...)
    weights: Mapping[str, np.ndarray]  # HF tensor names -> float32 arrays
    tokenizer_json: str  # a `tokenizers` JSON document
    chat_template: str | None
    identity: dict[str, Any]  # kind, name, path, size/sha256: recorded in the manifest
    special_tokens: dict[str, Any] = field(default_factory=dict)  # bos_token_id, eos_token_ids
    # other JSON files of the folder a family may need, by file name (preprocessor_config.json, ...)
    extra_configs: dict[str, Any] = field(default_factory=dict)
    # a GGUF source's block-quantized tensors as stored (HF names -> export.quant.blocks.Blocks),
    # so the CPU plan's block weights can be the file's own instead of a second rounding
    blocks: Mapping[str, Any] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        archs = self.hf_config.get("architectures") or [""]
        return archs[0]


# alias -> loader(); filled by the modules below
ALIASES: dict[str, Callable[[], SourceModel]] = {}


def peek_architecture(model: str | Path) -> str | None:
    """The architecture named by an HF folder's config.json, without loading weights (None for
    GGUF files, aliases and anything unreadable: load_source reports those properly)."""
    import json

    config = Path(model) / "config.json"
    try:
        return (json.loads(config.read_text(encoding="utf-8")).get("architectures") or [None])[0]
    except (OSError, ValueError, AttributeError):
        return None


def load_source(model: str | Path) -> SourceModel:
    """Resolve MODEL: a built-in alias, a .gguf file, or a Hugging Face folder."""
    from edge.export.sources import gguf_file, hf_folder  # noqa: F401  (register aliases)

    key = str(model)
    if key in ALIASES:
        return ALIASES[key]()
    path = Path(model)
    if not path.exists():
        raise ModelSourceError(
            f"model {key!r}: no such file or folder, and not a built-in alias "
            f"(aliases: {', '.join(sorted(ALIASES))})")
    if path.is_dir():
        return hf_folder.load_hf_folder(path)
    if path.suffix.lower() == ".gguf":
        return gguf_file.load_gguf(path)
    raise ModelSourceError(
        f"model {key!r}: expected a Hugging Face folder (config.json + *.safetensors) or a .gguf file")
