"""The `auto` recipe: mixed precision chosen by measurement.

1. Sensitivity: for each projection group (attn, mlp, lm_head) and each weight width (int8,
   int4), build the model with only that group quantized and measure its drift on the
   calibration prompts (the quality gate's prompts and metrics): mean KL(reference || build),
   top-1 disagreement and perplexity increase.
2. Choice: over every assignment of {float, int8, int4} to the three groups, predict each drift
   as the sum of the groups' (small perturbations add up about linearly) and the size from the
   groups' parameter counts; take the smallest assignment whose predicted drifts all stay
   within the gate's thresholds (with a safety margin).
3. The chosen assignment is built for real and, like every build, must pass the quality gate:
   the prediction picks, the measurement decides.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Awaitable, Callable

from compiler_service.checkpoint import LlamaDims

GROUPS = ("attn", "mlp", "lm_head")
WIDTHS = ("int8", "int4")
# bytes per weight with block-32 symmetric quantization (a float32 scale per block)
BYTES_PER_PARAM = {"float": 4.0, "int8": 1 + 4 / 32, "int4": 0.5 + 4 / 32}
SAFETY = 0.8  # choose with 20% of the budget in reserve: the sum of KLs is an estimate


@dataclass(frozen=True)
class Drift:
    mean_kl: float
    top1_disagreement: float
    perplexity_increase_pct: float

    def __add__(self, other: "Drift") -> "Drift":
        return Drift(self.mean_kl + other.mean_kl, self.top1_disagreement + other.top1_disagreement,
                     self.perplexity_increase_pct + max(0.0, other.perplexity_increase_pct))


NO_DRIFT = Drift(0.0, 0.0, 0.0)


@dataclass(frozen=True)
class Budget:
    """The gate's thresholds as drift limits."""

    mean_kl: float
    top1_disagreement: float
    perplexity_increase_pct: float

    def admits(self, d: Drift) -> bool:
        return (d.mean_kl <= SAFETY * self.mean_kl and d.top1_disagreement <= SAFETY * self.top1_disagreement
                and d.perplexity_increase_pct <= SAFETY * self.perplexity_increase_pct)


@dataclass(frozen=True)
class Choice:
    assignment: dict[str, str]
    predicted: Drift
    bytes: float


def group_params(config: dict) -> dict[str, int]:
    """Weights in each projection group, from the checkpoint's config."""
    d = LlamaDims.of(config)
    return {
        "attn": d.layers * (d.hidden * (d.heads + 2 * d.kv_heads) * d.head_dim + d.heads * d.head_dim * d.hidden),
        "mlp": d.layers * 3 * d.hidden * d.intermediate,
        "lm_head": d.hidden * d.vocab,
    }


def trials() -> list[dict[str, str]]:
    """One build per (group, width): that group quantized, the others float."""
    return [{g: (w if g == group else "float") for g in GROUPS} for group in GROUPS for w in WIDTHS]


def choose(sensitivity: dict[tuple[str, str], Drift], params: dict[str, int], budget: Budget) -> Choice:
    """The smallest assignment of the groups in `params` whose predicted drift the budget admits
    (all float if none). A group is offered the widths measured for it in `sensitivity`."""
    groups = list(params)
    best = Choice({g: "float" for g in groups}, NO_DRIFT, sum(params.values()) * BYTES_PER_PARAM["float"])
    offered = [("float", *(w for w in WIDTHS if (g, w) in sensitivity)) for g in groups]
    for widths in itertools.product(*offered):
        assignment = dict(zip(groups, widths))
        drift = sum((sensitivity[(g, w)] for g, w in assignment.items() if w != "float"), NO_DRIFT)
        size = sum(params[g] * BYTES_PER_PARAM[w] for g, w in assignment.items())
        if budget.admits(drift) and (size, drift.mean_kl) < (best.bytes, best.predicted.mean_kl):
            best = Choice(assignment, drift, size)
    return best


async def measure_sensitivity(
    build: Callable[[dict[str, str], str], Awaitable[Drift]],
    on_trial: Callable[[int, int, str], Awaitable[None]],
) -> dict[tuple[str, str], Drift]:
    """Run `build(assignment, label) -> Drift` for every trial."""
    out = {}
    runs = trials()
    for i, assignment in enumerate(runs):
        group, width = next((g, w) for g, w in assignment.items() if w != "float")
        label = f"{group}={width}"
        await on_trial(i, len(runs), label)
        out[(group, width)] = await build(assignment, label)
    return out
