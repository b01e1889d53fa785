"""Takes compile jobs from the Redis queue one at a time, runs the pipeline, records the outcome,
renews its lease while it works, and recovers jobs whose compiler died.

While a job runs, a watcher checks every `poll_s` whether it was cancelled or taken from this
worker (its lease lapsed and another compiler re-queued it); either stops the pipeline at once,
whatever stage it is in (the builder child is killed, thread stages are abandoned and told to stop).
"""

from __future__ import annotations

import asyncio
import logging
import time

from compiler_service.builder_runner import BuildCancelled, BuildFailed
from compiler_service.failures import CompileError, JobStopped, QualityGateFailed
from compiler_service.jobs import CANCELLED, FAILED, SUCCEEDED, JobStore
from compiler_service.pipeline import CompilePipeline
from shared.telemetry import request_id_var

log = logging.getLogger("llamaship.compiler.worker")
PROGRESS_MIN_INTERVAL_S = 0.2  # progress within one stage is written at most this often


class CompileWorker:
    def __init__(self, jobs: JobStore, pipeline: CompilePipeline, worker_id: str, lease_s: float, max_attempts: int,
                 poll_s: float = 0.5):
        self.jobs = jobs
        self.pipeline = pipeline
        self.worker_id = worker_id
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.poll_s = poll_s

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
        job = await self.jobs.start(job_id, self.worker_id, self.lease_s)
        if job is None:
            return
        request = await self.jobs.full_request(job)
        log.info("compile job started: %s as %s (%s, attempt %d)", job.request.checkpoint_path or
                 job.request.hub_id or job.request.upload_id, job.request.model_name, job.request.recipe, job.attempts)
        stop_reason: list[str] = []  # "cancelled" or "lost", set by the watcher before it stops the pipeline
        last_write = 0.0

        async def progress(stage: str, fraction: float, message: str) -> None:
            nonlocal last_write
            if stop_reason:
                raise JobStopped(stop_reason[0])
            now = time.monotonic()
            if stage == job.stage and now - last_write < PROGRESS_MIN_INTERVAL_S and fraction < 1.0:
                return
            last_write = now
            job.stage, job.progress, job.message = stage, float(fraction), message
            if not await self.jobs.report(job):
                stop_reason.append("lost")
                raise JobStopped("lost")

        async def should_cancel() -> bool:
            return bool(stop_reason)

        pipeline = asyncio.create_task(self.pipeline.run(job_id, request, job.caller, progress, should_cancel))
        watcher = asyncio.create_task(self._watch(job, pipeline, stop_reason))
        try:
            outcome = await pipeline
        except asyncio.CancelledError:
            if not stop_reason or asyncio.current_task().cancelling():
                # This compiler is shutting down: hand the job to the next one instead of waiting for the lease.
                watcher.cancel()
                await asyncio.shield(self.jobs.hand_back(job, "re-queued: the compiler running it shut down"))
                raise
            self._stopped(job, stop_reason[0])
        except (BuildCancelled, JobStopped):
            self._stopped(job, stop_reason[0] if stop_reason else "cancelled")
        except QualityGateFailed as exc:
            job.state, job.stage, job.message, job.build_id = FAILED, "failed", str(exc), exc.build_id
        except (CompileError, BuildFailed) as exc:
            job.state, job.stage, job.message = FAILED, "failed", str(exc)
        except Exception as exc:  # noqa: BLE001 - a job failure must not stop the worker
            log.exception("compile job crashed")
            job.state, job.stage, job.message = FAILED, "failed", f"internal compiler error ({type(exc).__name__}); see the compiler log"
        else:
            job.state, job.stage, job.progress = SUCCEEDED, "done", 1.0
            job.build_id, job.reused = outcome.build_id, outcome.reused
            job.message = (f"{'reused' if outcome.reused else 'built'} {outcome.build_id} "
                           f"({outcome.manifest.total_bytes / 1e6:.1f} MB) and published as {job.request.model_name}")
        finally:
            watcher.cancel()
        if stop_reason and stop_reason[0] == "lost":
            log.warning("compile job %s was taken over by another compiler; this one stopped it", job_id)
            return
        if not await self.jobs.report(job):
            log.warning("compile job %s changed meanwhile; its outcome here (%s) is not recorded", job_id, job.state)
            return
        log.info("compile job %s: %s", job.state, job.message)

    @staticmethod
    def _stopped(job, reason: str) -> None:
        if reason == "cancelled":
            job.state, job.stage, job.message = CANCELLED, "cancelled", "cancelled; nothing published"

    async def _watch(self, job, pipeline: asyncio.Task, stop_reason: list[str]) -> None:
        """Renew the lease, and stop the pipeline when the job is cancelled or taken from this worker."""
        while not pipeline.done():
            await asyncio.sleep(self.poll_s)
            try:
                if await self.jobs.cancel_requested(job.job_id):
                    stop_reason.append("cancelled")
                elif not await self.jobs.renew(job, self.lease_s):
                    stop_reason.append("lost")
            except Exception:  # noqa: BLE001 - Redis hiccup: retried next round
                log.exception("checking job %s failed", job.job_id)
                continue
            if stop_reason:
                pipeline.cancel()
                return
