"""Quantization: calibration, the per-group plan, the recipe (what each graph's linears get), the
quantized graph emitters and the numpy reference they are tested against (reference.py)."""
