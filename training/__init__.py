"""Training, evaluation and ONNX export for IDML models (needs torch)."""
