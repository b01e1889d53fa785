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
    "cpu": Pool("cpu", "cpu", None, ("fp32", "int8", "int4", "hybrid-int8")),
    "cuda": Pool("cuda", "cuda", "cuda", ("fp32", "fp16", "int8", "int4", "hybrid-int8")),
}
