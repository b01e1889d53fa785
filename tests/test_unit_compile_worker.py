"""The compile worker with a real job store (Redis) and a real pipeline: cancelling, or losing the
job to another compiler, stops a stage that would otherwise run for long (hashing a large
checkpoint), at once; the job's scratch directory goes with it."""

import asyncio
import shutil
import time

import pytest

from compiler_service.jobs import CANCELLED, QUEUED, RUNNING, JobRequest, JobStore
from compiler_service.pipeline import CompilePipeline
from compiler_service.worker import CompileWorker
from shared import redis_conn
from shared.store import BuildStore
from shared.tenancy import Caller

ALICE = Caller("alice", False)


@pytest.fixture()
def slow_checkpoint(tmp_path, demo_model):
    """The demo checkpoint plus a sparse 16 GiB file: hashing it takes far longer than the test."""
    dst = tmp_path / "ckpt"
    shutil.copytree(demo_model, dst)
    with open(dst / "extra.bin", "wb") as f:
        f.truncate(16 << 30)
    return dst


async def _until(predicate, timeout_s: float):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if value := await predicate():
            return value
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


def _setup(tmp_path, r):
    store = BuildStore(tmp_path / "store").ensure()
    jobs = JobStore(r)
    worker = CompileWorker(jobs, CompilePipeline(store, r, tmp_path / "work"), "w1", lease_s=30, max_attempts=2,
                           poll_s=0.1)
    return jobs, worker


def test_cancel_stops_the_hash_stage_at_once(redis_url, tmp_path, slow_checkpoint):
    async def body():
        r = redis_conn.client(redis_url)
        await r.flushdb()
        jobs, worker = _setup(tmp_path, r)
        job = await jobs.create(JobRequest(str(slow_checkpoint), "slow", "fp32"), ALICE)
        run = asyncio.create_task(worker.run_job(await jobs.next_job(1)))
        await _until(lambda: _stage_is(jobs, job.job_id, "hash"), 60)
        t0 = time.monotonic()
        await jobs.cancel(job.job_id, ALICE)
        await asyncio.wait_for(run, 5)
        assert time.monotonic() - t0 < 3
        final = await jobs.get(job.job_id)
        assert final.state == CANCELLED and "nothing published" in final.message
        assert not (tmp_path / "work" / job.job_id).exists()
        await r.aclose()

    asyncio.run(body())


def test_a_worker_whose_job_was_taken_stops_and_writes_nothing(redis_url, tmp_path, slow_checkpoint):
    async def body():
        r = redis_conn.client(redis_url)
        await r.flushdb()
        jobs, worker = _setup(tmp_path, r)
        job = await jobs.create(JobRequest(str(slow_checkpoint), "slow", "fp32"), ALICE)
        run = asyncio.create_task(worker.run_job(await jobs.next_job(1)))
        await _until(lambda: _stage_is(jobs, job.job_id, "hash"), 60)
        # another compiler saw no lease (as after a long stall) and re-queued the job
        from compiler_service.jobs import lease_key

        other = JobStore(r)

        async def taken():  # the worker may renew between the two steps: try again
            await r.delete(lease_key(job.job_id))
            return await other.recover(3) == [job.job_id]

        await _until(taken, 10)
        await asyncio.wait_for(run, 5)
        assert (await jobs.get(job.job_id)).state == QUEUED  # not written back to RUNNING or CANCELLED
        await r.aclose()

    asyncio.run(body())


async def _stage_is(jobs, job_id, stage):
    job = await jobs.get(job_id)
    return job.state == RUNNING and job.stage == stage
