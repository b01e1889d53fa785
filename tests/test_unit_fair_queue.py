"""The pool queue's fairness, priorities, limits and KV admission, against a real Redis server."""

import asyncio

import pytest

from gateway.gen_queue import GenerationQueue
from shared import redis_conn
from shared.errors import ResourceExhausted
from shared.fair_queue import FairQueue, Picked
from shared.generation import GenRequest

BUDGET = 1 << 40
PER_TOKEN = {"m": 1}


def run(coro):
    return asyncio.run(coro)


async def _setup(url, **kw):
    r = redis_conn.client(url)
    await r.flushdb()
    return r, GenerationQueue(r, wait_timeout_s=5, **kw)


def _req(rid, tenant="default", priority="interactive", prompt="p", max_tokens=4):
    return GenRequest(rid, "m", prompt, max_tokens, tenant=tenant, priority=priority)


async def _drain(fq: FairQueue, free=BUDGET) -> list[str]:
    order = []
    while isinstance(picked := await fq.pick("replica-a", free, BUDGET, PER_TOKEN), Picked):
        order.append(GenRequest.from_json(picked.request_json).request_id)
    return order


def test_tenants_take_turns_and_interactive_goes_first(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=100)
        for i in range(6):  # tenant a floods first
            await q.enqueue(_req(f"a{i}", "a"), "cpu", 64)
        await q.enqueue(_req("b0", "b"), "cpu", 64)
        await q.enqueue(_req("b1", "b"), "cpu", 64)
        await q.enqueue(_req("c0", "c", "batch"), "cpu", 64)
        await q.enqueue(_req("b2", "b"), "cpu", 64)
        order = await _drain(q.pool("cpu"))
        assert order == ["a0", "b0", "a1", "b1", "a2", "b2", "a3", "a4", "a5", "c0"]
        assert await q.depth("cpu") == {"interactive": 9, "batch": 1}  # taken, running until finished
        await r.aclose()

    run(body())


def test_per_tenant_limit_leaves_room_for_others(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=10, tenant_max=3)
        for i in range(3):
            await q.enqueue(_req(f"a{i}", "a"), "cpu", 64)
        with pytest.raises(ResourceExhausted) as info:
            await q.enqueue(_req("a3", "a", "batch"), "cpu", 64)  # the limit spans priorities
        assert "tenant 'a'" in info.value.message and info.value.retry_after_s
        await q.enqueue(_req("ab0", "ab"), "cpu", 64)  # a tenant whose name extends another's
        await q.enqueue(_req("b0", "b:x y"), "cpu", 64)  # names that are not key-safe
        assert await _drain(q.pool("cpu")) == ["a0", "ab0", "b0", "a1", "a2"]
        await r.aclose()

    run(body())


def test_kv_budget_admission_is_head_of_line(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=10)
        fq = q.pool("cpu")
        # cost = prompt bytes + 2 + max_tokens (1 byte per token of KV here)
        big = await q.enqueue(_req("big", prompt="x" * 90, max_tokens=8), "cpu", 4096)  # cost 100
        await q.enqueue(_req("small", "b", max_tokens=1), "cpu", 4096)  # cost 4
        assert await fq.pick("replica-a", 99, 1000, PER_TOKEN) == "WAIT"  # big first, even though small fits
        picked = await fq.pick("replica-a", 100, 1000, PER_TOKEN)
        assert isinstance(picked, Picked) and picked.entry == big
        # larger than the whole budget: taken (the replica refuses it) instead of blocking the queue
        await q.enqueue(_req("huge", prompt="x" * 5000), "cpu", 4096)
        assert [GenRequest.from_json(p.request_json).request_id for p in
                [await fq.pick("replica-a", 4, 1000, PER_TOKEN), await fq.pick("replica-a", 1000, 1000, PER_TOKEN)]] \
            == ["small", "huge"]
        assert await fq.pick("replica-a", 1000, 1000, PER_TOKEN) is None
        await r.aclose()

    run(body())


def test_withdrawn_request_is_never_picked_and_doorbell_rings(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=10)
        fq = q.pool("cpu")
        bell = await fq.latest_bell()
        e = await q.enqueue(_req("gone"), "cpu", 64)
        assert await fq.wait_bell(bell, 100) != bell
        await q.withdraw(e)
        await q.enqueue(_req("kept"), "cpu", 64)
        other = _req("other", "b")
        other.model = "not-loaded-here"
        await q.enqueue(other, "cpu", 64)
        await q.enqueue(_req("c0", "c"), "cpu", 64)
        assert await _drain(fq) == ["kept", "c0"]  # left for a replica that serves its model
        picked = await fq.pick("replica-b", BUDGET, BUDGET, {"not-loaded-here": 1})
        assert isinstance(picked, Picked) and GenRequest.from_json(picked.request_json).request_id == "other"
        await r.aclose()

    run(body())


def test_only_the_owning_tenant_finds_a_relayed_request(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=10, relay_lease_s=1)
        e = await q.enqueue(_req("mine", "acme"), "cpu", 64)
        assert await q.find("mine", "acme") == e
        assert await q.find("mine", "other") is None and await q.find("unknown", "acme") is None
        await asyncio.sleep(2.2)  # nobody relays it: the lease runs out
        assert await q.find("mine", "acme") is None
        await r.aclose()

    run(body())
