"""Llama 4 text models → one ONNX Runtime graph, built from safetensors without torch."""
