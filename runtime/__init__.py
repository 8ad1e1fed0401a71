"""Embedded runtime: numpy + onnxruntime only. ``Model.load(bundle).generate(prompt)``."""

from edge.runtime.model import Model
from edge.runtime.sampling import SamplingParams

__all__ = ["Model", "SamplingParams"]
