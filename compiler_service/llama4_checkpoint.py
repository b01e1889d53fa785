"""Llama 4 checkpoints checked before any heavy work: the text tower's weights (from safetensors
headers only) against what its config implies, tensor by tensor.

The config is read by the graph builder's own parser (compiler_service.llama4.config), so the
check and the build agree on every derived default and published-config quirk.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler_service.checkpoint import CheckpointError
from compiler_service.llama4 import config as l4config
from compiler_service.llama4.layout import expected_tensors
from shared.errors import shown

FLOAT_DTYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Llama4Source:
    spec: l4config.Llama4TextSpec
    text_config: dict  # the text model's config as config.json states it
    parameters: int  # in the text tower (the vision tower is never compiled)


def parse(config: dict) -> tuple[l4config.Llama4TextSpec, dict]:
    """The builder's parsed text config, and the text config as config.json states it."""
    return l4config.parse(config), l4config.text_config(config)[0]


LAYOUTS = {  # what each kind of tensor holds, for messages
    "experts.gate_up_proj": "[experts, hidden, 2 × intermediate_size], gate then up",
    "experts.down_proj": "[experts, intermediate_size, hidden]",
    "router.weight": "[experts, hidden]",
    "shared_expert.down_proj.weight": "[hidden, intermediate_size]",
    "shared_expert.gate_proj.weight": "[intermediate_size, hidden]",
    "shared_expert.up_proj.weight": "[intermediate_size, hidden]",
    "feed_forward.down_proj.weight": "[hidden, intermediate_size_mlp] (dense layer)",
    "feed_forward.gate_proj.weight": "[intermediate_size_mlp, hidden] (dense layer)",
    "feed_forward.up_proj.weight": "[intermediate_size_mlp, hidden] (dense layer)",
    "o_proj.weight": "[hidden, heads × head_dim]",
    "_proj.weight": "[heads × head_dim, hidden]",
    "lm_head.weight": "[vocab, hidden] (Llama 4's lm_head is untied)",
    "embed_tokens.weight": "[vocab, hidden]",
    "norm.weight": "[hidden]",
}


def expected_shapes(spec: l4config.Llama4TextSpec) -> dict[str, tuple[list[int], str]]:
    """Every tensor of the text tower (the graph builder's own list): name with the checkpoint's
    prefix -> (shape, what it holds)."""
    return {spec.weight_prefix + name: (list(shape), next((v for k, v in LAYOUTS.items() if name.endswith(k)), ""))
            for name, shape in expected_tensors(spec).items()}


def _layer_of(name: str, prefix: str) -> int | None:
    head = f"{prefix}model.layers."
    if not name.startswith(head):
        return None
    index = name[len(head):].split(".", 1)[0]
    return int(index) if index.isdigit() else None


def check_weights(spec: l4config.Llama4TextSpec, shapes: dict[str, list[int]], dtypes: dict[str, str]) -> int:
    """Raise CheckpointError naming the first tensor that is missing, misshapen, of a dtype the
    build cannot take, or that the config does not explain. Returns the text tower's parameters."""
    prefix = spec.weight_prefix
    expected = expected_shapes(spec)
    for layer in range(spec.num_layers):
        router = f"{prefix}model.layers.{layer}.feed_forward.router.weight"
        routed = router in shapes
        if routed != (layer in spec.moe_layers) and any(n.startswith(f"{prefix}model.layers.{layer}.feed_forward.") for n in shapes):
            raise CheckpointError(
                f"config.json and the weights disagree: layer {layer} {'has' if routed else 'has no'} experts "
                f"({router}), but moe_layers {list(spec.moe_layers)} {'does not name' if routed else 'names'} it")
    for name, (want, layout) in expected.items():
        got = shapes.get(name)
        if got is None:
            raise CheckpointError(f"the weights have no {name}: not a Llama 4 checkpoint, or its config.json "
                                  f"(num_hidden_layers, moe_layers) describes another model")
        if got != want:
            raise CheckpointError(f"config.json and the weights disagree: {name} is {got}, the config implies "
                                  f"{want} {layout}")
    text = [n for n in shapes if n.startswith((f"{prefix}model.", f"{prefix}lm_head."))]
    layers = {layer for n in text if (layer := _layer_of(n, prefix)) is not None}
    if layers - set(range(spec.num_layers)):
        raise CheckpointError(f"config.json and the weights disagree: num_hidden_layers is {spec.num_layers}, "
                              f"the weights hold {len(layers)} layers")
    params = 0
    for name in text:
        if name not in expected:
            hint = " (moe_layers names the layers with experts)" if ".feed_forward." in name else ""
            raise CheckpointError(f"the weights hold {shown(name)}, which a Llama 4 text model with this "
                                  f"config.json does not have{hint}")
        if dtypes.get(name) not in FLOAT_DTYPES:
            raise CheckpointError(f"tensor {name} is {str(dtypes.get(name))[:16]}; Llama 4 builds take "
                                  f"{', '.join(FLOAT_DTYPES)} checkpoints (quantized ones are not supported)")
        n = 1
        for d in shapes[name]:
            n *= d
        params += n
    return params


def inspect(config: dict, shapes: dict[str, list[int]], dtypes: dict[str, str]) -> Llama4Source:
    spec, text_config = parse(config)
    return Llama4Source(spec, text_config, check_weights(spec, shapes, dtypes))
