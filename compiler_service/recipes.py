"""Quantization recipes: the names are API, each maps to exact GenAI model builder options."""

from __future__ import annotations

from dataclasses import dataclass, field

from shared.pools import POOLS


class RecipeError(ValueError):
    pass


@dataclass(frozen=True)
class Recipe:
    name: str
    precision: str  # builder -p
    description: str
    quantize_attention: bool = True
    extra_options: dict[str, str] = field(default_factory=dict)


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
            "hybrid-int8", "int8",
            "MLP projections (gate/up/down) and lm_head as MatMulNBits 8-bit weight-only, block 32, symmetric RTN; "
            "attention projections (q/k/v/o) kept float32.",
            quantize_attention=False,
            extra_options={"block_size": "32"},
        ),
    )
}


def attention_nodes(num_layers: int) -> list[str]:
    """Builder node names of the attention projections, fused (qkv_proj) or not."""
    names = []
    for i in range(num_layers):
        for proj in ("qkv_proj", "q_proj", "k_proj", "v_proj", "o_proj"):
            names.append(f"/model/layers.{i}/attn/{proj}/MatMul")
    return names


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
    args = ["-p", recipe.precision, "-e", POOLS[pool].execution_provider]
    extra = dict(recipe.extra_options)
    extra["hf_token"] = "false"
    if not recipe.quantize_attention:
        extra["nodes_to_exclude"] = ",".join(attention_nodes(num_layers))
    args += ["--extra_options", *[f"{k}={v}" for k, v in sorted(extra.items())]]
    return args
