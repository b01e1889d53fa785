"""The iteration engine (serving_service.iteration) against onnxruntime-genai and against itself:
greedy tokens equal genai's, whatever the batch shape; rows join, leave and prefill in chunks
between steps; a seeded sampled row draws the same tokens alone and in a batch."""

from __future__ import annotations

import pytest

from tests.iteration_helpers import (drive, genai_build, genai_greedy, kv_bytes_per_token, prompts, rounds_of,
                                     scheduler, start, tokens_by_row)

NEW = 24


@pytest.fixture(scope="module")
def builds(tmp_path_factory, demo_model) -> dict:
    root = tmp_path_factory.mktemp("iteration-builds")
    return {r: genai_build(demo_model, root / r, r) for r in ("fp32", "int4")}


@pytest.fixture(scope="module")
def llama4_checkpoint(tmp_path_factory, demo_model):
    from tests.llama4_parity import make_checkpoint

    root = tmp_path_factory.mktemp("iteration-llama4")
    make_checkpoint(root / "ckpt", demo_model, seed=3, interleave_moe_layer_step=2)
    return root / "ckpt"


def _staggered_matches_genai(build, eos) -> None:
    ps = prompts(2048, (7, 40, 19, 3, 33, 12))
    want = [genai_greedy(build, p, NEW) for p in ps]
    sched, conn = scheduler(build, max_rows=4, prefill_chunk=16, eos=eos)
    # six rows, four slots: later rows wait for a slot; every row arrives at a different round
    drive(sched, conn, {2 * i: [start(f"r{i}", p, NEW)] for i, p in enumerate(ps)})
    got = tokens_by_row(conn)
    for i, w in enumerate(want):
        assert got[f"r{i}"] == w[: len(got[f"r{i}"])] and (len(got[f"r{i}"]) == NEW or got[f"r{i}"][-1] in eos)
    assert sorted(sched.model.kv.free) == [0, 1, 2, 3]


@pytest.mark.parametrize("recipe", ["fp32", "int4"])
def test_greedy_tokens_equal_genai_for_rows_joining_at_different_steps(builds, recipe):
    _staggered_matches_genai(builds[recipe], eos=(2,))


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_llama4_build_greedy_tokens_equal_genai(llama4_checkpoint, tmp_path, precision):
    from compiler_service.llama4.build import build_llama4

    build_llama4(llama4_checkpoint, tmp_path / "build", precision=precision, pool="cpu", context_length=128)
    _staggered_matches_genai(tmp_path / "build", eos=(2, 3))


def test_rows_produce_the_tokens_they_produce_alone(builds):
    build = builds["fp32"]
    ps = prompts(2048, (9, 30, 5, 21), seed=5)
    alone = []
    for p in ps:
        sched, conn = scheduler(build, eos=())
        drive(sched, conn, {0: [start("x", p, NEW)]})
        alone.append(tokens_by_row(conn)["x"])
    sched, conn = scheduler(build, eos=())
    drive(sched, conn, {0: [start("r0", ps[0], NEW)], 3: [start("r1", ps[1], NEW)],
                        4: [start("r2", ps[2], NEW)], 11: [start("r3", ps[3], NEW)]})
    got = tokens_by_row(conn)
    assert [got[f"r{i}"] for i in range(4)] == alone
    steps = [len(msg[1]) for _, msg in conn]
    assert max(steps) >= 3  # they really shared decode steps


def test_cancelled_row_frees_its_slot_mid_batch(builds):
    build = builds["fp32"]
    ps = prompts(2048, (6, 8, 10), seed=2)
    sched, conn = scheduler(build, max_rows=2, eos=())
    # two slots: r2 waits until r0 is cancelled at round 5, then takes its slot (slot 0)
    drive(sched, conn, {0: [start("r0", ps[0], NEW), start("r1", ps[1], NEW), start("r2", ps[2], NEW)],
                        5: [("cancel", "r0")]})
    got = tokens_by_row(conn)
    # round 0 gives r0 two tokens (its prefill's, then the batch step's), rounds 1-4 one each
    assert len(got["r0"]) == 6 and max(rounds_of(conn, "r0")) == 4
    assert (5, ("step", [], ["r0"])) in conn
    assert min(rounds_of(conn, "r2")) == 5  # joined in the round r0 left
    sched_alone, conn_alone = scheduler(build, max_rows=2, eos=())
    drive(sched_alone, conn_alone, {0: [start("r2", ps[2], NEW)]})
    assert got["r2"] == tokens_by_row(conn_alone)["r2"] and got["r1"] and len(got["r1"]) == NEW


def test_long_prompt_is_prefilled_in_chunks_while_another_row_streams(builds):
    build = builds["fp32"]
    short, long = prompts(2048, (5, 100), seed=9)
    sched, conn = scheduler(build, prefill_chunk=16, eos=())
    drive(sched, conn, {0: [start("s", short, 40)], 3: [start("l", long, 8)]})
    s_rounds, l_rounds = rounds_of(conn, "s"), rounds_of(conn, "l")
    # 100 prompt tokens in chunks of 16: seven rounds of prefill (rounds 3..9), first token in round 9
    assert min(l_rounds) == 9
    assert all(r in s_rounds for r in range(3, 10))  # the short row got a token in every one of them
    alone_sched, alone_conn = scheduler(build, prefill_chunk=1000, eos=())
    drive(alone_sched, alone_conn, {0: [start("l", long, 8)]})
    assert tokens_by_row(conn)["l"] == tokens_by_row(alone_conn)["l"]


def test_sampled_rows_with_a_seed_draw_the_same_tokens_alone_and_in_a_batch(builds):
    build = builds["int4"]
    ps = prompts(2048, (6, 14, 9), seed=4)
    sampling = dict(temperature=1.3, top_k=40, top_p=0.95)
    alone = []
    for i, p in enumerate(ps):
        sched, conn = scheduler(build, eos=())
        drive(sched, conn, {0: [start("x", p, NEW, random_seed=100 + i, **sampling)]})
        alone.append(tokens_by_row(conn)["x"])
    sched, conn = scheduler(build, eos=())
    drive(sched, conn, {0: [start("g", ps[0], NEW)], 1: [start("s0", ps[0], NEW, random_seed=100, **sampling)],
                        2: [start("s1", ps[1], NEW, random_seed=101, **sampling)],
                        4: [start("s2", ps[2], NEW, random_seed=102, **sampling)]})
    got = tokens_by_row(conn)
    assert [got["s0"], got["s1"], got["s2"]] == alone
    assert got["g"] == genai_greedy(build, ps[0], NEW)  # a greedy row among them stays greedy
    assert got["s0"] != got["g"]  # sampling really sampled


def test_slots_grow_for_a_longer_row_mid_batch_and_shrink_when_idle(builds):
    build = builds["fp32"]
    short, long = prompts(2048, (6, 50), seed=6)
    alone = []
    for p, new in ((short, 40), (long, 30)):
        sched, conn = scheduler(build, eos=())
        drive(sched, conn, {0: [start("x", p, new)]})
        alone.append(tokens_by_row(conn)["x"])
    sched, conn = scheduler(build, eos=(), start_len=16)
    assert sched.model.shape.max_len == 16
    # the short row needs 46 tokens (slots grow to 64 before it starts); the long one, arriving
    # while it streams, needs 80: the buffers grow to 128 under the running row
    drive(sched, conn, {0: [start("s", short, 40)], 5: [start("l", long, 30)]})
    got = tokens_by_row(conn)
    assert [got["s"], got["l"]] == alone
    assert sched.model.shape.max_len == 16 and not sched.busy()  # back to the start length once idle
    sched.handle(start("big", long, 4096))  # more than the demo's context (4096 tokens) holds
    sched.admit()
    assert conn[-1][1][0] == "error" and conn[-1][1][1] == "big"


def test_decode_worker_child_runs_the_iteration_engine(builds):
    import asyncio

    asyncio.run(_decode_worker_child(builds))


async def _decode_worker_child(builds):
    """Through the real child process and its pipe: tokens as genai's; a cancelled stream frees
    the only slot at once; a sequence that cannot fit is an error for that request only."""
    import asyncio

    from serving_service.decode_worker import DecodeWorker

    build = builds["int4"]
    a, b = prompts(2048, (12, 20), seed=8)
    worker = await DecodeWorker.start("it", str(build), None, 1, 1, engine="iteration")

    async def drain(q):
        out = []
        while True:
            kind, value = await asyncio.wait_for(q.get(), 60)
            if kind != "token":
                return out, kind, value
            out.append(value)

    try:
        qb = worker.submit("b", b, {"max_length": 4096, "do_sample": False}, 4096)
        for _ in range(3):
            assert (await asyncio.wait_for(qb.get(), 60))[0] == "token"
        worker.release("b", finished=False)  # cancelled: its slot (the only one) goes to "a"
        qa = worker.submit("a", a, {"max_length": len(a) + NEW, "do_sample": False}, len(a) + NEW)
        tokens, kind, _ = await drain(qa)
        assert kind == "done" and tokens == genai_greedy(build, a, NEW)[: len(tokens)]
        produced = sum(rows * n for rows, n in worker.step_rows.items())
        assert produced < 1000  # "b" would have run to 4076 tokens before "a" could start
        qc = worker.submit("c", b, {"max_length": len(b) + 5000, "do_sample": False}, len(b) + 5000)
        _, kind, err = await drain(qc)
        assert kind == "error" and "does not fit 4096 tokens" in str(err)
    finally:
        worker.close()


def _alone(build, prompt, new) -> list[int]:
    sched, conn = scheduler(build, eos=())
    drive(sched, conn, {0: [start("x", prompt, new)]})
    return tokens_by_row(conn)["x"]


def test_short_rows_join_beside_a_long_one_at_once_when_the_kv_budget_holds_them(builds):
    build = builds["fp32"]
    short, long = prompts(2048, (6, 30), seed=11)
    # "l" needs 30 + 100 tokens: the slots grow from 16 to 256. Three short rows at 256 tokens
    # each beside it make 4 x 256 = 1024 tokens, within the budget: each joins the round it arrives
    sched, conn = scheduler(build, max_rows=4, eos=(), start_len=16, kv_budget_tokens=1024)
    drive(sched, conn, {0: [start("l", long, 100)], 2: [start("s0", short, 20)], 3: [start("s1", short, 20)],
                        4: [start("s2", short, 20)]})
    l_rounds = rounds_of(conn, "l")
    for i, arrived in enumerate((2, 3, 4)):
        s_rounds = rounds_of(conn, f"s{i}")
        assert min(s_rounds) == arrived and max(s_rounds) < max(l_rounds)
    got = tokens_by_row(conn)
    assert got["l"] == _alone(build, long, 100) and got["s0"] == got["s2"] == _alone(build, short, 20)
    assert sched.model.kv.shape.max_len == 16  # back to the start length once idle


def test_a_row_waits_while_the_kv_budget_cannot_hold_it_beside_a_long_one(builds):
    build = builds["fp32"]
    short, long = prompts(2048, (6, 30), seed=11)
    # "l" takes a 256-token slot; "s" beside it would make 2 x 256 = 512 tokens, beyond the
    # 400-token budget: it waits until "l" leaves, then runs, its tokens as alone
    sched, conn = scheduler(build, max_rows=4, eos=(), start_len=16, kv_budget_tokens=400)
    drive(sched, conn, {0: [start("l", long, 100)], 2: [start("s", short, 20)]})
    l_rounds, s_rounds = rounds_of(conn, "l"), rounds_of(conn, "s")
    assert min(s_rounds) == max(l_rounds) + 1
    assert tokens_by_row(conn)["s"] == _alone(build, short, 20)


def test_kv_budget_that_cannot_hold_the_slots_is_refused_at_load_and_growth_stays_within_it(builds):
    from serving_service.iteration.model import DecoderModel

    build = builds["fp32"]
    per_token = kv_bytes_per_token(build)
    with pytest.raises(ValueError, match="KV budget .* cannot hold 4 slots of 64 tokens"):
        DecoderModel(build, None, 1, 4, kv_budget_bytes=100 * per_token)
    # a budget below 4 x 1024 tokens starts the slots shorter instead of committing too much
    model = DecoderModel(build, None, 1, 4, kv_budget_bytes=1000 * per_token)
    assert model.kv.shape.max_len == 250
    assert not model.kv.fit(600, rows=2)  # 2 x 600 > 1000: refused, nothing allocated
    assert model.kv.shape.max_len == 250
    assert model.kv.fit(600, rows=1) and model.kv.shape.max_len == 1000  # doubled to 1000, the budget, not 2000
    assert not model.kv.fit(1200, rows=1)


def test_decode_worker_refuses_a_kv_budget_too_small_for_its_slots(builds):
    import asyncio

    from serving_service.decode_worker import DecodeWorker, DecodeWorkerError

    async def go():
        with pytest.raises(DecodeWorkerError, match="KV budget"):
            await DecodeWorker.start("tiny", str(builds["fp32"]), None, 1, 4, engine="iteration",
                                     kv_budget_bytes=10 * kv_bytes_per_token(builds["fp32"]))

    asyncio.run(go())


def test_replica_admission_matches_what_the_iteration_engine_commits():
    from serving_service.engine import Engine

    it = Engine(None, "cpu", 4, kv_budget_bytes=1000, serving_engine="iteration")
    assert it.free_kv_bytes([]) == 1000
    assert it.free_kv_bytes([400]) == 500  # two rows fit while each needs at most half
    assert it.free_kv_bytes([600]) == 0  # a second row would double 600: nothing else fits
    assert it.free_kv_bytes([100, 200]) == 333
    genai = Engine(None, "cpu", 4, kv_budget_bytes=1000, serving_engine="genai")
    assert genai.free_kv_bytes([600]) == 400 and genai.free_kv_bytes([100, 200]) == 700
    assert Engine(None, "cuda", 4, kv_budget_bytes=1000, serving_engine="auto").free_kv_bytes([600]) == 400
