"""Takes generation requests from the pool's queue when a slot is free and writes each request's
chunks to its response stream (the protocol itself: shared.request_protocol).

A request stays pending in the consumer group until its stream has ended, so a replica that dies
leaves its requests in the pending list rather than losing them silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections import Counter

import redis.asyncio as aioredis
from redis.exceptions import ClusterDownError, TryAgainError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared import catalog
from shared.errors import LlamashipError
from shared.generation import Chunk, GenRequest
from shared.request_protocol import Held, Picked, PoolQueue, Requests
from shared.telemetry import request_id_var
from serving_service import metrics
from serving_service.engine import Engine

log = logging.getLogger("llamaship.serving.queue")

# What redis-py raises while a primary is unreachable or a Cluster fails over (about 2 s).
_REDIS_LOST = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError)


class _RedisGone(Exception):
    """Redis did not answer within redis_lost_wait_s: the request's entry is left pending."""


@dataclasses.dataclass(frozen=True)
class _Holding:
    kv_bytes: int
    tenant: str  # key part


class QueueWorker:
    def __init__(self, r: aioredis.Redis, engine: Engine, replica_id: str, stream_interval_s: float = 0.0,
                 fair_slots: bool = True, headroom_s: float = 0.0, prefix_grace_s: float = 0.0,
                 redis_lost_wait_s: float = 30.0):
        self.r = r
        self.redis_lost_wait_s = redis_lost_wait_s
        self.prefix_grace_s = prefix_grace_s
        self._room: int | None = None  # free slots as this replica last reported them (prefix routing)
        self._background: set[asyncio.Task] = set()
        self.engine = engine
        self.replica_id = replica_id
        self.stream_interval_s = stream_interval_s
        self.fair_slots = fair_slots
        self.headroom_s = headroom_s
        self.queue = PoolQueue(r, engine.pool)
        self.requests = Requests(r)
        self.tasks: dict[asyncio.Task, _Holding] = {}  # running request -> what it holds
        self._wake = asyncio.Event()

    async def run(self) -> None:
        bell = await self.queue.latest_bell()
        await self._resume_own()
        while True:
            outcome = await self._take_what_fits()
            if isinstance(outcome, Held):  # look again once the request is free for every replica
                bell = await self.queue.wait_bell(bell, min(1000, outcome.wait_ms + 1))
                continue
            if outcome == "full":
                # every slot or the KV budget is taken: wait for a request to end
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                continue
            bell = await self.queue.wait_bell(bell, 1000)

    async def _take_what_fits(self) -> str | Held:
        """Take requests while a slot and the KV budget allow: "empty" when nothing waits,
        "full" when the next request must wait for capacity, Held while a request waits for the
        replica its prefix prefers."""
        while True:
            if self._free_slots() <= 0:
                if self._room != 0:  # requests preferred for this replica go elsewhere at once
                    await self._report_room(0)
                return "full"
            picked = await self.queue.pick(self.replica_id, self._free_kv_bytes(), self.engine.kv_budget_bytes,
                                           self.engine.kv_bytes_per_token(), self.running_by_tenant(),
                                           self.fair_slots, self.engine.slots, self.headroom_s, self.prefix_grace_s)
            self._room = self._free_slots() - isinstance(picked, Picked)  # as the pick reported it
            if picked is None or isinstance(picked, Held):
                return picked or "empty"
            if picked == "WAIT":
                metrics.ADMISSION_WAITS.labels(self.engine.pool).inc()
                return "full"
            routed = "none" if not picked.preferred else "here" if picked.preferred == self.replica_id else "other"
            metrics.PREFIX_ROUTED.labels(self.engine.pool, routed).inc()
            self._spawn(picked, resume=False)

    def _free_slots(self) -> int:
        """Every request task holds one slot from the moment it is taken until it ends."""
        return self.engine.slots - len(self.tasks)

    def _free_kv_bytes(self) -> int:
        return self.engine.free_kv_bytes([h.kv_bytes for h in self.tasks.values()])

    def kv_reserved_bytes(self) -> int:
        return sum(h.kv_bytes for h in self.tasks.values())

    def running_by_tenant(self) -> dict[str, int]:
        return dict(Counter(h.tenant for h in self.tasks.values()))

    def _spawn(self, picked: Picked, resume: bool) -> None:
        try:  # decoded once: a request carries its whole prompt
            req: GenRequest | str = GenRequest.from_json(picked.request_json)
        except ValueError as exc:
            req = str(exc)
        need = self.engine.kv_reservation(req) if isinstance(req, GenRequest) else 0
        task = asyncio.create_task(self._handle(picked, req, need, resume=resume))
        # a request over the whole budget is refused in _handle and holds nothing
        self.tasks[task] = _Holding(need if need <= self.engine.kv_budget_bytes else 0, picked.tenant)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.pop(task, None)
        self._wake.set()
        if self._room == 0 and self._free_slots() > 0:
            report = asyncio.get_running_loop().create_task(self._report_room(self._free_slots()))
            self._background.add(report)
            report.add_done_callback(self._background.discard)

    async def _report_room(self, free: int) -> None:
        """Tell the pool this replica's free slots (prefix routing); best effort."""
        self._room = free
        try:
            await self.queue.report_room(self.replica_id, free)
        except Exception as exc:  # noqa: BLE001 - the report expires by itself; the next pick renews it
            log.warning("reporting free slots failed: %s", type(exc).__name__)

    async def _resume_own(self) -> None:
        """Entries still pending under this replica's name were taken by an earlier process with
        the same id that stopped: continue them like any other stopped replica's."""
        for picked in await self.queue.pending_of(self.replica_id, self.engine.slots):
            if picked.request_json:
                self._spawn(picked, resume=True)
            else:
                await self.queue.finish(picked.entry, self.replica_id)

    async def drain(self, timeout_s: float) -> None:
        """Let running requests finish; those still running after `timeout_s` are interrupted and
        stay pending in the queue, for another replica to continue."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)

    async def _handle(self, picked: Picked, req: GenRequest | str, need: int, resume: bool = False) -> None:
        """`req` is the decoded request, or why it could not be decoded."""
        entry = picked.entry
        if isinstance(req, str):
            log.error("dropping unreadable queue entry %s: %s", entry, req)
            if picked.sid:  # tell the client why, instead of leaving it to find the entry gone
                await self.requests.take_ownership(picked.sid, self.replica_id)
                await self._write(picked.sid, Chunk(
                    "error", error_code="UNAVAILABLE", replica_id=self.replica_id,
                    error_message="this replica cannot read the request (written by another Llamaship version?); "
                                  "it may be retried"))
            await self.queue.finish(entry, self.replica_id)
            return
        sid = picked.scoped_id(req)
        request_id_var.set(sid)
        interrupted = False
        try:
            cancelled, now_ms = await self.requests.take_ownership_at(sid, self.replica_id, entry)
            if cancelled:
                log.info("skipping request cancelled while queued")
                await self._write(sid, Chunk("error", error_code="CANCELLED", error_message="cancelled before it started"))
                return
            waited_ms = now_ms - entry.enqueued_ms
            if not resume and req.deadline_s is not None and waited_ms > req.deadline_s * 1000:
                log.info("dropping request whose deadline passed while queued")
                await self._write(sid, Chunk("error", error_code="DEADLINE_EXCEEDED",
                                             error_message="deadline passed while queued"))
                return
            if need > self.engine.kv_budget_bytes:
                await self._write(sid, Chunk(
                    "error", error_code="INVALID_ARGUMENT",
                    error_message=f"the request may need {need >> 20} MiB of KV cache, more than a {self.engine.pool} "
                                  f"replica's budget ({self.engine.kv_budget_bytes >> 20} MiB); lower max_tokens or "
                                  "shorten the prompt"))
                return
            await self._generate_through_failover(dataclasses.replace(req, request_id=sid), resume, waited_ms)
        except _RedisGone:
            log.error("Redis did not answer for %.0f s: the request is left pending", self.redis_lost_wait_s)
            interrupted = True
        except LlamashipError as exc:
            metrics.REQUESTS.labels(self.engine.pool, exc.code.name.lower()).inc()
            await self._write(sid, Chunk("error", error_code=exc.code.name, error_message=exc.message,
                                         replica_id=self.replica_id))
        except Exception as exc:  # noqa: BLE001 - reported to the client as INTERNAL, logged here
            log.exception("generation failed")
            await self._write(sid, Chunk("error", error_code="INTERNAL",
                                         error_message=f"generation failed on replica {self.replica_id}: {type(exc).__name__}"))
        except asyncio.CancelledError:
            # This replica is stopping with the request unfinished: leave the entry pending so
            # that another replica continues it.
            interrupted = True
            raise
        finally:
            if not interrupted:
                await self.queue.finish(entry, self.replica_id)

    async def _generate_through_failover(self, req: GenRequest, resume: bool, waited_ms: int) -> None:
        """Redis lost mid-request (a primary died): wait for it with backoff, then continue the
        request from what its stream holds (token-exact replay), never ending it with an error."""
        loop = asyncio.get_running_loop()
        deadline, delay = loop.time() + self.redis_lost_wait_s, 0.05
        while True:
            try:
                return await self._generate(req, resume, waited_ms)
            except _REDIS_LOST as exc:
                if loop.time() >= deadline:
                    raise _RedisGone() from exc
                log.warning("Redis lost while generating (%s): continuing from the stream once it answers",
                            type(exc).__name__)
                await asyncio.sleep(delay)
                delay, resume = min(delay * 2, 1.0), True

    async def _generate(self, req: GenRequest, resume: bool, waited_ms: int) -> None:
        """Stream `req` (its request_id is the scoped id) to its response stream."""
        pool = self.engine.pool
        delivered: list[int] = []
        if resume:
            delivered, build_id, ended = await self.requests.written(req.request_id)
            if ended:
                return
            log.warning("continuing a request whose replica stopped, after %d tokens", len(delivered))
            metrics.FAILOVERS.labels(pool).inc()
        else:
            build_id = ""
            metrics.QUEUE_WAIT.labels(pool).observe(max(0.0, waited_ms / 1000))
        loop = asyncio.get_running_loop()
        started = loop.time()
        first = True
        outcome = "cancelled"
        stream = self.engine.stream(req, replay=delivered, build_id=build_id)
        try:
            async for chunk in stream:
                if first:
                    first = False
                    first_at = loop.time()
                    metrics.TTFT.labels(pool).observe(first_at - started)
                metrics.TOKENS.labels(pool).inc(len(chunk.token_ids))
                chunk.replica_id = self.replica_id
                if chunk.kind == "end":  # prefill: until the first chunk; decode: from it to the end
                    chunk.queue_ms, chunk.prefill_ms = float(max(0, waited_ms)), (first_at - started) * 1000
                    chunk.decode_ms = (loop.time() - first_at) * 1000
                    if self._room == 0:  # this slot is free once the end is written: keep its prefixes here
                        await self._report_room(1)
                stop = await self._write(req.request_id, chunk)
                if chunk.kind == "end":
                    outcome = chunk.finish_reason
                if stop:
                    log.info("stopping generation: %s", stop)
                    if stop == "client cancelled":
                        await self._write(req.request_id, Chunk("error", error_code="CANCELLED",
                                                                error_message="cancelled by the client"))
                    break
                if self.stream_interval_s and chunk.kind != "end":
                    # Tokens decoded meanwhile travel together in the next chunk: fewer
                    # messages per token for Redis, the gateway and the client.
                    await asyncio.sleep(self.stream_interval_s)
        finally:
            await stream.aclose()
            metrics.REQUESTS.labels(pool, outcome).inc()

    async def reclaim_loop(self, interval_s: float = 1.0) -> None:
        """Take over the requests of replicas of this pool that stopped (their liveness key
        expired): each is continued from the tokens its stream already carries."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reclaim()
            except Exception:  # noqa: BLE001 - retried next round
                log.exception("reclaiming requests of stopped replicas failed")

    async def reclaim(self) -> int:
        """Claim what stopped replicas hold, as far as this replica's free slots, KV budget and
        loaded models admit (the same accounting as a pick)."""
        taken = 0
        for stream in await self.queue.streams():
            for name, pending in (await self.queue.consumers(stream)).items():
                if name == self.replica_id or await catalog.replica_alive(self.r, name):
                    continue
                if not pending:  # a stopped replica with nothing left here: forget it
                    await self.queue.forget_consumer(stream, name)
                    continue
                for picked in await self.queue.reclaim(stream, self.replica_id, name, self._free_slots(),
                                                       self._free_kv_bytes(), self.engine.kv_budget_bytes,
                                                       self.engine.kv_bytes_per_token()):
                    self._spawn(picked, resume=True)
                    taken += 1
        await catalog.forget_gone_replicas(self.r)
        return taken

    async def _write(self, sid: str, chunk: Chunk) -> str:
        return await self.requests.write(sid, self.replica_id, chunk)
