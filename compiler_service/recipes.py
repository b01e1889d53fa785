"""Quantization recipes: the names are API, each maps to exact GenAI model builder options.

Mixed recipes assign a precision to each projection group (attn: the fused q/k/v and o
projections; mlp: gate/up/down; lm_head) and reach the builder as exact per-node overrides
(`--target_options` quant_config), which keeps q/k/v fused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from shared.pools import POOLS


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Recipe:
    name: str
    precision: str  # builder -p
    description: str
    extra_options: dict[str, str] = field(default_factory=dict)
    # mixed recipes: (group, "int4" | "int8" | "float") for attn, mlp, lm_head
    assignment: tuple[tuple[str, str], ...] = ()

    def group_precision(self) -> dict[str, str]:
        if self.assignment:
            return dict(self.assignment)
        q = self.precision if self.precision in ("int4", "int8") else "float"
        return {"attn": q, "mlp": q, "lm_head": q}


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe("fp32", "fp32", "All weights float32; no quantization."),
        Recipe("fp16", "fp16", "All weights float16 (cuda pool)."),
        Recipe(
            "int8", "int8",
            "Every projection MatMul and lm_head as MatMulNBits 8-bit weight-only, block 32, symmetric RTN; "
            "embeddings and norms float32.",
            extra_options={"block_size": "32"},
        ),
        Recipe(
            "int4", "int4",
            "Every projection MatMul and lm_head as MatMulNBits 4-bit weight-only, block 32, symmetric RTN; "
            "embeddings and norms float32.",
            extra_options={"block_size": "32"},
        ),
        Recipe(
            "hybrid-int8", "mixed",
            "MLP projections (gate/up/down) and lm_head as MatMulNBits 8-bit weight-only, block 32, symmetric RTN; "
            "attention projections (fused q/k/v, o) kept float32.",
            assignment=(("attn", "float"), ("mlp", "int8"), ("lm_head", "int8")),
        ),
        Recipe(
            "hybrid-int4", "mixed",
            "MLP projections (gate/up/down) as MatMulNBits 4-bit weight-only; attention projections (fused q/k/v, o) "
            "and lm_head as MatMulNBits 8-bit; block 32, symmetric RTN, accuracy level 4.",
            assignment=(("attn", "int8"), ("mlp", "int4"), ("lm_head", "int8")),
        ),
        Recipe(
            "auto", "mixed",
            "Mixed precision chosen by measurement: each projection group's (attn, mlp, lm_head) drift at 8 and 4 "
            "bits is measured on the calibration prompts, then the smallest assignment whose predicted drift fits "
            "the request's max_mean_kl is built (MatMulNBits block 32, symmetric RTN); the manifest records the "
            "measurements and the choice.",
        ),
    )
}


def group_nodes(num_layers: int) -> dict[str, list[str]]:
    """Builder node names of the projection MatMuls per group (q/k/v fused, as the CPU builder makes them)."""
    groups: dict[str, list[str]] = {"attn": [], "mlp": [], "lm_head": ["/lm_head/MatMul"]}
    for i in range(num_layers):
        p = f"/model/layers.{i}"
        groups["attn"] += [f"{p}/attn/qkv_proj/MatMul", f"{p}/attn/o_proj/MatMul"]
        groups["mlp"] += [f"{p}/mlp/{x}_proj/MatMul" for x in ("gate", "up", "down")]
    return groups


def node_group(name: str) -> str:
    """attn | mlp | lm_head for a builder MatMul node name (quantized ones end in _Q4/_Q8)."""
    if "/attn/" in name:
        return "attn"
    if "/mlp/" in name:
        return "mlp"
    return "lm_head" if "lm_head" in name else "other"


def target_options(assignment: dict[str, str], num_layers: int, block_size: int = 32) -> dict:
    """The builder's quant_config for a per-group assignment: the commonest quantized type is the
    body, every other node is an exact-name override (type, or exclude to stay float)."""
    nodes = group_nodes(num_layers)
    per_node = {n: assignment[g] for g, names in nodes.items() for n in names}
    quantized = [t for t in per_node.values() if t != "float"]
    body = max(sorted(set(quantized)), key=quantized.count) if quantized else "int8"
    overrides = [{"match": {"name": n}, "exclude": True} if t == "float" else {"match": {"name": n}, "type": t}
                 for n, t in per_node.items() if t != body]
    return {"quant_config": {"weights": {"type": body, "block_size": block_size, "accuracy_level": 4,
                                         "overrides": overrides}}}


def get(name: str, pool: str) -> Recipe:
    recipe = RECIPES.get(name)
    if recipe is None:
        raise RecipeError(f"unknown recipe {name!r}; known: {', '.join(RECIPES)}")
    if pool not in POOLS:
        raise RecipeError(f"unknown target pool {pool!r}; known: {', '.join(POOLS)}")
    if name not in POOLS[pool].recipes:
        raise RecipeError(f"recipe {name} is not available for pool {pool}; use one of {', '.join(POOLS[pool].recipes)}")
    return recipe


def builder_args(recipe: Recipe, pool: str, num_layers: int) -> list[str]:
    """The builder's -p/-e/--extra_options arguments for a recipe."""
    extra = dict(recipe.extra_options)
    extra["hf_token"] = "false"
    if recipe.assignment:
        args = ["-e", POOLS[pool].execution_provider, "--target_options",
                json.dumps(target_options(dict(recipe.assignment), num_layers), sort_keys=True)]
    else:
        args = ["-p", recipe.precision, "-e", POOLS[pool].execution_provider]
    args += ["--extra_options", *[f"{k}={v}" for k, v in sorted(extra.items())]]
    return args


def llama4_offered(precisions: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Per pool, the recipes Llama 4 checkpoints may use: those the Llama 4 graph builder makes for
    that pool (`precisions`: pool → its precision names, which are recipe names) and the pool offers."""
    return {pool: tuple(r for r in p.recipes if r in precisions.get(pool, ())) for pool, p in POOLS.items()}


def check_llama4(recipe: Recipe, pool: str, precisions: dict[str, tuple[str, ...]]) -> None:
    offered = llama4_offered(precisions)
    if recipe.name not in offered.get(pool, ()):
        supported = "; ".join(f"{', '.join(names)} on {p}" for p, names in offered.items() if names) or "none"
        raise RecipeError(f"recipe {recipe.name} on pool {pool} is not supported for Llama 4 checkpoints yet; "
                          f"supported: {supported}")
