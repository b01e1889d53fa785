"""The iteration engine's prefix cache (serving_service.iteration.prefix_cache): a prompt that
shares a cached prefix prefills only the rest and decodes exactly the tokens it decodes without
the cache; blocks are keyed by their whole prefix; eviction is least recently used first and
keeps the cache within its bytes."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving_service.iteration.prefix_cache import BLOCK, PrefixCache, block_keys
from tests.iteration_helpers import drive, genai_build, prompts, scheduler, start, tokens_by_row

NEW = 16


@pytest.fixture(scope="module")
def build(tmp_path_factory, demo_model):
    return genai_build(demo_model, tmp_path_factory.mktemp("prefix-builds") / "fp32", "fp32")


def _count_prefill(sched) -> list[int]:
    """Prompt tokens each prefill forward call feeds (decode steps feed one token per row)."""
    fed: list[int] = []
    forward = sched.model.forward

    def counting(slot, ids, mask):
        if ids.shape[1] > 1 or ids.shape[0] == 1 and mask.shape[1] == 1:
            fed.append(ids.shape[1])
        return forward(slot, ids, mask)

    sched.model.forward = counting
    return fed


def test_a_shared_512_token_prefix_is_not_prefilled_again_and_the_tokens_are_the_same(build):
    system, turn_a, turn_b = prompts(2048, (512, 23, 31), seed=21)
    first, second = system + turn_a[1:], system + turn_b[1:]
    off, off_conn = scheduler(build, eos=())
    drive(off, off_conn, {0: [start("a", first, NEW)], 1: [start("b", second, NEW)]})
    on, on_conn = scheduler(build, eos=(), prefix_cache_bytes=64 << 20)
    fed = _count_prefill(on)
    drive(on, on_conn, {0: [start("t1:a", first, NEW)]})  # the replica's ids are scoped: "<tenant>:<id>"
    assert sum(fed) == len(first)
    fed.clear()
    drive(on, on_conn, {0: [start("t1:b", second, NEW)]})
    assert [t for _, t in sorted(tokens_by_row(on_conn).items())] == [t for _, t in sorted(tokens_by_row(off_conn).items())]
    assert sum(fed) == len(second) - 512  # only the suffix (the system prompt is 8 whole blocks)
    stats = on.prefix.stats
    assert (stats.hits, stats.misses, stats.saved_tokens) == (1, 1, 512)
    assert stats.blocks == len(first) // BLOCK + (len(second) // BLOCK - 8)
    assert [m for _, m in on_conn if m[0] == "prefix"][-1] == ("prefix", stats.as_dict())  # totals to the parent


def test_a_tenant_never_hits_another_tenants_prefix(build):
    """A hit shows as a faster first token: one tenant must not learn what another's prompts start with."""
    system, turn_a, turn_b = prompts(2048, (512, 23, 31), seed=21)
    sched, conn = scheduler(build, eos=(), prefix_cache_bytes=64 << 20)
    drive(sched, conn, {0: [start("t1:a", system + turn_a[1:], NEW)]})
    drive(sched, conn, {0: [start("t2:a", system + turn_b[1:], NEW)]})
    assert (sched.prefix.stats.hits, sched.prefix.stats.saved_tokens) == (0, 0)
    drive(sched, conn, {0: [start("t1:b", system + turn_b[1:], NEW)]})
    assert (sched.prefix.stats.hits, sched.prefix.stats.saved_tokens) == (1, 512)


def test_prefixes_that_differ_in_one_token_do_not_hit_past_it(build):
    (base,) = prompts(2048, (300,), seed=22)
    other = list(base)
    other[100] = other[100] + 1  # block 1 (tokens 64..127) differs
    sched, conn = scheduler(build, eos=(), prefix_cache_bytes=64 << 20)
    drive(sched, conn, {0: [start("a", base, NEW)]})
    drive(sched, conn, {0: [start("b", other, NEW)]})
    assert sched.prefix.stats.saved_tokens == BLOCK
    alone, alone_conn = scheduler(build, eos=())
    drive(alone, alone_conn, {0: [start("b", other, NEW)]})
    assert tokens_by_row(conn)["b"] == tokens_by_row(alone_conn)["b"]
    # the whole prompt: only whole blocks before its last token are taken from the cache
    drive(sched, conn, {0: [start("c", base[:256], NEW)]})
    assert sched.prefix.stats.saved_tokens == BLOCK + 192


def _kv(tokens: int, fill: float) -> list[np.ndarray]:
    return [np.full((2, tokens, 4), fill, np.float32) for _ in range(4)]  # two layers, keys and values


def test_eviction_is_least_recently_used_first_and_bytes_stay_within_the_cap():
    block_bytes = 4 * 2 * BLOCK * 4 * 4
    cache = PrefixCache(5 * block_bytes)
    rng = np.random.default_rng(0)
    chains = [[int(t) for t in rng.integers(0, 1000, 2 * BLOCK)] for _ in range(6)]
    for i, chain in enumerate(chains[:2]):
        cache.store(chain, _kv(2 * BLOCK, i))
    assert cache.stats.blocks == 4 and cache.stats.evictions == 0
    assert cache.lookup(chains[0] + [7])  # chain 0 is now the most recently used
    for i, chain in enumerate(chains[2:], start=2):
        cache.store(chain, _kv(2 * BLOCK, i))
        assert cache.stats.bytes <= 5 * block_bytes
    assert cache.stats.bytes == 5 * block_bytes and cache.stats.evictions == 7
    keys = [block_keys(c) for c in chains]
    # the newest chain whole, and of the one before it the head (stored after its tail)
    assert cache.keys()[-2:] == [keys[5][1], keys[5][0]] and keys[4][0] in cache
    assert keys[0][0] not in cache and keys[1][0] not in cache
    got = cache.lookup(chains[5] + [1])
    assert got[0].shape == (2, 2 * BLOCK, 4) and float(got[0][0, 0, 0]) == 5.0
    # a lookup that hits takes blocks of this chain only, never past the first missing one
    assert cache.lookup(chains[4][:BLOCK] + chains[5][BLOCK:] + [1])[0].shape[1] == BLOCK


def test_scheduler_cache_under_kv_pressure_keeps_its_cap(build):
    ps = prompts(2048, (200,) * 8, seed=23)
    from tests.iteration_helpers import kv_bytes_per_token

    cap = 5 * BLOCK * kv_bytes_per_token(build)
    sched, conn = scheduler(build, eos=(), prefix_cache_bytes=cap)
    for i, p in enumerate(ps):
        drive(sched, conn, {0: [start(f"r{i}", p, 4)]})
        assert sched.prefix.stats.bytes <= cap
    assert sched.prefix.stats.evictions == 8 * 3 - 5 and sched.prefix.stats.hits == 0
    drive(sched, conn, {0: [start("again", ps[-1], 4)]})  # the latest prompt is still cached
    assert sched.prefix.stats.hits == 1 and sched.prefix.stats.saved_tokens == 3 * BLOCK


def test_decode_worker_reports_prefix_cache_totals_to_the_parent(build):
    from prometheus_client import REGISTRY

    from serving_service.decode_worker import DecodeWorker

    system, a, b = prompts(2048, (512, 10, 12), seed=24)

    def saved() -> float:
        return REGISTRY.get_sample_value("llamaship_serving_prefix_cache_saved_prefill_tokens_total",
                                         {"pool": "cpu"}) or 0.0

    async def go():
        worker = await DecodeWorker.start("pc", str(build), None, 1, 2, engine="iteration", prefix_cache_bytes=64 << 20)
        before = saved()
        try:
            for rid, p in (("a", system + a), ("b", system + b)):
                q = worker.submit(rid, p, {"max_length": len(p) + 4, "do_sample": False}, len(p) + 4)
                while (await asyncio.wait_for(q.get(), 60))[0] == "token":
                    pass
                worker.release(rid, finished=True)
            for _ in range(100):  # the totals follow the step that finished
                if worker.prefix_stats.get("hits"):
                    break
                await asyncio.sleep(0.05)
            assert worker.prefix_stats["hits"] == 1 and worker.prefix_stats["saved_tokens"] == 512
            assert saved() - before == 512
        finally:
            worker.close()

    asyncio.run(go())
