"""Compile jobs in Redis: state, progress events, the work queue and worker leases.

A job is a JSON string; every change appends its full snapshot to the job's event stream (what
WatchCompile relays). A running job carries a lease its worker renews; a job whose lease ran out
(its compiler died) is re-queued, or failed once it has used its attempts. No job stays
"running" without a live worker.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from shared import redis_keys as keys
from shared.errors import NotFound

log = logging.getLogger("llamaship.compiler.jobs")
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
EVENTS_MAXLEN = 500
JOB_TTL_S = 7 * 24 * 3600


@dataclass
class JobRequest:
    checkpoint_path: str
    model_name: str
    recipe: str
    target_pool: str = "cpu"
    max_sequence_length: int = 4096
    max_batch: int = 32
    # the quality gate: threshold overrides, force_publish, eval_prompts (see compiler_service.quality)
    quality: dict = field(default_factory=dict)
    hub_id: str = ""
    upload_id: str = ""
    allow_pickle: bool = False


@dataclass
class Job:
    job_id: str
    state: str
    request: JobRequest
    build_id: str = ""
    stage: str = ""
    progress: float = 0.0
    message: str = ""
    reused: bool = False
    created_at: float = 0.0
    updated_at: float = 0.0
    attempts: int = 0
    owner: str = ""
    lease_until: float = 0.0

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        data["request"] = JobRequest(**data["request"])
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


class JobStore:
    def __init__(self, r: aioredis.Redis):
        self.r = r
        self._orphan_suspects: set[str] = set()

    async def create(self, request: JobRequest) -> Job:
        now = time.time()
        job = Job(job_id=uuid.uuid4().hex[:16], state=QUEUED, request=request, created_at=now, updated_at=now,
                  stage="queued", message="waiting for a compiler worker")
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(keys.job(job.job_id), job.to_json(), ex=JOB_TTL_S)
            pipe.zadd(keys.JOBS_INDEX, {job.job_id: now})
            pipe.xadd(keys.job_events(job.job_id), {"job": job.to_json()}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(keys.job_events(job.job_id), JOB_TTL_S)
            pipe.rpush(keys.COMPILE_QUEUE, job.job_id)
            await pipe.execute()
        return job

    async def get(self, job_id: str) -> Job:
        raw = await self.r.get(keys.job(job_id)) if job_id else None
        if raw is None:
            raise NotFound(f"compile job {job_id!r} not found")
        return Job.from_json(raw)

    async def save(self, job: Job) -> Job:
        job.updated_at = time.time()
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(keys.job(job.job_id), job.to_json(), ex=JOB_TTL_S)
            pipe.xadd(keys.job_events(job.job_id), {"job": job.to_json()}, maxlen=EVENTS_MAXLEN, approximate=True)
            await pipe.execute()
        return job

    async def update(self, job_id: str, **changes) -> Job:
        job = await self.get(job_id)
        for k, v in changes.items():
            setattr(job, k, v)
        return await self.save(job)

    async def next_job(self, timeout_s: float) -> str | None:
        item = await self.r.blpop([keys.COMPILE_QUEUE], timeout=timeout_s)
        return item[1] if item else None

    async def requeue(self, job: Job, message: str) -> None:
        job.state, job.stage, job.progress, job.message, job.owner, job.lease_until = QUEUED, "queued", 0.0, message, "", 0.0
        await self.save(job)
        await self.r.rpush(keys.COMPILE_QUEUE, job.job_id)

    async def cancel(self, job_id: str) -> Job:
        """Idempotent. A queued job ends at once; a running one is stopped by its worker."""
        job = await self.get(job_id)
        if job.terminal:
            return job
        if job.state == QUEUED and await self.r.lrem(keys.COMPILE_QUEUE, 0, job_id):
            job.state, job.stage, job.message = CANCELLED, "cancelled", "cancelled before it started"
            return await self.save(job)
        # running, or just taken off the queue by a worker: the worker sees the flag and stops
        await self.r.set(keys.job_cancel(job_id), "1", ex=JOB_TTL_S)
        return job

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.r.exists(keys.job_cancel(job_id)))

    async def events(self, job_id: str, last_id: str, block_ms: int) -> list[tuple[str, Job]]:
        resp = await self.r.xread({keys.job_events(job_id): last_id}, block=block_ms, count=100)
        out = []
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                out.append((entry_id, Job.from_json(fields["job"])))
        return out

    async def recover(self, max_attempts: int) -> list[str]:
        """Re-queue (or fail) jobs whose worker is gone; returns the ids touched."""
        now = time.time()
        touched = []
        suspects: set[str] = set()
        queued_ids = set(await self.r.lrange(keys.COMPILE_QUEUE, 0, -1))
        for job_id in await self.r.zrange(keys.JOBS_INDEX, 0, -1):
            raw = await self.r.get(keys.job(job_id))
            if raw is None:
                await self.r.zrem(keys.JOBS_INDEX, job_id)
                continue
            try:
                job = Job.from_json(raw)
            except (ValueError, TypeError, KeyError):
                log.error("skipping unreadable compile job record %s", job_id)
                continue
            if job.state == RUNNING and job.lease_until < now:
                if await self.cancel_requested(job_id):
                    job.state, job.stage, job.message = CANCELLED, "cancelled", "cancelled (its compiler stopped)"
                    await self.save(job)
                elif job.attempts >= max_attempts:
                    job.state, job.stage = FAILED, "failed"
                    job.message = f"compiler stopped while running this job {job.attempts} times; giving up"
                    await self.save(job)
                else:
                    await self.requeue(job, "re-queued: the compiler running it stopped")
                touched.append(job_id)
            elif job.state == QUEUED and job_id not in queued_ids:
                # Taken off the queue but never marked running: either a worker is about to, or
                # it died in between. Only a job seen so on two scans in a row is re-queued.
                if job_id in self._orphan_suspects:
                    await self.requeue(job, "re-queued: it was taken by a compiler that stopped")
                    touched.append(job_id)
                else:
                    suspects.add(job_id)
        self._orphan_suspects = suspects
        return touched
