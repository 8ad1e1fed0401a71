"""Embedded runtime: numpy + onnxruntime only. ``Model.load(bundle).generate(prompt)``."""

from .model import Model
from .sampling import SamplingParams

__all__ = ["Model", "SamplingParams"]
