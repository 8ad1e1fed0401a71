"""The exporter: model sources -> calibrated, quantized ONNX graphs -> bundle. Heavy deps live here."""
