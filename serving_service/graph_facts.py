"""What the decode loop must know about a build's graph that its genai_config does not say."""

from __future__ import annotations

from pathlib import Path


def pads_rows_safely(build_dir: str | Path, provider: str | None) -> bool:
    """Whether rows of different prompt lengths may share a right-padded batch on `provider`.

    ONNX Runtime 1.31's CUDA GroupQueryAttention given an attention_bias (Llama 4's chunk mask,
    in builds whose context exceeds one chunk) decodes the shorter rows of a right-padded batch
    wrongly (seen on an H100: the longest row exact, the others off from the first decode step);
    without a bias it pads correctly, as the CPU kernel always does."""
    if provider != "cuda":
        return True
    import onnx

    graph = onnx.load(str(Path(build_dir) / "model.onnx"), load_external_data=False).graph
    return not any(n.op_type == "GroupQueryAttention" and len(n.input) > 10 and n.input[10] for n in graph.node)
