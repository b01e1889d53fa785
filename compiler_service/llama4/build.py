"""Entry point: a Llama 4 text checkpoint (safetensors) → model.onnx + model.onnx.data +
genai_config.json + tokenizer files, streaming weights tensor by tensor."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

from compiler_service.builder_runner import BuildCancelled
from compiler_service.checkpoint import CheckpointError, read_config
from compiler_service.llama4 import config as l4config
from compiler_service.llama4.genai_config import genai_config
from compiler_service.llama4.graph import emit, save
from compiler_service.llama4.layout import expected_tensors
from compiler_service.llama4.linear import PRECISIONS, Linears, float_type, precision_named
from compiler_service.llama4.onnx_writer import GraphWriter
from compiler_service.llama4.weights import Weights

__all__ = ["PRECISIONS", "build_llama4"]
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def build_llama4(checkpoint: Path, out_dir: Path, *, precision: str, pool: str, context_length: int,
                 progress: Callable[[float, str], None] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> dict:
    recipe = precision_named(precision)
    compute_type = float_type(recipe, pool)
    if context_length <= 0:
        raise ValueError(f"context_length must be positive, got {context_length}")
    checkpoint, out_dir = Path(checkpoint), Path(out_dir)
    report = progress or (lambda fraction, message: None)
    config = read_config(checkpoint / "config.json")
    archs = config.get("architectures") or []
    if not any(a in l4config.ARCHITECTURES for a in archs):
        raise CheckpointError(f"config.json: architectures {str(archs)[:80]} is not a Llama 4 model")
    spec = l4config.parse(config)
    weights = Weights(checkpoint, spec.weight_prefix)
    weights.check(expected_tensors(spec))
    out_dir.mkdir(parents=True, exist_ok=True)

    def on_layer(layer: int) -> None:
        report(0.05 + 0.85 * (layer + 1) / spec.num_layers, f"converting layer {layer + 1}/{spec.num_layers}")
        if should_stop and should_stop():
            raise BuildCancelled("cancelled while converting Llama 4 layers")

    report(0.02, "reading Llama 4 config")
    writer = GraphWriter(out_dir, float_type=compute_type)
    try:
        features = emit(Linears(writer, recipe), weights, spec, context_length, on_layer)
        report(0.92, "writing ONNX model")
        save(writer, spec)
    finally:
        writer.close()
    (out_dir / "genai_config.json").write_text(json.dumps(genai_config(spec, context_length, pool), indent=4))
    for name in COPIED_FILES:
        if (checkpoint / name).is_file():
            shutil.copyfile(checkpoint / name, out_dir / name)
    report(1.0, "Llama 4 build written")
    return {
        "architecture": "llama4_text", "precision": precision, "precision_description": recipe.description,
        "pool": pool, "context_length": context_length, "compute_type": compute_type.name,
        "layers": spec.num_layers, "moe_layers": list(spec.moe_layers), "experts": spec.num_experts,
        "top_k": spec.top_k, "rope_layers": [i for i, r in enumerate(spec.rope_layers) if r],
        "chunked_layers": [i for i, c in enumerate(spec.chunked_layers) if c],
        "ops": sorted(writer.ops), "features": features,
    }
