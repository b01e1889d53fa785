"""Redis-backed job store and generation queue, against a real Redis server."""

import asyncio
import time

import pytest

from compiler_service.jobs import CANCELLED, FAILED, QUEUED, RUNNING, JobRequest, JobStore
from gateway.gen_queue import GenerationQueue
from shared import redis_conn
from shared.errors import AlreadyExists, NotFound, ResourceExhausted
from shared.generation import Chunk, GenRequest
from shared import redis_keys as keys


def run(coro):
    return asyncio.run(coro)


async def _fresh(url):
    r = redis_conn.client(url)
    await r.flushdb()
    return r


def test_job_lifecycle_cancel_and_recovery(redis_url):
    async def body():
        r = await _fresh(redis_url)
        jobs = JobStore(r)
        a = await jobs.create(JobRequest("/x", "m", "fp32"))
        b = await jobs.create(JobRequest("/y", "m", "fp32"))
        assert (await jobs.next_job(1)) == a.job_id
        cancelled = await jobs.cancel(b.job_id)
        assert cancelled.state == CANCELLED and await jobs.next_job(0.1) is None
        assert (await jobs.cancel(b.job_id)).state == CANCELLED
        # a: taken by a worker that died with its lease expired -> re-queued, then failed past max attempts
        await jobs.update(a.job_id, state=RUNNING, attempts=1, lease_until=time.time() - 1)
        assert await jobs.recover(max_attempts=2) == [a.job_id]
        assert (await jobs.get(a.job_id)).state == QUEUED and await jobs.next_job(1) == a.job_id
        await jobs.update(a.job_id, state=RUNNING, attempts=2, lease_until=time.time() - 1)
        await jobs.recover(max_attempts=2)
        assert (await jobs.get(a.job_id)).state == FAILED
        events = await jobs.events(a.job_id, "0-0", block_ms=10)
        assert [j.state for _, j in events][0] == QUEUED and events[-1][1].state == FAILED
        with pytest.raises(NotFound):
            await jobs.get("missing")
        await r.aclose()

    run(body())


def test_orphaned_queued_job_requeued_only_after_two_scans(redis_url):
    async def body():
        r = await _fresh(redis_url)
        jobs = JobStore(r)
        j = await jobs.create(JobRequest("/x", "m", "fp32"))
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
