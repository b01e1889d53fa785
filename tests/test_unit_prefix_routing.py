"""Prefix routing: the gateway's rendezvous choice (gateway.prefix_routing) and the pick script's
grace for a request's preferred replica (shared.request_protocol), against a real Redis server."""

import asyncio
import time
from collections import Counter

from gateway.gen_queue import GenerationQueue
from gateway.prefix_routing import PrefixRouter, prefix_text, rendezvous
from shared import redis_conn
from shared.catalog import ReplicaHeartbeat
from shared.generation import GenRequest
from shared.request_protocol import Held, Picked, PoolQueue

BUDGET = 1 << 40
PER_TOKEN = {"m": 1}
LONG = "You are a careful assistant. " * 40  # 1160 characters


def run(coro):
    return asyncio.run(coro)


def _req(rid, prompt=LONG, tenant="default", **kw):
    return GenRequest(rid, "m", prompt, 4, tenant=tenant, **kw)


def _rid(picked: Picked) -> str:
    return GenRequest.from_json(picked.request_json).request_id


def test_prefix_text_needs_a_long_enough_prompt_or_chat():
    assert prefix_text(_req("a", "x" * 600), 512) == "x" * 512
    assert prefix_text(_req("a", "x" * 511), 512) is None
    assert prefix_text(_req("a", "x" * 600), 0) is None
    chat = _req("a", "", messages=[{"role": "system", "content": "s" * 600}, {"role": "user", "content": "hi"}])
    assert prefix_text(chat, 512) == "system\n" + "s" * 505


def test_rendezvous_is_stable_and_moves_only_what_a_gone_replica_held():
    replicas = ["cpu-0", "cpu-1", "cpu-2", "cpu-3"]
    keys = [f"prefix {i}" for i in range(400)]
    chosen = {k: rendezvous(k, replicas) for k in keys}
    assert chosen == {k: rendezvous(k, list(reversed(replicas))) for k in keys}  # order does not matter
    spread = Counter(chosen.values())
    assert set(spread) == set(replicas) and min(spread.values()) > 60
    after = {k: rendezvous(k, replicas[:3]) for k in keys}
    assert all(after[k] == chosen[k] for k in keys if chosen[k] != "cpu-3")
    assert rendezvous("x", []) == ""


def test_router_prefers_among_replicas_serving_the_model():
    hbs = [ReplicaHeartbeat("cpu-0", "cpu", "a", 4, 0, {"m": "b1"}), ReplicaHeartbeat("cpu-1", "cpu", "b", 4, 0, {"m": "b1"}),
           ReplicaHeartbeat("cpu-2", "cpu", "c", 4, 0, {"other": "b2"}), ReplicaHeartbeat("gpu-0", "cuda", "d", 4, 0, {"m": "b3"})]
    reads = []

    async def live():
        reads.append(1)
        return hbs

    async def body():
        router = PrefixRouter(512, live)
        picks = {await router.preferred(_req(f"r{i}", f"{i} " + LONG), "cpu") for i in range(40)}
        assert picks == {"cpu-0", "cpu-1"}
        assert await router.preferred(_req("same", LONG), "cpu") == await router.preferred(_req("again", LONG), "cpu")
        assert await router.preferred(_req("short", "hi"), "cpu") == ""
        assert await router.preferred(_req("one", LONG), "cuda") == ""  # a single replica: no preference
        assert len(reads) == 1  # the live replicas are read at most once a second

    run(body())


async def _setup(url):
    r = redis_conn.client(url)
    await r.flushdb()
    return r, GenerationQueue(r, wait_timeout_s=5, max_depth=100)


async def _pick(q: PoolQueue, consumer: str, grace_s: float = 10.0, running: dict | None = None, slots: int = 4):
    return await q.pick(consumer, BUDGET, BUDGET, PER_TOKEN, running or {}, False, slots, 0.0, grace_s)


def test_a_request_waits_for_its_preferred_replica_while_it_has_room(redis_url):
    async def body():
        r, gq = await _setup(redis_url)
        q = gq.pool("cpu")
        assert await _pick(q, "cpu-b") is None  # cpu-b reports 4 free slots
        await q.enqueue(_req("r1"), cost=8, max_depth=100, tenant_max=100, preferred="cpu-b")
        held = await _pick(q, "cpu-a")
        assert isinstance(held, Held) and 0 < held.wait_ms <= 10_000
        got = await _pick(q, "cpu-b")
        assert isinstance(got, Picked) and _rid(got) == "r1" and got.preferred == "cpu-b"

        # a short grace: anyone takes it once the grace has passed
        await q.enqueue(_req("r2"), cost=8, max_depth=100, tenant_max=100, preferred="cpu-b")
        assert isinstance(await _pick(q, "cpu-a", grace_s=0.2), Held)
        await asyncio.sleep(0.25)
        got = await _pick(q, "cpu-a", grace_s=0.2)
        assert isinstance(got, Picked) and _rid(got) == "r2" and got.preferred == "cpu-b"
        await r.aclose()

    run(body())


def test_a_full_or_gone_preferred_replica_is_not_waited_for(redis_url):
    async def body():
        r, gq = await _setup(redis_url)
        q = gq.pool("cpu")
        await q.report_room("cpu-b", 0)  # full
        await q.enqueue(_req("r1"), cost=8, max_depth=100, tenant_max=100, preferred="cpu-b")
        t0 = time.monotonic()
        got = await _pick(q, "cpu-a")
        assert isinstance(got, Picked) and _rid(got) == "r1" and time.monotonic() - t0 < 5

        # its last pick took its last slot: it reports 0 free
        assert await _pick(q, "cpu-c", slots=1) is None
        await q.enqueue(_req("r2"), cost=8, max_depth=100, tenant_max=100, preferred="cpu-c")
        got = await _pick(q, "cpu-c", slots=1)
        assert isinstance(got, Picked) and _rid(got) == "r2"
        await q.enqueue(_req("r3"), cost=8, max_depth=100, tenant_max=100, preferred="cpu-c")
        got = await _pick(q, "cpu-a")
        assert isinstance(got, Picked) and _rid(got) == "r3"

        # a replica that never reported (or whose report expired) is gone
        await q.enqueue(_req("r4"), cost=8, max_depth=100, tenant_max=100, preferred="cpu-gone")
        got = await _pick(q, "cpu-a")
        assert isinstance(got, Picked) and _rid(got) == "r4"
        await r.aclose()

    run(body())


def test_a_held_request_does_not_hold_other_tenants(redis_url):
    async def body():
        r, gq = await _setup(redis_url)
        q = gq.pool("cpu")
        assert await _pick(q, "cpu-b") is None
        await q.enqueue(_req("a1", tenant="a"), cost=8, max_depth=100, tenant_max=100, preferred="cpu-b")
        await q.enqueue(_req("b1", tenant="b"), cost=8, max_depth=100, tenant_max=100)
        got = await _pick(q, "cpu-a")
        assert isinstance(got, Picked) and _rid(got) == "b1" and got.preferred == ""
        assert isinstance(await _pick(q, "cpu-a"), Held)
        await r.aclose()

    run(body())
