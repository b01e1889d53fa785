"""Redis-backed job store and generation queue, against a real Redis server."""

import asyncio

import pytest

from compiler_service.jobs import CANCELLED, FAILED, QUEUED, RUNNING, JobRequest, JobStore
from gateway.gen_queue import GenerationQueue
from shared import redis_conn
from shared.errors import AlreadyExists, NotFound, ResourceExhausted
from shared.generation import Chunk, GenRequest
from shared import redis_keys as keys
from shared.tenancy import Caller


def run(coro):
    return asyncio.run(coro)


async def _fresh(url):
    r = redis_conn.client(url)
    await r.flushdb()
    return r


ALICE, BOB, ADMIN = Caller("alice", False), Caller("bob", False), Caller("ops", True)


def test_job_lifecycle_cancel_and_lease_recovery(redis_url):
    async def body():
        r = await _fresh(redis_url)
        jobs = JobStore(r)
        a = await jobs.create(JobRequest("/x", "m", "fp32"), ALICE)
        b = await jobs.create(JobRequest("/y", "m", "fp32"), ALICE)
        assert (await jobs.next_job(1)) == a.job_id
        cancelled = await jobs.cancel(b.job_id)
        assert cancelled.state == CANCELLED and await jobs.next_job(0.1) is None
        assert (await jobs.cancel(b.job_id)).state == CANCELLED
        # a: started by a worker whose lease (a Redis TTL) then lapses -> re-queued, then failed past max attempts
        running = await jobs.start(a.job_id, "w1", lease_s=0.3)
        assert running.state == RUNNING and running.attempts == 1
        assert await jobs.recover(max_attempts=2) == []  # the lease is live: nobody compares clocks
        await asyncio.sleep(0.4)
        assert await jobs.recover(max_attempts=2) == [a.job_id]
        assert (await jobs.get(a.job_id)).state == QUEUED and await jobs.next_job(1) == a.job_id
        await jobs.start(a.job_id, "w2", lease_s=0.1)
        await asyncio.sleep(0.2)
        await jobs.recover(max_attempts=2)
        assert (await jobs.get(a.job_id)).state == FAILED
        events = await jobs.events(a.job_id, "0-0", block_ms=10)
        assert [j.state for _, j in events][0] == QUEUED and events[-1][1].state == FAILED
        with pytest.raises(NotFound):
            await jobs.get("missing")
        await r.aclose()

    run(body())


def test_a_requeued_job_is_queued_once_and_never_written_back_by_its_old_worker(redis_url):
    async def body():
        r = await _fresh(redis_url)
        one, two = JobStore(r), JobStore(r)  # two compilers
        j = await one.create(JobRequest("/x", "m", "fp32"), ALICE)
        assert await one.next_job(1) == j.job_id
        mine = await one.start(j.job_id, "w1", lease_s=0.2)
        assert await one.renew(mine, 0.2)
        await asyncio.sleep(0.3)  # w1 stalls past its lease
        touched = await asyncio.gather(one.recover(3), two.recover(3))
        assert sorted(touched, key=len) == [[], [j.job_id]]
        assert await r.lrange(keys.COMPILE_QUEUE, 0, -1) == [j.job_id]  # queued once, not twice
        # w1 wakes up: it may neither renew nor report RUNNING over the re-queued record
        assert not await one.renew(mine, 10)
        mine.stage = "build"
        assert not await one.report(mine)
        assert (await one.get(j.job_id)).state == QUEUED
        # a duplicate queue entry cannot start a job twice
        await r.rpush(keys.COMPILE_QUEUE, j.job_id)
        assert await two.start(j.job_id, "w2", 10) is not None
        assert await one.start(j.job_id, "w1", 10) is None
        await r.aclose()

    run(body())


def test_jobs_belong_to_their_tenant_and_events_stay_slim(redis_url):
    async def body():
        r = await _fresh(redis_url)
        jobs = JobStore(r)
        prompts = ["x" * 1000] * 50
        j = await jobs.create(JobRequest("/x", "m", "fp32", quality={"eval_prompts": prompts}), ALICE)
        assert (await jobs.get(j.job_id, ALICE)).tenant == "alice"
        assert (await jobs.get(j.job_id, ADMIN)).job_id == j.job_id
        for call in (jobs.get(j.job_id, BOB), jobs.cancel(j.job_id, BOB)):
            with pytest.raises(NotFound):
                await call
        assert (await jobs.get(j.job_id)).state == QUEUED  # bob's cancel did nothing
        started = await jobs.start(await jobs.next_job(1), "w", 10)
        assert (await jobs.full_request(started)).quality["eval_prompts"] == prompts
        for _ in range(5):
            started.progress += 0.1
            assert await jobs.report(started)
        events = await r.xrange(keys.job_events(j.job_id))
        assert len(events) == 7 and all(len(fields["job"]) < 2000 for _, fields in events)
        assert len(await r.get(keys.job(j.job_id))) < 2000
        await r.aclose()

    run(body())


def test_orphaned_queued_job_requeued_only_after_two_scans(redis_url):
    async def body():
        r = await _fresh(redis_url)
        jobs = JobStore(r)
        j = await jobs.create(JobRequest("/x", "m", "fp32"), ALICE)
        assert await jobs.next_job(1) == j.job_id  # taken, then the taker died before marking it running
        assert await jobs.recover(2) == []
        assert await jobs.recover(2) == [j.job_id]
        assert await jobs.next_job(1) == j.job_id
        await r.aclose()

    run(body())


def test_queue_backpressure_cancel_and_relay(redis_url):
    async def body():
        r = await _fresh(redis_url)
        q = GenerationQueue(r, max_depth=2, wait_timeout_s=5)
        reqs = [GenRequest(f"r{i}", "m", "p", 4) for i in range(3)]
        e0 = await q.enqueue(reqs[0], "cpu", 64)
        await q.enqueue(reqs[1], "cpu", 64)
        with pytest.raises(ResourceExhausted) as info:
            await q.enqueue(reqs[2], "cpu", 64)
        assert info.value.retry_after_s and "queue is full" in info.value.message
        await q.withdraw(e0)
        with pytest.raises(AlreadyExists):
            await q.enqueue(reqs[1], "cpu", 64)
        assert await q.depth("cpu") == {"interactive": 1, "batch": 0}
        sid = keys.request_scope("default", "r1")
        await r.xadd(keys.response_stream(sid), Chunk("tokens", text="a", token_ids=[5]).to_fields())
        await r.xadd(keys.response_stream(sid), Chunk("end", finish_reason="length").to_fields())
        got = [c async for _cursor, c in q.responses("r1", "default", "cpu", e0)]
        assert [c.kind for c in got] == ["tokens", "end"] and not await r.exists(keys.response_stream(sid))
        assert await q.cancel("r0", "default") is False  # withdrawn above: nothing in flight
        assert await q.cancel("r1", "default") and await q.cancel("r1", "default")
        assert await r.exists(keys.cancel_flag(sid))
        await r.aclose()

    run(body())
