"""Calibration data: sources of samples, streaming observers and collection over ONNX Runtime."""
