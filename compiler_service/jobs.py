"""Compile jobs in Redis: state, progress events, the work queue and worker leases.

A job record is a slim JSON snapshot (its request without the eval prompts, which live in a key
of their own and are read once by the worker); every change appends that snapshot to the job's
event stream (what WatchCompile relays). Every change is a compare-and-set (Lua) on the record:
a worker writes only while the record still says RUNNING by it on the same attempt, so a job
taken from it (re-queued, then started elsewhere) is never written back. A running job holds a
lease key with a Redis TTL, renewed only by its worker; a RUNNING job without a lease (its
compiler died) is re-queued, or failed once it has used its attempts. No host clock is compared.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
import uuid
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from shared import redis_keys as keys
from shared.errors import NotFound, shown
from shared.tenancy import Caller
from shared.wire import WireError, from_dict

log = logging.getLogger("llamaship.compiler.jobs")
QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELLED = "queued", "running", "succeeded", "failed", "cancelled"
TERMINAL = frozenset({SUCCEEDED, FAILED, CANCELLED})
EVENTS_MAXLEN = 500
JOB_TTL_S = 7 * 24 * 3600


def lease_key(job_id: str) -> str:
    return keys.job(job_id) + ":lease"


def request_key(job_id: str) -> str:
    return keys.job(job_id) + ":request"


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

    def slim(self) -> "JobRequest":
        """The request without its (possibly large) eval prompts, as job snapshots carry it."""
        return dataclasses.replace(self, quality={k: v for k, v in self.quality.items() if k != "eval_prompts"})


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
    worker: str = ""  # the compiler worker running it
    tenant: str = ""  # who submitted it: only this tenant (or an admin) sees it
    admin: bool = False  # the submitter's key was an admin's (its publish may take any name)

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    @property
    def caller(self) -> Caller:
        return Caller(self.tenant, self.admin)

    def to_json(self) -> str:
        data = asdict(self)
        data["request"] = asdict(self.request.slim())
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str) -> "Job":
        data = json.loads(text)
        if not isinstance(data, dict):
            raise WireError("Job: expected a JSON object")
        data["request"] = from_dict(JobRequest, data.get("request"))
        return from_dict(cls, data)


# KEYS: job, events, lease, queue. ARGV: 1 state, 2 worker, 3 attempts (what the record must still
# say), 4 new record, 5 ttl s, 6 events maxlen, 7 lease check ("" | "absent"), 8 lease owner,
# 9 lease ms, 10 lease action ("" | "set" | "drop"), 11 job id, 12 push ("" | "push" | "push-if-absent").
# Returns 1 if written, 0 if the record changed meanwhile (or the lease check failed).
_CAS = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local cur = cjson.decode(raw)
if cur['state'] ~= ARGV[1] or (cur['worker'] or '') ~= ARGV[2] or tostring(cur['attempts'] or 0) ~= ARGV[3] then
  return 0
end
if ARGV[7] == 'absent' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
if ARGV[10] == 'set' then
  redis.call('SET', KEYS[3], ARGV[8], 'PX', ARGV[9])
elseif ARGV[10] == 'drop' and redis.call('GET', KEYS[3]) == ARGV[8] then
  redis.call('DEL', KEYS[3])
end
if ARGV[12] == 'push' or (ARGV[12] == 'push-if-absent' and not redis.call('LPOS', KEYS[4], ARGV[11])) then
  redis.call('RPUSH', KEYS[4], ARGV[11])
end
redis.call('SET', KEYS[1], ARGV[4], 'EX', ARGV[5])
redis.call('XADD', KEYS[2], 'MAXLEN', '~', ARGV[6], '*', 'job', ARGV[4])
redis.call('EXPIRE', KEYS[2], ARGV[5])
return 1
"""

# KEYS: job, lease. ARGV: worker, attempts, lease ms. Renews the lease only while the record says
# the job is RUNNING by this worker on this attempt. Returns 1, or 0 when the job was taken from it.
_RENEW = """
local raw = redis.call('GET', KEYS[1])
if not raw then return 0 end
local cur = cjson.decode(raw)
if cur['state'] ~= 'running' or cur['worker'] ~= ARGV[1] or tostring(cur['attempts']) ~= ARGV[2] then return 0 end
local holder = redis.call('GET', KEYS[2])
if holder and holder ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[2], ARGV[1], 'PX', ARGV[3])
return 1
"""


class JobStore:
    def __init__(self, r: aioredis.Redis):
        self.r = r
        self._cas = r.register_script(_CAS)
        self._renew = r.register_script(_RENEW)
        self._orphan_suspects: dict[str, float] = {}

    async def create(self, request: JobRequest, caller: Caller) -> Job:
        now = time.time()
        job = Job(job_id=uuid.uuid4().hex[:16], state=QUEUED, request=request, created_at=now, updated_at=now,
                  stage="queued", message="waiting for a compiler worker", tenant=caller.tenant, admin=caller.admin)
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(request_key(job.job_id), json.dumps(asdict(request)), ex=JOB_TTL_S)
            pipe.set(keys.job(job.job_id), job.to_json(), ex=JOB_TTL_S)
            pipe.zadd(keys.JOBS_INDEX, {job.job_id: now})
            pipe.xadd(keys.job_events(job.job_id), {"job": job.to_json()}, maxlen=EVENTS_MAXLEN, approximate=True)
            pipe.expire(keys.job_events(job.job_id), JOB_TTL_S)
            pipe.rpush(keys.COMPILE_QUEUE, job.job_id)
            await pipe.execute()
        return job

    async def get(self, job_id: str, caller: Caller | None = None) -> Job:
        """The job's snapshot; NOT_FOUND also when `caller` may not see it (its existence stays hidden)."""
        raw = await self.r.get(keys.job(job_id)) if job_id and len(job_id) <= 64 else None
        job = Job.from_json(raw) if raw is not None else None
        if job is None or (caller is not None and not caller.owns(job.tenant)):
            raise NotFound(f"compile job {shown(job_id)} not found")
        return job

    async def full_request(self, job: Job) -> JobRequest:
        """The job's whole request, eval prompts included (the snapshot's, if that key is gone)."""
        raw = await self.r.get(request_key(job.job_id))
        return from_dict(JobRequest, json.loads(raw)) if raw else job.request

    async def _write(self, job: Job, expect: tuple[str, str, int], *, lease_check: str = "", lease_owner: str = "",
                     lease_ms: int = 0, lease_action: str = "", push: str = "") -> bool:
        job.updated_at = time.time()
        state, worker, attempts = expect
        ok = await self._cas(
            keys=[keys.job(job.job_id), keys.job_events(job.job_id), lease_key(job.job_id), keys.COMPILE_QUEUE],
            args=[state, worker, str(attempts), job.to_json(), JOB_TTL_S, EVENTS_MAXLEN, lease_check, lease_owner,
                  int(lease_ms), lease_action, job.job_id, push])
        if ok and job.terminal:
            await self.r.delete(request_key(job.job_id))  # the snapshot's slim request is what stays
        return bool(ok)

    async def next_job(self, timeout_s: float) -> str | None:
        item = await self.r.blpop([keys.COMPILE_QUEUE], timeout=timeout_s)
        return item[1] if item else None

    # -- a worker's side: start, report, renew, finish ---------------------------------------
    async def start(self, job_id: str, worker: str, lease_s: float) -> Job | None:
        """Take a job this worker popped off the queue: RUNNING by `worker` with a fresh lease.
        None when it is not (any longer) queued: a duplicate queue entry, ended, or cancelled."""
        try:
            job = await self.get(job_id)
        except (NotFound, WireError):
            return None
        if job.state != QUEUED:
            return None
        expect = (job.state, job.worker, job.attempts)
        if await self.cancel_requested(job_id):
            job.state, job.stage, job.message = CANCELLED, "cancelled", "cancelled before it started"
            await self._write(job, expect)
            return None
        job.state, job.worker, job.attempts = RUNNING, worker, job.attempts + 1
        job.stage, job.progress, job.message = "validate", 0.0, "started"
        if not await self._write(job, expect, lease_owner=worker, lease_ms=int(lease_s * 1000), lease_action="set"):
            return None
        return job

    async def report(self, job: Job) -> bool:
        """A running job's worker records progress (or its end); False when the job was taken from it."""
        expect = (RUNNING, job.worker, job.attempts)
        if job.state == RUNNING:
            return await self._write(job, expect)
        worker, job.worker = job.worker, ""
        return await self._write(job, expect, lease_owner=worker, lease_action="drop")

    async def renew(self, job: Job, lease_s: float) -> bool:
        return bool(await self._renew(keys=[keys.job(job.job_id), lease_key(job.job_id)],
                                      args=[job.worker, str(job.attempts), int(lease_s * 1000)]))

    async def hand_back(self, job: Job, message: str) -> bool:
        """A worker that stops (shutdown) queues its running job again at once."""
        worker, expect = job.worker, (RUNNING, job.worker, job.attempts)
        job.state, job.stage, job.progress, job.message, job.worker = QUEUED, "queued", 0.0, message, ""
        return await self._write(job, expect, lease_owner=worker, lease_action="drop", push="push")

    # -- clients -----------------------------------------------------------------------------
    async def cancel(self, job_id: str, caller: Caller | None = None) -> Job:
        """Idempotent. A queued job ends at once; a running one is stopped by its worker."""
        job = await self.get(job_id, caller)
        if job.terminal:
            return job
        await self.r.set(keys.job_cancel(job_id), "1", ex=JOB_TTL_S)
        if job.state == QUEUED:
            expect = (job.state, job.worker, job.attempts)
            job.state, job.stage, job.message = CANCELLED, "cancelled", "cancelled before it started"
            if await self._write(job, expect):
                await self.r.lrem(keys.COMPILE_QUEUE, 0, job_id)
                return job
            return await self.get(job_id)
        return job  # running: its worker sees the flag and stops

    async def cancel_requested(self, job_id: str) -> bool:
        return bool(await self.r.exists(keys.job_cancel(job_id)))

    async def events(self, job_id: str, last_id: str, block_ms: int) -> list[tuple[str, Job]]:
        resp = await self.r.xread({keys.job_events(job_id): last_id}, block=block_ms, count=100)
        out = []
        for _stream, entries in resp or []:
            for entry_id, fields in entries:
                out.append((entry_id, Job.from_json(fields["job"])))
        return out

    # -- recovery ----------------------------------------------------------------------------
    async def recover(self, max_attempts: int) -> list[str]:
        """Re-queue (or fail) jobs whose worker is gone; returns the ids touched. Safe to run on
        every compiler at once: each change is a compare-and-set on the record."""
        touched = []
        suspects: dict[str, float] = {}
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
            expect = (job.state, job.worker, job.attempts)
            if job.state == RUNNING and not await self.r.exists(lease_key(job_id)):
                push = ""
                job.worker = ""
                if await self.cancel_requested(job_id):
                    job.state, job.stage, job.message = CANCELLED, "cancelled", "cancelled (its compiler stopped)"
                elif job.attempts >= max_attempts:
                    job.state, job.stage = FAILED, "failed"
                    job.message = f"compiler stopped while running this job {job.attempts} times; giving up"
                else:
                    job.state, job.stage, job.progress = QUEUED, "queued", 0.0
                    job.message, push = "re-queued: the compiler running it stopped", "push"
                if await self._write(job, expect, lease_check="absent", push=push):
                    touched.append(job_id)
            elif job.state == QUEUED and job_id not in queued_ids:
                # Taken off the queue but never started: either a worker is about to, or it died
                # in between. Only a job seen so, unchanged, on two scans in a row is re-queued.
                if self._orphan_suspects.get(job_id) == job.updated_at:
                    job.message = "re-queued: it was taken by a compiler that stopped"
                    if await self._write(job, expect, push="push-if-absent"):
                        touched.append(job_id)
                else:
                    suspects[job_id] = job.updated_at
        self._orphan_suspects = suspects
        return touched
