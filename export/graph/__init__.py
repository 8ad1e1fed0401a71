"""ONNX graph construction from weight arrays (no tracing)."""
