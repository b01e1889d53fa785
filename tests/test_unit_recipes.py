import pytest

from compiler_service import recipes


def test_hybrid_excludes_every_attention_projection_and_nothing_else():
    args = recipes.builder_args(recipes.get("hybrid-int8", "cpu"), "cpu", 2)
    assert args[:4] == ["-p", "int8", "-e", "cpu"]
    extra = dict(a.split("=", 1) for a in args[5:])
    excluded = extra["nodes_to_exclude"].split(",")
    assert "/model/layers.1/attn/qkv_proj/MatMul" in excluded and "/model/layers.0/attn/o_proj/MatMul" in excluded
    assert not any("mlp" in n or "lm_head" in n for n in excluded)
    assert extra["block_size"] == "32"


@pytest.mark.parametrize("name, precision", [("fp32", "fp32"), ("int8", "int8"), ("int4", "int4")])
def test_plain_recipes_quantize_everything(name, precision):
    args = recipes.builder_args(recipes.get(name, "cpu"), "cpu", 4)
    assert args[1] == precision
    assert not any(a.startswith("nodes_to_exclude") for a in args)


def test_unknown_recipe_and_pool_mismatch():
    with pytest.raises(recipes.RecipeError, match="unknown recipe"):
        recipes.get("int3", "cpu")
    with pytest.raises(recipes.RecipeError, match="not available for pool cpu"):
        recipes.get("fp16", "cpu")
    assert recipes.get("fp16", "cuda").precision == "fp16"
