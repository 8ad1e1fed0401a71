"""The vision side of a multimodal bundle, as the manifest records it (numpy-free, stdlib only).

One record holds everything the runtime needs to turn an image into prompt tokens and tile
pixels exactly as the model's Hugging Face processor does (Idefics3 / SmolVLM layout), plus the
encoder's shape facts for people reading the manifest. Nothing is derived from file names.
``linear_weights`` records how the vision graph's linears store their weights (the graph itself
carries the form, so the runtime needs nothing else): fp32, or int8 (symmetric, one scale per
output channel, float activations). Bundles written before the field existed read as fp32.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from edge.errors import BundleError

VISION_WEIGHTS = ("fp32", "int8")  # forms of the vision graph's linears (encoder q/k/v/out, fc1/fc2, connector)


@dataclass(frozen=True)
class VisionConfig:
    # encoder (SigLIP) + connector
    architecture: str
    image_size: int  # the encoder's tile side in pixels (static graph input)
    patch_size: int
    num_channels: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float
    hidden_act: str
    scale_factor: int  # pixel shuffle factor of the connector
    text_hidden_size: int
    tokens_per_tile: int  # <image> tokens one tile becomes (processor's image_seq_len)
    tile_batch: int  # tiles per run of the static vision graph
    # preprocessing (Idefics3ImageProcessor settings)
    do_convert_rgb: bool
    do_resize: bool
    longest_edge: int  # size["longest_edge"]: an image is first resized so its longest edge is this
    do_image_splitting: bool
    max_image_size: int  # max_image_size["longest_edge"]: tile side of the split (== image_size)
    resample: int  # PIL resampling filter number (1 = LANCZOS)
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: tuple[float, ...]
    image_std: tuple[float, ...]
    # prompt layout (Idefics3Processor)
    image_token: str
    image_token_id: int
    fake_image_token: str
    fake_image_token_id: int
    global_image_token: str
    global_image_token_id: int
    # weights of the vision graph's linears: one of VISION_WEIGHTS
    linear_weights: str = "fp32"

    def __post_init__(self) -> None:
        if self.linear_weights not in VISION_WEIGHTS:
            raise ValueError(f"linear_weights must be one of {', '.join(VISION_WEIGHTS)}, got {self.linear_weights!r}")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        side = self.image_size // self.patch_size
        if side % self.scale_factor:
            raise ValueError(f"{side} patches per side is not a multiple of scale_factor {self.scale_factor}")
        if self.tokens_per_tile != (side // self.scale_factor) ** 2:
            raise ValueError(f"tokens_per_tile {self.tokens_per_tile} != ({side} / {self.scale_factor})^2")
        if self.max_image_size != self.image_size:
            raise ValueError(f"processor tile size {self.max_image_size} differs from the encoder's image_size "
                             f"{self.image_size}; the static vision graph takes full tiles only")
        if len(self.image_mean) != self.num_channels or len(self.image_std) != self.num_channels:
            raise ValueError(f"image_mean/image_std need {self.num_channels} values")
        if any(s == 0 for s in self.image_std):
            raise ValueError("image_std has a zero")
        if self.tile_batch < 1 or self.longest_edge < 1 or self.rescale_factor <= 0:
            raise ValueError("tile_batch, longest_edge and rescale_factor must be positive")

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["image_mean"], d["image_std"] = list(self.image_mean), list(self.image_std)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "vision") -> "VisionConfig":
        if not isinstance(d, dict):
            raise BundleError(f"{where}: expected an object, got {type(d).__name__}")
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in d:
                if f.default is not dataclasses.MISSING:  # a field newer than the bundle: its default
                    continue
                raise BundleError(f"{where}.{f.name}: missing")
            v, t = d[f.name], str(f.type)
            if t.startswith("tuple"):
                if not isinstance(v, list) or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
                    raise BundleError(f"{where}.{f.name}: expected a list of numbers, got {v!r:.80}")
                v = tuple(float(x) for x in v)
            elif t == "bool":
                if not isinstance(v, bool):
                    raise BundleError(f"{where}.{f.name}: expected true/false, got {v!r:.80}")
            elif t == "int":
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise BundleError(f"{where}.{f.name}: expected an integer >= 0, got {v!r:.80}")
            elif t == "float":
                if not isinstance(v, (int, float)) or isinstance(v, bool):
                    raise BundleError(f"{where}.{f.name}: expected a number, got {v!r:.80}")
                v = float(v)
            elif not isinstance(v, str):
                raise BundleError(f"{where}.{f.name}: expected a string, got {v!r:.80}")
            kwargs[f.name] = v
        try:
            return cls(**kwargs)
        except (ValueError, ZeroDivisionError) as e:
            raise BundleError(f"{where}: {e}") from None
