"""Hardware pools: where a build runs and how ONNX Runtime GenAI is told to use it."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Pool:
    name: str
    execution_provider: str  # the GenAI model builder's -e value
    genai_provider: str | None  # provider name in genai_config.json; None = CPU
    recipes: tuple[str, ...]  # recipes a build for this pool may use


POOLS: dict[str, Pool] = {
    "cpu": Pool("cpu", "cpu", None, ("fp32", "int8", "int4", "hybrid-int8", "hybrid-int4", "auto")),
    # fp32 is not offered on cuda: the builder's fp32 CUDA graph has no fused GroupQueryAttention
    # (seen on an H200, 2026-11-26), which the compiler's verify stage rejects anyway.
    "cuda": Pool("cuda", "cuda", "cuda", ("fp16", "int8", "int4", "hybrid-int8", "hybrid-int4")),
}
