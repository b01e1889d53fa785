"""Cohort planning: which waiting sequences may decode together."""

from serving_service.cohorts import CohortPlan, Waiting, padded_prompts, plan_cohorts

PAD = 0
GREEDY = {"do_sample": False}


def w(rid, prompt_len, max_new, reserved=None, options=GREEDY, first=5):
    prompt = [first] + [7] * (prompt_len - 1)
    return Waiting(rid, prompt, max_new, dict(options), reserved if reserved is not None else prompt_len + max_new)


def rids(plans):
    return [[r.rid for r in p.rows] for p in plans]


def test_greedy_rows_batch_and_sampled_rows_run_alone():
    sampled = w("s", 4, 8, options={"do_sample": True, "temperature": 0.7, "random_seed": 3})
    plans = plan_cohorts([w("a", 4, 8), sampled, w("b", 4, 8), w("c", 4, 8)], max_rows=16, pad_token_id=PAD,
                         context_length=64)
    assert sorted(rids(plans)) == [["a", "b", "c"], ["s"]]


def test_rows_holding_the_pad_token_run_alone_and_max_rows_caps_a_cohort():
    plans = plan_cohorts([w("p", 4, 8, first=PAD)] + [w(f"g{i}", 4, 8) for i in range(5)], max_rows=2,
                         pad_token_id=PAD, context_length=64)
    assert ["p"] in rids(plans) and all(len(p.rows) <= 2 for p in plans)
    assert sorted(r for p in rids(plans) for r in p) == sorted(["p", "g0", "g1", "g2", "g3", "g4"])
    assert rids(plan_cohorts([w("a", 4, 8), w("b", 4, 8)], max_rows=1, pad_token_id=PAD, context_length=64)) \
        == [["a"], ["b"]]


def test_padding_never_exceeds_the_reserved_kv_or_the_context():
    # a short row next to a long one would make the cohort hold 2 x (40 + 40) tokens of KV while
    # the rows reserved 80 + 12: it opens its own cohort
    plans = plan_cohorts([w("long", 40, 40), w("short", 4, 8)], max_rows=16, pad_token_id=PAD, context_length=4096)
    assert rids(plans) == [["long"], ["short"]]
    # the same rows with generous reservations (bytes-based upper bounds) share one
    plans = plan_cohorts([w("long", 40, 40, reserved=100), w("short", 4, 8, reserved=100)], max_rows=16,
                         pad_token_id=PAD, context_length=4096)
    assert rids(plans) == [["long", "short"]] and plans[0].max_length == 80
    # padded length past the context: separate cohorts
    plans = plan_cohorts([w("a", 50, 4, reserved=999), w("b", 4, 50, reserved=999)], max_rows=16,
                         pad_token_id=PAD, context_length=80)
    assert len(plans) == 2 and all(p.max_length <= 80 for p in plans)


def test_right_padding():
    plan = CohortPlan([w("a", 3, 1), w("b", 1, 1)])
    assert padded_prompts(plan, PAD) == [[5, 7, 7], [5, PAD, PAD]] and plan.max_length == 4


def test_equal_lengths_keeps_prompts_of_different_lengths_apart():
    waiting = [w("a5", 5, 8, 64), w("b3", 3, 9, 64), w("c5", 5, 2, 64), w("d3", 3, 1, 64), w("e4", 4, 8, 64)]
    mixed = plan_cohorts(waiting, max_rows=16, pad_token_id=PAD, context_length=64)
    assert len(mixed) == 1  # padding allowed: one cohort
    plans = plan_cohorts(waiting, max_rows=16, pad_token_id=PAD, context_length=64, equal_lengths=True)
    assert sorted(sorted(p) for p in rids(plans)) == [["a5", "c5"], ["b3", "d3"], ["e4"]]
    assert all(len({len(r.prompt_ids) for r in p.rows}) == 1 for p in plans)


def test_only_cuda_graphs_with_an_attention_bias_need_equal_lengths(tmp_path, demo_model):
    from compiler_service.llama4.build import build_llama4
    from serving_service.graph_facts import pads_rows_safely
    from tests.llama4_parity import make_checkpoint

    make_checkpoint(tmp_path / "ckpt", demo_model)  # chunks of 8 tokens
    for context, pool in ((64, "cuda"), (8, "cuda"), (64, "cpu")):
        build_llama4(tmp_path / "ckpt", tmp_path / f"{pool}{context}", precision="fp16" if pool == "cuda" else "fp32",
                     pool=pool, context_length=context)
    assert not pads_rows_safely(tmp_path / "cuda64", "cuda")  # chunk mask: attention_bias
    assert pads_rows_safely(tmp_path / "cuda8", "cuda")  # the context fits in one chunk
    assert pads_rows_safely(tmp_path / "cpu64", None) and pads_rows_safely(tmp_path / "cuda64", None)
