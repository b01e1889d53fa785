"""How often a quantized Llama 4 build routes a token to other experts than the float model.

Measured on the PyTorch reference with the weights the build holds: each quantized group's
weights go through the Llama 4 builder's own round-to-nearest and back (its builds compute
exactly what transformers computes with those dequantized weights), and each MoE layer's choice
of experts is compared token by token, teacher-forced on the quality gate's prompts, with the
float model's. A flipped choice sends that token through another expert's whole MLP.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np


def _group(name: str) -> str | None:
    """The builder's weight group of a text-model tensor (None: kept float, e.g. the router)."""
    if name == "lm_head.weight":
        return "lm_head"
    if ".self_attn." in name:
        return "attn"
    if ".feed_forward.shared_expert." in name:
        return "shared_expert"
    if ".feed_forward.experts." in name:
        return "experts"
    if ".feed_forward.router." in name:
        return None
    return "mlp" if ".feed_forward." in name else None


def dequantized_weights(precision: str) -> Callable[[str, Any], Any] | None:
    """A transform for torch_reference.llama4_logits_layerwise giving each weight as the build
    holds it at `precision` (a builder preset or groups:...); None when it quantizes nothing."""
    import torch

    from compiler_service.llama4.linear import precision_named
    from compiler_service.llama4.quant import BLOCK, fake_quantize

    bits = precision_named(precision).bits
    if not any(bits.values()):
        return None

    def transform(name: str, tensor):
        b = bits.get(_group(name) or "")
        w = tensor.numpy()
        if not b:
            return tensor
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            e, k, n = w.shape  # x @ W[e]: the build quantizes W[e].T [n, k] along k
            hidden, width = (k, n // 2) if name.endswith("gate_up_proj") else (n, k)
            if hidden % BLOCK or width % BLOCK:  # the builder keeps such experts float
                return tensor
            out = np.stack([fake_quantize(np.ascontiguousarray(w[x].T), b).T for x in range(e)])
        elif w.ndim == 2 and w.shape[1] % BLOCK == 0:  # nn.Linear [N, K]
            out = fake_quantize(w, b)
        else:
            return tensor
        return torch.from_numpy(np.ascontiguousarray(out, dtype=np.float32))

    return transform


def router_flips(checkpoint: Path, token_ids: list[list[int]], precision: str,
                 float_routes: dict[int, list]) -> dict:
    """{rate, per_layer, token_choices}: the share of (token, MoE layer) choices that differ from
    `float_routes` (collected by the float reference on the same prompts); {} if nothing is quantized."""
    from compiler_service.torch_reference import llama4_logits_layerwise

    transform = dequantized_weights(precision)
    if transform is None or not float_routes:
        return {}
    routes: dict[int, list] = {}
    llama4_logits_layerwise(checkpoint, token_ids, transform=transform, routes=routes)
    flips = total = 0
    per_layer: dict[str, float] = {}
    for layer, prompts in sorted(float_routes.items()):
        changed = sum(int((a.sort(-1).values != b.sort(-1).values).any(-1).sum())
                      for a, b in zip(prompts, routes[layer]))
        count = sum(a.shape[0] for a in prompts)
        per_layer[str(layer)] = round(changed / count, 4)
        flips, total = flips + changed, total + count
    return {"rate": round(flips / total, 4), "per_layer": per_layer, "token_choices": total}
