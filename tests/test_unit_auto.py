"""auto's choice: the smallest assignment whose predicted drift the gate's budget admits."""

from compiler_service.auto_precision import GROUPS, Budget, Drift, choose, group_params, trials

PARAMS = {"attn": 100, "mlp": 300, "lm_head": 50}


def sens(attn4=0.01, mlp4=0.01, head4=0.01, top1=0.01):
    s = {}
    for g, kl4 in (("attn", attn4), ("mlp", mlp4), ("lm_head", head4)):
        s[(g, "int4")] = Drift(kl4, top1, 0.1)
        s[(g, "int8")] = Drift(kl4 / 20, top1 / 10, 0.01)
    return s


def test_everything_4bit_when_the_budget_allows_it():
    c = choose(sens(), PARAMS, Budget(1.0, 0.5, 10.0))
    assert c.assignment == {g: "int4" for g in GROUPS} and abs(c.predicted.mean_kl - 0.03) < 1e-12


def test_the_sensitive_group_gets_more_bits_and_top1_counts_too():
    # attention is fragile at 4 bits: the budget fits mlp and lm_head at 4 bits, attention at 8
    c = choose(sens(attn4=0.05), PARAMS, Budget(0.05, 0.5, 10.0))
    assert c.assignment == {"attn": "int8", "mlp": "int4", "lm_head": "int4"}
    # the same KL budget, but top-1 disagreement allows only 8-bit everywhere
    c = choose(sens(attn4=0.05, top1=0.2), PARAMS, Budget(0.05, 0.1, 10.0))
    assert set(c.assignment.values()) == {"int8"}


def test_nothing_fits_a_zero_budget_and_trials_cover_each_group_and_width():
    assert set(choose(sens(), PARAMS, Budget(0.0, 0.0, 0.0)).assignment.values()) == {"float"}
    assert sorted(next((g, w) for g, w in t.items() if w != "float") for t in trials()) == sorted(
        (g, w) for g in GROUPS for w in ("int8", "int4"))
    p = group_params({"hidden_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1, "num_hidden_layers": 2,
                      "intermediate_size": 16, "vocab_size": 10})
    assert p == {"attn": 2 * (8 * 4 * 4 + 8 * 8), "mlp": 2 * 3 * 8 * 16, "lm_head": 80}
