"""Takes compile jobs from the Redis queue one at a time, runs the pipeline, records the outcome,
renews its lease while it works, and recovers jobs whose compiler died."""

from __future__ import annotations

import asyncio
import logging
import time

from compiler_service.builder_runner import BuildCancelled, BuildFailed
from compiler_service.jobs import CANCELLED, FAILED, RUNNING, SUCCEEDED, JobStore
from compiler_service.pipeline import CompileError, CompilePipeline, QualityGateFailed
from shared.telemetry import request_id_var

log = logging.getLogger("llamaship.compiler.worker")


class CompileWorker:
    def __init__(self, jobs: JobStore, pipeline: CompilePipeline, worker_id: str, lease_s: float, max_attempts: int):
        self.jobs = jobs
        self.pipeline = pipeline
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    async def run(self) -> None:
        while True:
            job_id = await self.jobs.next_job(timeout_s=1.0)
            if job_id:
                await self.run_job(job_id)

    async def recover_loop(self) -> None:
        while True:
            try:
                touched = await self.jobs.recover(self.max_attempts)
                if touched:
                    log.warning("recovered jobs whose compiler stopped: %s", ", ".join(touched))
            except Exception:  # noqa: BLE001 - retried next round
                log.exception("recovering compile jobs failed")
            await asyncio.sleep(max(1.0, self.lease_s / 3))

    async def run_job(self, job_id: str) -> None:
        request_id_var.set(job_id)
        try:
            job = await self.jobs.get(job_id)
        except Exception:  # noqa: BLE001 - expired or deleted meanwhile
            return
        if job.terminal:
            return
        if await self.jobs.cancel_requested(job_id):
            job.state, job.stage, job.message = CANCELLED, "cancelled", "cancelled before it started"
            await self.jobs.save(job)
            return
        job.state, job.owner, job.attempts = RUNNING, self.worker_id, job.attempts + 1
        job.lease_until = time.time() + self.lease_s
        job.stage, job.progress, job.message = "validate", 0.0, "started"
        await self.jobs.save(job)
        log.info("compile job started: %s as %s (%s, attempt %d)", job.request.checkpoint_path,
                 job.request.model_name, job.request.recipe, job.attempts)
        renew = asyncio.create_task(self._renew(job))
        last_write = 0.0

        async def progress(stage: str, fraction: float, message: str) -> None:
            nonlocal last_write
            now = time.monotonic()
            if stage == job.stage and now - last_write < 0.2 and fraction < 1.0:
                return
            last_write = now
            job.stage, job.progress, job.message = stage, float(fraction), message
            job.lease_until = time.time() + self.lease_s
            await self.jobs.save(job)

        async def should_cancel() -> bool:
            return await self.jobs.cancel_requested(job_id)

        try:
            outcome = await self.pipeline.run(job_id, job.request, progress, should_cancel)
        except asyncio.CancelledError:
            # This compiler is shutting down: hand the job to the next one instead of waiting for the lease.
            renew.cancel()
            await asyncio.shield(self.jobs.requeue(job, "re-queued: the compiler running it shut down"))
            raise
        except BuildCancelled:
            job.state, job.stage, job.message = CANCELLED, "cancelled", "cancelled while building; nothing published"
        except QualityGateFailed as exc:
            job.state, job.stage, job.message, job.build_id = FAILED, "failed", str(exc), exc.build_id
        except (CompileError, BuildFailed) as exc:
            job.state, job.stage, job.message = FAILED, "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - a job failure must not stop the worker
            log.exception("compile job crashed")
            job.state, job.stage, job.message = FAILED, "failed", f"internal compiler error: {type(exc).__name__}: {exc}"
        else:
            job.state, job.stage, job.progress = SUCCEEDED, "done", 1.0
            job.build_id, job.reused = outcome.build_id, outcome.reused
            job.message = (f"{'reused' if outcome.reused else 'built'} {outcome.build_id} "
                           f"({outcome.manifest.total_bytes / 1e6:.1f} MB) and published as {job.request.model_name}")
        finally:
            renew.cancel()
        job.owner, job.lease_until = "", 0.0
        await self.jobs.save(job)
        log.info("compile job %s: %s", job.state, job.message)

    async def _renew(self, job) -> None:
        """Keep the lease of the job this worker runs (its in-memory record is authoritative)."""
        while True:
            await asyncio.sleep(self.lease_s / 3)
            try:
                job.lease_until = time.time() + self.lease_s
                await self.jobs.save(job)
            except Exception:  # noqa: BLE001 - retried next round
                log.exception("renewing the lease of job %s failed", job.job_id)
