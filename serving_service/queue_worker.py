"""Takes generation requests from the pool's Redis stream when a slot is free and writes each
request's chunks to its response stream.

A request stays pending in the consumer group until its stream has ended, so a replica that dies
leaves its requests in the pending list rather than losing them silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared import redis_keys as keys
from shared.errors import LlamashipError
from shared.generation import Chunk, GenRequest
from shared.telemetry import request_id_var
from serving_service import metrics
from serving_service.engine import Engine

log = logging.getLogger("llamaship.serving.queue")


async def ensure_group(r: aioredis.Redis, pool: str) -> None:
    try:
        await r.xgroup_create(keys.gen_queue(pool), keys.GEN_GROUP, id="0", mkstream=True)
    except ResponseError as exc:
        if "BUSYGROUP" not in str(exc):
            raise


class QueueWorker:
    def __init__(self, r: aioredis.Redis, engine: Engine, replica_id: str, stream_interval_s: float = 0.0):
        self.r = r
        self.engine = engine
        self.replica_id = replica_id
        self.stream_interval_s = stream_interval_s
        self.queue = keys.gen_queue(engine.pool)
        self.tasks: set[asyncio.Task] = set()
        self._wake = asyncio.Event()

    async def run(self) -> None:
        await ensure_group(self.r, self.engine.pool)
        while True:
            free = self.engine.slots - self.engine.active - len(self._starting())
            if free <= 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                continue
            resp = await self.r.xreadgroup(
                keys.GEN_GROUP, self.replica_id, {self.queue: ">"}, count=free, block=1000
            )
            for _stream, entries in resp or []:
                for entry_id, fields in entries:
                    task = asyncio.create_task(self._handle(entry_id, fields))
                    task.starting = True  # type: ignore[attr-defined]
                    self.tasks.add(task)
                    task.add_done_callback(self._done)

    def _starting(self) -> list[asyncio.Task]:
        return [t for t in self.tasks if getattr(t, "starting", False)]

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.discard(task)
        self._wake.set()

    async def drain(self, timeout_s: float) -> None:
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)

    async def _handle(self, entry_id: str, fields: dict[str, str]) -> None:
        task = asyncio.current_task()
        try:
            req = GenRequest.from_json(fields["req"])
        except (KeyError, ValueError, TypeError):
            log.error("dropping malformed queue entry %s", entry_id)
            await self._finish_entry(entry_id)
            return
        request_id_var.set(req.request_id)
        resp_key = keys.response_stream(req.request_id)
        cancel_key = keys.cancel_flag(req.request_id)
        try:
            if await self.r.exists(cancel_key):
                log.info("skipping request cancelled while queued")
                return
            if req.deadline is not None and time.time() > req.deadline:
                log.info("dropping request whose deadline passed while queued")
                await self._write(resp_key, Chunk("error", error_code="DEADLINE_EXCEEDED",
                                                  error_message="deadline passed while queued"))
                return
            pool = self.engine.pool
            metrics.QUEUE_WAIT.labels(pool).observe(max(0.0, time.time() - req.enqueued_at))
            started = time.perf_counter()
            outcome = "cancelled"
            stream = self.engine.stream(req)
            try:
                async for chunk in stream:
                    if task is not None and getattr(task, "starting", False):
                        task.starting = False  # type: ignore[attr-defined]
                        metrics.TTFT.labels(pool).observe(time.perf_counter() - started)
                    metrics.TOKENS.labels(pool).inc(len(chunk.token_ids))
                    chunk.replica_id = self.replica_id
                    cancelled = await self._write(resp_key, chunk, check_cancel=cancel_key)
                    if chunk.kind == "end":
                        outcome = chunk.finish_reason
                    if cancelled:
                        log.info("client cancelled; stopping generation")
                        break
                    if self.stream_interval_s:
                        # Tokens decoded meanwhile travel together in the next chunk: fewer
                        # messages per token for Redis, the gateway and the client.
                        await asyncio.sleep(self.stream_interval_s)
            finally:
                await stream.aclose()
                metrics.REQUESTS.labels(pool, outcome).inc()
        except LlamashipError as exc:
            metrics.REQUESTS.labels(self.engine.pool, exc.code.name.lower()).inc()
            await self._write(resp_key, Chunk("error", error_code=exc.code.name, error_message=exc.message,
                                              replica_id=self.replica_id))
        except Exception as exc:  # noqa: BLE001 - reported to the client as INTERNAL, logged here
            log.exception("generation failed")
            await self._write(resp_key, Chunk("error", error_code="INTERNAL",
                                              error_message=f"generation failed on replica {self.replica_id}: {type(exc).__name__}"))
        finally:
            await self._finish_entry(entry_id)

    async def _write(self, resp_key: str, chunk: Chunk, check_cancel: str | None = None) -> bool:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.xadd(resp_key, chunk.to_fields())
            pipe.expire(resp_key, keys.RESPONSE_TTL_S)
            if check_cancel:
                pipe.exists(check_cancel)
            results = await pipe.execute()
        return bool(check_cancel and results[-1])

    async def _finish_entry(self, entry_id: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(self.queue, keys.GEN_GROUP, entry_id)
            pipe.xdel(self.queue, entry_id)
            await pipe.execute()
