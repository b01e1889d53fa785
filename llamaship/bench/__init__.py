"""`llamaship bench`: Llamaship vs PyTorch vs direct ONNX Runtime, against the bandwidth limit."""

from llamaship.bench.runner import main

__all__ = ["main"]
