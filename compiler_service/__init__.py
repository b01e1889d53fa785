"""Compiler service: checkpoint → optimized ONNX build in the shared store."""
