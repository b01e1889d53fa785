"""Verification of a fresh build before it is published: the runtime's limits are the request's
(configure), the graph has symbolic dims, the fused kernels and the recipe's precisions
(inspect_graph), and the runtime loads it, decodes, and enforces its limits (smoke_test).
Each runs in a worker thread; none touches Redis or the job."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from compiler_service import recipes
from compiler_service.failures import CompileError


def configure(build_dir: Path, context_length: int) -> None:
    """Set the runtime's context limit to what the request asked for (within the model's)."""
    cfg_path = build_dir / "genai_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["model"]["context_length"] = context_length
    cfg["search"]["max_length"] = context_length
    cfg_path.write_text(json.dumps(cfg, indent=4))


def inspect_graph(build_dir: Path, recipe: recipes.Recipe, layers: int = 0, moe_layers: tuple[int, ...] = ()) -> dict:
    """Check the graph has symbolic batch/sequence dims and the fused kernels; summarize it. With
    `layers` (Llama 4 builds), every layer must attend through GroupQueryAttention and each of
    `moe_layers` must route through an MoE/QMoE kernel or composed expert nodes."""
    import onnx

    model = onnx.load(str(build_dir / "model.onnx"), load_external_data=False)
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    ids = dims.get("input_ids", [])
    if len(ids) != 2 or not all(isinstance(d, str) and d for d in ids):
        raise CompileError(f"built graph has static input_ids dims {ids}; batch and sequence must be symbolic")
    ops = Counter(n.op_type for n in model.graph.node)
    if not ops.get("GroupQueryAttention"):
        raise CompileError("built graph has no fused GroupQueryAttention kernel")
    _check_layers(model.graph.node, layers, moe_layers)
    bits = {n.name: next((a.i for a in n.attribute if a.name == "bits"), 0)
            for n in model.graph.node if n.op_type == "MatMulNBits"}
    float_matmuls = sorted(n.name for n in model.graph.node if n.op_type == "MatMul")
    if layers:
        _check_quantized(recipe, ops)
    else:
        _check_groups(recipe, bits, float_matmuls)
    quantized = sorted(bits)
    return {
        "ops": dict(sorted(ops.items())),
        "inputs": dims.get("input_ids"),
        "quantized_matmuls": {name: bits[name] for name in quantized},
        "float_matmuls": float_matmuls,
    }


def _check_quantized(recipe: recipes.Recipe, ops: Counter) -> None:
    """Llama 4 builds: its builder assigns precisions per its own groups (experts, shared expert,
    attention, dense MLP, lm_head); a float recipe has no quantized kernel, another has some."""
    quantized = ops.get("MatMulNBits", 0) + ops.get("QMoE", 0)
    if recipe.name == "auto":  # the chosen assignment, over the builder's groups
        wants = any(width != "float" for _, width in recipe.assignment)
    else:
        wants = recipe.name not in ("fp32", "fp16")
    if not wants and quantized:
        raise CompileError(f"recipe {recipe.name} wants float weights, but the graph has {quantized} quantized kernels")
    if wants and not quantized:
        raise CompileError(f"recipe {recipe.name} wants quantized weights, but the graph has no MatMulNBits or QMoE")


def _check_groups(recipe: recipes.Recipe, bits: dict[str, int], float_matmuls: list[str]) -> None:
    """GenAI builds: every projection group at the precision the recipe assigns it."""
    want = recipe.group_precision()
    expected_bits = {"int4": 4, "int8": 8}
    for name, b in bits.items():
        group = recipes.node_group(name)
        if group in want and expected_bits.get(want[group]) != b:
            raise CompileError(f"recipe {recipe.name} wants {group} projections {want[group]}, but the builder made "
                               f"{name} {b}-bit")
    for name in float_matmuls:
        group = recipes.node_group(name)
        if group in want and want[group] != "float":
            raise CompileError(f"recipe {recipe.name} wants {group} projections {want[group]}, but {name} stayed float")


def _check_layers(nodes, layers: int, moe_layers: tuple[int, ...]) -> None:
    per_layer: dict[int, set[str]] = {}
    for n in nodes:
        if n.name.startswith("/model/layers."):
            index = n.name[len("/model/layers."):].split("/", 1)[0]
            if index.isdigit():
                kinds = per_layer.setdefault(int(index), set())
                kinds.add(n.op_type)
                if "/experts" in n.name:
                    kinds.add("experts")
    for layer in range(layers):
        kinds = per_layer.get(layer, set())
        if "GroupQueryAttention" not in kinds:
            raise CompileError(f"built graph: layer {layer} has no GroupQueryAttention kernel")
        if layer in moe_layers and not kinds & {"MoE", "QMoE", "experts"}:
            raise CompileError(f"built graph: MoE layer {layer} has no MoE kernel or expert nodes")


def runtime_config(build_dir: Path):
    """The build's onnxruntime-genai config, on the CPU where it names CUDA and this process has no
    GPU: a compiler without one still loads and decodes a cuda build (float16 and 4-bit kernels run
    on the CPU too); its quality gate then waits for a compiler with a GPU."""
    import onnxruntime_genai as og

    config = og.Config(str(build_dir))
    options = json.loads((build_dir / "genai_config.json").read_text())["model"]["decoder"]["session_options"]
    if any("cuda" in p for p in options.get("provider_options", [])) and not og.is_cuda_available():
        config.clear_providers()
    return config


def smoke_test(build_dir: Path, context_length: int, max_batch: int) -> None:
    """Load the build the way serving will, decode a few tokens, and check the runtime enforces the
    request's limits: it must refuse a sequence longer than the context, and take batches of
    different sizes and sequence lengths (symbolic dims that really are dynamic at run time).
    The max batch is enforced by the serving replicas (a cohort never holds more rows)."""
    import numpy as np
    import onnxruntime_genai as og

    configured = json.loads((build_dir / "genai_config.json").read_text())["model"]["context_length"]
    if configured != context_length:
        raise CompileError(f"the build's context length is {configured}, not the requested {context_length}")
    model = og.Model(runtime_config(build_dir))
    params = og.GeneratorParams(model)
    try:
        params.set_search_options(max_length=context_length + 1, do_sample=False)
        og.Generator(model, params).append_tokens([1, 2, 3])
    except Exception:  # noqa: BLE001 - refused, as it must be
        pass
    else:
        raise CompileError(f"the runtime accepts sequences longer than the context length {context_length}")
    for rows, width in ((1, 3), (min(max_batch, 3), 5)):
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=width + 4, do_sample=False, batch_size=rows)
        gen = og.Generator(model, params)
        prompts = np.full((rows, width), 0, dtype=np.int32)
        prompts[:, :2] = [1, 2]
        gen.append_tokens(prompts if rows > 1 else prompts[0])
        while not gen.is_done():
            gen.generate_next_token()
