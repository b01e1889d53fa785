"""The `auto` recipe for Llama 4: the method of compiler_service.auto_precision (measure each
group's drift alone at 8 and 4 bits, predict an assignment's drift as the sum, build the smallest
one the budget admits) over the Llama 4 builder's own weight groups: attention, dense MLP, shared
expert, routed experts and lm_head. The builder takes the choice as `groups:<group>=<width>,...`."""

from __future__ import annotations

import itertools
from typing import Awaitable, Callable

from compiler_service.auto_precision import BYTES_PER_PARAM, NO_DRIFT, WIDTHS, Budget, Choice, Drift

GROUPS = ("attn", "mlp", "shared_expert", "experts", "lm_head")


def group_params(spec) -> dict[str, int]:
    """Weights in each group, from the builder's parsed config (groups with none are left out)."""
    h, d = spec.hidden_size, spec.head_dim
    moe, dense = len(spec.moe_layers), spec.num_layers - len(spec.moe_layers)
    params = {
        "attn": spec.num_layers * h * d * (2 * spec.num_heads + 2 * spec.num_kv_heads),
        "mlp": dense * 3 * h * spec.intermediate_size_mlp,
        "shared_expert": moe * 3 * h * spec.intermediate_size,
        "experts": moe * spec.num_experts * 3 * h * spec.intermediate_size,
        "lm_head": spec.vocab_size * h,
    }
    return {g: n for g, n in params.items() if n}


def precision(assignment: dict[str, str]) -> str:
    """The builder's precision name for an assignment."""
    return "groups:" + ",".join(f"{g}={w}" for g, w in assignment.items())


def choose(sensitivity: dict[tuple[str, str], Drift], params: dict[str, int], budget: Budget) -> Choice:
    """The smallest assignment whose predicted drift the budget admits (all float if none)."""
    groups = list(params)
    best = Choice({g: "float" for g in groups}, NO_DRIFT, sum(params.values()) * BYTES_PER_PARAM["float"])
    for widths in itertools.product(("float", *WIDTHS), repeat=len(groups)):
        assignment = dict(zip(groups, widths))
        drift = sum((sensitivity[(g, w)] for g, w in assignment.items() if w != "float"), NO_DRIFT)
        size = sum(params[g] * BYTES_PER_PARAM[w] for g, w in assignment.items())
        if budget.admits(drift) and (size, drift.mean_kl) < (best.bytes, best.predicted.mean_kl):
            best = Choice(assignment, drift, size)
    return best


async def measure_sensitivity(
    groups: list[str],
    build: Callable[[dict[str, str], str], Awaitable[Drift]],
    on_trial: Callable[[int, int, str], Awaitable[None]],
) -> dict[tuple[str, str], Drift]:
    """`build(assignment, label) -> Drift` with one group quantized at a time, at each width."""
    runs = [(g, w) for g in groups for w in WIDTHS]
    out = {}
    for i, (group, width) in enumerate(runs):
        label = f"{group}={width}"
        await on_trial(i, len(runs), label)
        out[(group, width)] = await build({g: (width if g == group else "float") for g in groups}, label)
    return out
