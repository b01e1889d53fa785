"""The `auto` recipe: mixed precision chosen by measurement.

1. Sensitivity: for each projection group (attn, mlp, lm_head) and each weight width (int8,
   int4), build the model with only that group quantized and measure the mean KL(reference ||
   build) on the calibration prompts (the quality gate's prompts).
2. Choice: over every assignment of {float, int8, int4} to the three groups, predict the drift
   as the sum of the groups' measured KLs (small perturbations add up about linearly) and the
   size from the groups' parameter counts; take the smallest assignment whose predicted drift
   stays within the budget (with a safety margin).
3. The chosen assignment is built for real and, like every build, must pass the quality gate:
   the prediction picks, the measurement decides.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Awaitable, Callable

GROUPS = ("attn", "mlp", "lm_head")
WIDTHS = ("int8", "int4")
# bytes per weight with block-32 symmetric quantization (a float32 scale per block)
BYTES_PER_PARAM = {"float": 4.0, "int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}
SAFETY = 0.8  # choose with 20% of the budget in reserve: the sum of KLs is an estimate


@dataclass(frozen=True)
class Choice:
    assignment: dict[str, str]
    predicted_kl: float
    bytes: float


def group_params(config: dict) -> dict[str, int]:
    """Weights in each projection group, from the checkpoint's config."""
    hidden = int(config["hidden_size"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    layers = int(config["num_hidden_layers"])
    inter = int(config["intermediate_size"])
    return {
        "attn": layers * (hidden * (heads + 2 * kv) * head_dim + heads * head_dim * hidden),
        "mlp": layers * 3 * hidden * inter,
        "lm_head": hidden * int(config["vocab_size"]),
    }


def trials() -> list[dict[str, str]]:
    """One build per (group, width): that group quantized, the others float."""
    return [{g: (w if g == group else "float") for g in GROUPS} for group in GROUPS for w in WIDTHS]


def choose(sensitivity: dict[tuple[str, str], float], params: dict[str, int], budget_kl: float) -> Choice:
    """The smallest assignment whose predicted KL is within SAFETY x budget (all float if none)."""
    best = Choice({g: "float" for g in GROUPS}, 0.0, sum(params.values()) * BYTES_PER_PARAM["float"])
    for widths in itertools.product(("float", *WIDTHS), repeat=len(GROUPS)):
        assignment = dict(zip(GROUPS, widths))
        kl = sum(sensitivity[(g, w)] for g, w in assignment.items() if w != "float")
        size = sum(params[g] * BYTES_PER_PARAM[w] for g, w in assignment.items())
        if kl <= SAFETY * budget_kl and (size, kl) < (best.bytes, best.predicted_kl):
            best = Choice(assignment, kl, size)
    return best


async def measure_sensitivity(
    build: Callable[[dict[str, str], str], Awaitable[float]],
    on_trial: Callable[[int, int, str], Awaitable[None]],
) -> dict[tuple[str, str], float]:
    """Run `build(assignment, label) -> mean KL` for every trial."""
    out = {}
    runs = trials()
    for i, assignment in enumerate(runs):
        group, width = next((g, w) for g, w in assignment.items() if w != "float")
        label = f"{group}={width}"
        await on_trial(i, len(runs), label)
        out[(group, width)] = await build(assignment, label)
    return out
