"""The `auto` recipe for Llama 4: the method of compiler_service.auto_precision (measure each
group's drift alone at 8 and 4 bits, predict an assignment's drift as the sum, build the smallest
one the budget admits) over the Llama 4 builder's own weight groups: attention, dense MLP, shared
expert, routed experts and lm_head. The builder takes the choice as `groups:<group>=<width>,...`."""

from __future__ import annotations

from typing import Awaitable, Callable

from compiler_service.auto_precision import WIDTHS, Drift

GROUPS = ("attn", "mlp", "shared_expert", "experts", "lm_head")
# Widths auto considers per group (default: every width). Experts at 8 bits run through QMoE's
# 8-bit CPU path, which decoded slower than float experts (llama4-16e: 9 against 53 tok/s, bench
# 2026-11-26), so auto keeps experts float or 4-bit.
GROUP_WIDTHS = {"experts": ("int4",)}


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


async def measure_sensitivity(
    groups: list[str],
    build: Callable[[dict[str, str], str], Awaitable[Drift]],
    on_trial: Callable[[int, int, str], Awaitable[None]],
) -> dict[tuple[str, str], Drift]:
    """`build(assignment, label) -> Drift` with one group quantized at a time, at each width."""
    runs = [(g, w) for g in groups for w in GROUP_WIDTHS.get(g, WIDTHS)]
    out = {}
    for i, (group, width) in enumerate(runs):
        label = f"{group}={width}"
        await on_trial(i, len(runs), label)
        out[(group, width)] = await build({g: (width if g == group else "float") for g in groups}, label)
    return out
