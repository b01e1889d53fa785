import pytest

from compiler_service import recipes


def _overrides(recipe_name: str, layers: int = 2) -> tuple[dict, dict[str, str]]:
    import json

    args = recipes.builder_args(recipes.get(recipe_name, "cpu"), "cpu", layers)
    assert "-p" not in args and args[:2] == ["-e", "cpu"]
    weights = json.loads(args[args.index("--target_options") + 1])["quant_config"]["weights"]
    per_node = {o["match"]["name"]: ("float" if o.get("exclude") else o["type"]) for o in weights["overrides"]}
    return weights, per_node


def test_hybrid_int8_keeps_every_attention_projection_float_and_fused():
    weights, per_node = _overrides("hybrid-int8")
    assert weights["type"] == "int8" and weights["block_size"] == 32
    assert per_node == {f"/model/layers.{i}/attn/{p}/MatMul": "float" for i in range(2) for p in ("qkv_proj", "o_proj")}


def test_hybrid_int4_mlp_4bit_attention_and_lm_head_8bit():
    weights, per_node = _overrides("hybrid-int4", layers=3)
    assert weights["type"] == "int4"  # the MLP body; 3 x 3 MLP nodes outnumber 3 x 2 + 1
    assert set(per_node.values()) == {"int8"} and "/lm_head/MatMul" in per_node
    assert sum("/attn/" in n for n in per_node) == 6 and not any("/mlp/" in n for n in per_node)


def test_cli_and_compiler_know_the_same_recipes():
    from llamaship.cli import RECIPES

    assert set(RECIPES) == set(recipes.RECIPES)


@pytest.mark.parametrize("name, precision", [("fp32", "fp32"), ("int8", "int8"), ("int4", "int4")])
def test_plain_recipes_quantize_everything(name, precision):
    recipe = recipes.get(name, "cpu")
    args = recipes.builder_args(recipe, "cpu", 4)
    assert args[:4] == ["-p", precision, "-e", "cpu"] and "--target_options" not in args
    extra = args[args.index("--extra_options") + 1:]
    assert "hf_token=false" in extra
    assert ("block_size=32" in extra) == (precision != "fp32")
    # what the graph check demands of the build: every projection group at the recipe's precision
    want = "float" if precision == "fp32" else precision
    assert recipe.group_precision() == {"attn": want, "mlp": want, "lm_head": want}


def test_unknown_recipe_and_pool_mismatch():
    with pytest.raises(recipes.RecipeError, match="unknown recipe"):
        recipes.get("int3", "cpu")
    with pytest.raises(recipes.RecipeError, match="not available for pool cpu"):
        recipes.get("fp16", "cpu")
    assert recipes.get("fp16", "cuda").precision == "fp16"
