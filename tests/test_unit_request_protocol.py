"""The per-request generation protocol (shared.request_protocol) against a real Redis server:
fairness, priorities, limits, KV admission, tenant-scoped ids, ownership, liveness, deadlines."""

import asyncio
import time

import pytest

from gateway.gen_queue import GenerationQueue
from serving_service.engine import Engine
from serving_service.queue_worker import QueueWorker
from shared import catalog, config, redis_conn
from shared import redis_keys as keys
from shared.catalog import ReplicaHeartbeat
from shared.errors import AlreadyExists, ResourceExhausted
from shared.generation import Chunk, GenRequest
from shared.request_protocol import Picked, PoolQueue, Requests
from shared.store import BuildStore

BUDGET = 1 << 40
PER_TOKEN = {"m": 1}


def run(coro):
    return asyncio.run(coro)


async def _setup(url, **kw):
    r = redis_conn.client(url)
    await r.flushdb()
    return r, GenerationQueue(r, wait_timeout_s=5, **kw)


def _req(rid, tenant="default", priority="interactive", prompt="p", max_tokens=4, **kw):
    return GenRequest(rid, "m", prompt, max_tokens, tenant=tenant, priority=priority, **kw)


def _rid(picked: Picked) -> str:
    return GenRequest.from_json(picked.request_json).request_id


async def _drain(fq: PoolQueue, free=BUDGET) -> list[str]:
    order = []
    while isinstance(picked := await fq.pick("replica-a", free, BUDGET, PER_TOKEN), Picked):
        order.append(_rid(picked))
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
        assert [_rid(p) for p in [await fq.pick("replica-a", 4, 1000, PER_TOKEN),
                                  await fq.pick("replica-a", 1000, 1000, PER_TOKEN)]] == ["small", "huge"]
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
        assert isinstance(picked, Picked) and _rid(picked) == "other"
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


def test_request_ids_are_scoped_per_tenant_and_cancel_checks_the_tenant(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=10)
        fq = q.pool("cpu")
        mine = await q.enqueue(_req("job-1", "acme"), "cpu", 64)
        with pytest.raises(AlreadyExists):
            await q.enqueue(_req("job-1", "acme"), "cpu", 64)  # reuse within a tenant: refused
        theirs = await q.enqueue(_req("job-1", "globex"), "cpu", 64)  # the same id elsewhere: its own request
        assert mine != theirs

        # another tenant can neither cancel nor pre-cancel, nor learn that the id is in flight
        assert await q.cancel("job-1", "initech") is False
        assert await q.cancel("not-yet-used", "acme") is False
        assert not await r.keys(keys.cancel_flag("*"))
        assert await q.cancel("job-1", "acme") is True
        assert await q.cancel("job-1", "acme") is True  # idempotent
        assert await r.exists(keys.cancel_flag(keys.request_scope("acme", "job-1")))
        assert not await r.exists(keys.cancel_flag(keys.request_scope("globex", "job-1")))

        # the replica sees each request under its own scoped id
        picked = [await fq.pick("replica-a", BUDGET, BUDGET, PER_TOKEN) for _ in range(2)]
        assert sorted(p.sid for p in picked) == ["acme:job-1", "globex:job-1"]
        assert {p.tenant for p in picked} == {"acme", "globex"}
        for p in picked:
            assert await fq.finish(p.entry, "replica-a")
        assert await q.cancel("job-1", "globex") is False  # ended: nothing in flight
        await r.aclose()

    run(body())


def test_a_stale_owner_cannot_finish_the_new_owners_entry(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=10)
        fq, requests = q.pool("cpu"), Requests(r)
        entry = await q.enqueue(_req("r1"), "cpu", 64)
        taken = await fq.pick("replica-a", BUDGET, BUDGET, PER_TOKEN)
        assert taken.entry == entry and await requests.consumer_of(entry) == "replica-a"
        await asyncio.sleep(1.1)  # replica-a misses heartbeats (no liveness key): replica-b takes over
        [claimed] = await fq.reclaim(entry.stream, "replica-b", "replica-a", 4, BUDGET, BUDGET, PER_TOKEN)
        assert claimed.entry == entry and claimed.sid == "default:r1"
        # replica-a stops at its next write and finishes: the entry stays with replica-b
        assert await fq.finish(entry, "replica-a") is False
        assert await requests.consumer_of(entry) == "replica-b" and await requests.queued(entry)
        assert await fq.finish(entry, "replica-b") is True
        assert not await requests.queued(entry) and await requests.consumer_of(entry) == ""
        await r.aclose()

    run(body())


def test_reclaim_applies_admission_and_skips_live_replicas(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=10)
        fq = q.pool("cpu")
        other = _req("other-model")
        other.model = "elsewhere"
        await q.enqueue(other, "cpu", 64)
        await q.enqueue(_req("big", prompt="x" * 90, max_tokens=8), "cpu", 4096)  # cost 100
        await q.enqueue(_req("small", max_tokens=1), "cpu", 4096)  # cost 4
        per_token = {"m": 1, "elsewhere": 1}
        stream = keys.gen_stream("cpu", "interactive", "default")
        for _ in range(3):
            assert isinstance(await fq.pick("dead", BUDGET, BUDGET, per_token), Picked)
        await asyncio.sleep(1.1)

        await catalog.put_heartbeat(r, ReplicaHeartbeat("dead", "cpu", "x:1", 4, 3), alive_s=5)
        assert await fq.reclaim(stream, "me", "dead", 4, BUDGET, BUDGET, PER_TOKEN) == []  # it is alive
        await catalog.remove_heartbeat(r, "dead")
        # a model not loaded here is left; the big one does not fit the free KV: it waits (head of line)
        assert await fq.reclaim(stream, "me", "dead", 4, 50, 1000, PER_TOKEN) == []
        got = await fq.reclaim(stream, "me", "dead", 4, 104, 1000, PER_TOKEN)
        assert [_rid(p) for p in got] == ["big", "small"]
        assert [_rid(p) for p in await fq.reclaim(stream, "me", "dead", 1, BUDGET, BUDGET, per_token)] \
            == ["other-model"]
        await r.aclose()

    run(body())


def test_fair_slots_hold_a_tenant_at_its_share_while_another_waits(redis_url):
    async def body():
        r, q = await _setup(redis_url, max_depth=20)
        fq = q.pool("cpu")
        for i in range(4):
            await q.enqueue(_req(f"a{i}", "a"), "cpu", 64)
        await q.enqueue(_req("b0", "b"), "cpu", 64)

        def pick(running, fair=True, slots=4):
            return fq.pick("replica-a", BUDGET, BUDGET, PER_TOKEN, running, fair, slots)

        # a runs 2 of 4 slots and b waits: a is at its share (4 slots / 2 tenants), b goes first
        assert _rid(await pick({"a": 2})) == "b0"
        # nobody else waits: a may use every free slot
        assert _rid(await pick({"a": 2, "b": 1})) == "a0"
        assert _rid(await pick({"a": 3}, fair=False, slots=5)) == "a1"  # without fair slots: the ring's turn
        await q.enqueue(_req("b1", "b"), "cpu", 64)
        assert _rid(await pick({"a": 3}, fair=False, slots=5)) == "a2"
        assert _rid(await pick({"a": 3}, slots=5)) == "b1"
        # both at their share (5 slots / 2 tenants) and a slot free: it is used rather than left idle
        await q.enqueue(_req("b2", "b"), "cpu", 64)
        assert _rid(await pick({"a": 2, "b": 2}, slots=5)) in ("a3", "b2")
        await r.aclose()

    run(body())


def test_headroom_keeps_the_last_slot_from_a_tenant_that_runs_everything(redis_url):
    """Four long requests of one tenant took all 4 slots; another tenant's short one then waited
    for one of them to end (25.6 s in the probe)."""
    async def body():
        r, q = await _setup(redis_url, max_depth=20)
        fq = q.pool("cpu")
        for i in range(4):
            await q.enqueue(_req(f"a{i}", "a"), "cpu", 64)

        def pick(running, headroom_s=300.0):
            return fq.pick("replica-a", BUDGET, BUDGET, PER_TOKEN, running, True, 4, headroom_s)

        # only tenant a has ever used the pool: it may take every slot
        assert _rid(await pick({"a": 3})) == "a0"
        await q.enqueue(_req("b0", "b"), "cpu", 64)
        assert _rid(await pick({"a": 2})) == "b0"  # b's request is served at once
        # b used the pool a moment ago: a, running everything, may not take the last slot ...
        assert await pick({"a": 3}) is None
        # ... but may take one that leaves a slot free, and the last one when headroom is off
        assert _rid(await pick({"a": 2})) == "a1"
        assert _rid(await pick({"a": 3}, headroom_s=0)) == "a2"
        # b running here too: the last slot is not all a's, so a takes it
        assert _rid(await pick({"a": 2, "b": 1})) == "a3"
        await r.aclose()

    run(body())


async def _run_taken(worker: QueueWorker, picked: Picked) -> None:
    """Start a taken request the way the worker does, and wait for it to end."""
    worker._spawn(picked, resume=False)
    await asyncio.gather(*worker.tasks)


def test_liveness_and_deadlines_ignore_host_clocks(redis_url, monkeypatch, tmp_path):
    async def body():
        r, q = await _setup(redis_url, max_depth=10)
        real_time = time.time
        monkeypatch.setattr(time, "time", lambda: real_time() - 3600)  # this host runs an hour late
        await catalog.put_heartbeat(r, ReplicaHeartbeat("late", "cpu", "x:1", 4, 0), alive_s=2)
        monkeypatch.setattr(time, "time", lambda: real_time() + 3600)  # this one an hour early
        assert await catalog.replica_alive(r, "late")
        assert [hb.replica_id for hb in await catalog.live_replicas(r)] == ["late"]
        await asyncio.sleep(2.2)
        assert not await catalog.replica_alive(r, "late") and await catalog.live_replicas(r) == []

        # the deadline counts from the enqueue on Redis's clock, whatever the replica's clock says
        fq, requests = q.pool("cpu"), Requests(r)
        worker = QueueWorker(r, Engine(BuildStore(tmp_path).ensure(), "cpu", 2), "replica-a")
        outcomes = {}
        for rid, deadline_s in (("in-time", 30.0), ("too-late", 0.05)):
            await q.enqueue(_req(rid, deadline_s=deadline_s), "cpu", 64)
            await asyncio.sleep(0.1)
            picked = await fq.pick("replica-a", BUDGET, BUDGET, PER_TOKEN)
            await _run_taken(worker, picked)
            [(_, last)] = await requests.read(picked.sid, "0-0", block_ms=0)
            outcomes[rid] = last.error_code
        # in time it reaches the engine (which has no build loaded here); too late it never does
        assert outcomes == {"in-time": "NOT_FOUND", "too-late": "DEADLINE_EXCEEDED"}
        await r.aclose()

    run(body())


def test_an_unreadable_entry_is_answered_with_an_error_chunk(redis_url, tmp_path):
    async def body():
        r, q = await _setup(redis_url, max_depth=10)
        fq, requests = q.pool("cpu"), Requests(r)
        entry = await q.enqueue(_req("r1"), "cpu", 64)
        picked = await fq.pick("replica-a", BUDGET, BUDGET, PER_TOKEN)
        worker = QueueWorker(r, Engine(BuildStore(tmp_path).ensure(), "cpu", 2), "replica-a")
        await _run_taken(worker, Picked(entry, '{"prompt": "no model or id"}', picked.sid, picked.tenant))
        [(_, chunk)] = await requests.read("default:r1", "0-0", block_ms=0)
        assert chunk.kind == "error" and chunk.error_code == "UNAVAILABLE" and "may be retried" in chunk.error_message
        assert not await requests.queued(entry)
        await r.aclose()

    run(body())


def test_records_from_other_versions_decode():
    hb = ReplicaHeartbeat.from_json('{"replica_id": "r", "pool": "cpu", "address": "a:1", "slots": 4, "active": 0, '
                                    '"ts": 1.0, "gpu_memory": 12}')
    assert hb.replica_id == "r" and hb.builds == {}
    req = GenRequest.from_json('{"request_id": "x", "model": "m", "prompt": "p", "max_tokens": 3, '
                               '"enqueued_at": 5.0, "deadline": 9.0, "new_option": true}')
    assert req.max_tokens == 3 and req.deadline_s is None
    assert Chunk.from_fields({"c": '{"kind": "end", "logprobs": []}'}).kind == "end"


def test_stale_time_must_cover_two_heartbeats():
    with pytest.raises(config.ConfigError, match="at least twice"):
        config.resolve(config.SERVING, {"replica_stale_s": "3", "heartbeat_s": "2"}, env={})
    assert config.resolve(config.SERVING, {"replica_stale_s": "4", "heartbeat_s": "2"}, env={}).heartbeat_s == 2
