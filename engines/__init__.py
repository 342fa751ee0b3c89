"""Prediction system: one `Engine` per runtime (ONNX Runtime, TorchScript, later TensorRT)."""
