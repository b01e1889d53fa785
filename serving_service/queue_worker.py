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

from shared import catalog
from shared import redis_keys as keys
from shared.errors import LlamashipError
from shared.fair_queue import Entry, FairQueue
from shared.generation import Chunk, GenRequest
from shared.telemetry import request_id_var
from serving_service import metrics
from serving_service.engine import Engine

log = logging.getLogger("llamaship.serving.queue")


# Append only while this replica owns the stream and a gateway relays it (else close the stream
# with ARGV[4]); report a cancel flag in the same round trip.
_GUARDED_XADD = """
if redis.call('GET', KEYS[2]) ~= ARGV[1] then return 2 end
if redis.call('EXISTS', KEYS[4]) == 0 then
  redis.call('XADD', KEYS[1], '*', 'c', ARGV[4])
  redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
  return 3
end
redis.call('XADD', KEYS[1], '*', 'c', ARGV[2])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
redis.call('EXPIRE', KEYS[2], tonumber(ARGV[3]))
if redis.call('EXISTS', KEYS[3]) == 1 then return 1 end
return 0
"""
_ABANDONED = Chunk("error", error_code="UNAVAILABLE",
                   error_message="the stream was stopped: no gateway relayed it (its gateway went away and no "
                                 "client resumed it in time); it may be retried").to_fields()["c"]


class QueueWorker:
    def __init__(self, r: aioredis.Redis, engine: Engine, replica_id: str, stream_interval_s: float = 0.0):
        self.r = r
        self.engine = engine
        self.replica_id = replica_id
        self.stream_interval_s = stream_interval_s
        self._guarded_xadd = r.register_script(_GUARDED_XADD)
        self.queue = FairQueue(r, engine.pool)
        self.tasks: dict[asyncio.Task, int] = {}  # running request -> KV bytes it holds
        self._wake = asyncio.Event()

    async def run(self) -> None:
        bell = await self.queue.latest_bell()
        await self._resume_own()
        while True:
            outcome = await self._take_what_fits()
            if outcome == "full":
                # every slot or the KV budget is taken: wait for a request to end
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), 0.5)
                continue
            bell = await self.queue.wait_bell(bell, 1000)

    async def _take_what_fits(self) -> str:
        """Take requests while a slot and the KV budget allow: "empty" when nothing waits,
        "full" when the next request must wait for capacity."""
        while True:
            if self._free_slots() <= 0:
                return "full"
            picked = await self.queue.pick(self.replica_id, self._free_kv_bytes(), self.engine.kv_budget_bytes,
                                           self.engine.kv_bytes_per_token())
            if picked is None:
                return "empty"
            if picked == "WAIT":
                metrics.ADMISSION_WAITS.labels(self.engine.pool).inc()
                return "full"
            self._spawn(picked.entry, {"req": picked.request_json}, resume=False)

    def _free_slots(self) -> int:
        """Every request task holds one slot from the moment it is taken until it ends."""
        return self.engine.slots - len(self.tasks)

    def _free_kv_bytes(self) -> int:
        return self.engine.kv_budget_bytes - sum(self.tasks.values())

    def _spawn(self, entry: Entry, fields: dict[str, str], resume: bool) -> None:
        need = self.engine.kv_reservation(fields.get("req") or "")
        task = asyncio.create_task(self._handle(entry, fields, need, resume=resume))
        # a request over the whole budget is refused in _handle and holds nothing
        self.tasks[task] = need if need <= self.engine.kv_budget_bytes else 0
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self.tasks.pop(task, None)
        self._wake.set()

    async def _resume_own(self) -> None:
        """Entries still pending under this replica's name were taken by an earlier process with
        the same id that stopped: continue them like any other stopped replica's."""
        for stream in await self.queue.streams():
            try:
                pending = await self.r.xpending_range(stream, keys.GEN_GROUP, min="-", max="+",
                                                      count=self.engine.slots, consumername=self.replica_id)
            except ResponseError:
                continue
            for p in pending:
                entry = Entry(stream, p["message_id"])
                found = await self.r.xrange(stream, entry.entry_id, entry.entry_id, count=1)
                if found:
                    self._spawn(entry, found[0][1], resume=True)
                else:
                    await self.queue.finish(entry)

    async def drain(self, timeout_s: float) -> None:
        """Let running requests finish; those still running after `timeout_s` are interrupted and
        stay pending in the queue, for another replica to continue."""
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=timeout_s)
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)

    async def _handle(self, entry: Entry, fields: dict[str, str], need: int, resume: bool = False) -> None:
        try:
            req = GenRequest.from_json(fields["req"])
        except (KeyError, ValueError, TypeError):
            log.error("dropping malformed queue entry %s", entry)
            await self.queue.finish(entry)
            return
        request_id_var.set(req.request_id)
        interrupted = False
        resp_key = keys.response_stream(req.request_id)
        cancel_key = keys.cancel_flag(req.request_id)
        try:
            async with self.r.pipeline(transaction=False) as pipe:
                pipe.set(keys.stream_owner(req.request_id), self.replica_id, ex=keys.RESPONSE_TTL_S)
                pipe.exists(cancel_key)
                _, cancelled_early = await pipe.execute()
            if cancelled_early:
                log.info("skipping request cancelled while queued")
                await self._write(req.request_id, Chunk("error", error_code="CANCELLED",
                                                        error_message="cancelled before it started"))
                return
            if req.deadline is not None and time.time() > req.deadline:
                log.info("dropping request whose deadline passed while queued")
                await self._write(req.request_id, Chunk("error", error_code="DEADLINE_EXCEEDED",
                                                        error_message="deadline passed while queued"))
                return
            if need > self.engine.kv_budget_bytes:
                await self._write(req.request_id, Chunk(
                    "error", error_code="INVALID_ARGUMENT",
                    error_message=f"the request may need {need >> 20} MiB of KV cache, more than a {self.engine.pool} "
                                  f"replica's budget ({self.engine.kv_budget_bytes >> 20} MiB); lower max_tokens or "
                                  "shorten the prompt"))
                return
            pool = self.engine.pool
            delivered: list[int] = []
            if resume:
                delivered, build_id, ended = await self._already_written(resp_key)
                if ended:
                    return
                log.warning("continuing a request whose replica stopped, after %d tokens", len(delivered))
                metrics.FAILOVERS.labels(pool).inc()
            else:
                build_id = ""
                metrics.QUEUE_WAIT.labels(pool).observe(max(0.0, time.time() - req.enqueued_at))
            started = time.perf_counter()
            first = True
            outcome = "cancelled"
            stream = self.engine.stream(req, replay=delivered, build_id=build_id)
            try:
                async for chunk in stream:
                    if first:
                        first = False
                        metrics.TTFT.labels(pool).observe(time.perf_counter() - started)
                    metrics.TOKENS.labels(pool).inc(len(chunk.token_ids))
                    chunk.replica_id = self.replica_id
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
        except LlamashipError as exc:
            metrics.REQUESTS.labels(self.engine.pool, exc.code.name.lower()).inc()
            await self._write(req.request_id, Chunk("error", error_code=exc.code.name, error_message=exc.message,
                                              replica_id=self.replica_id))
        except Exception as exc:  # noqa: BLE001 - reported to the client as INTERNAL, logged here
            log.exception("generation failed")
            await self._write(req.request_id, Chunk("error", error_code="INTERNAL",
                                              error_message=f"generation failed on replica {self.replica_id}: {type(exc).__name__}"))
        except asyncio.CancelledError:
            # This replica is stopping with the request unfinished: leave the entry pending so
            # that another replica continues it.
            interrupted = True
            raise
        finally:
            if not interrupted:
                await self.queue.finish(entry)

    async def _already_written(self, resp_key: str) -> tuple[list[int], str, bool]:
        """(token ids, build id, ended) of what the replica that stopped wrote for a request."""
        ids, build_id, ended = [], "", False
        for _id, fields in await self.r.xrange(resp_key):
            chunk = Chunk.from_fields(fields)
            ids.extend(chunk.token_ids)
            build_id = chunk.build_id or build_id
            ended = ended or chunk.kind in ("end", "error")
        return ids, build_id, ended

    async def reclaim_loop(self, stale_after_s: float, interval_s: float = 1.0) -> None:
        """Take over the requests of replicas of this pool that stopped (no heartbeat):
        each is continued from the tokens its stream already carries."""
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.reclaim(stale_after_s)
            except Exception:  # noqa: BLE001 - retried next round
                log.exception("reclaiming requests of stopped replicas failed")

    async def reclaim(self, stale_after_s: float) -> int:
        taken = 0
        holding: set[str] = set()  # stopped replicas that still hold requests
        for stream in await self.queue.streams():
            taken += await self._reclaim_stream(stream, stale_after_s, holding)
        for name, raw in (await self.r.hgetall(keys.REPLICAS)).items():
            hb = catalog.ReplicaHeartbeat.from_json(raw)
            if hb.pool == self.engine.pool and name not in holding and not catalog.is_live(hb, 3 * stale_after_s):
                await catalog.remove_heartbeat(self.r, name)  # long gone and owes nothing: forget it
        return taken

    async def _reclaim_stream(self, stream: str, stale_after_s: float, holding: set[str]) -> int:
        try:
            summary = await self.r.xpending(stream, keys.GEN_GROUP)
            consumers = await self.r.xinfo_consumers(stream, keys.GEN_GROUP)
        except ResponseError:  # the stream or its group is gone (Redis restarted empty)
            return 0
        pending_by = {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}
        for info in consumers:
            pending_by.setdefault(info["name"], 0)
        taken = 0
        for name, pending_count in pending_by.items():
            if name == self.replica_id or await catalog.replica_alive(self.r, name, stale_after_s):
                continue
            if not pending_count:  # a stopped replica with nothing left here: forget it
                await self.r.xgroup_delconsumer(stream, keys.GEN_GROUP, name)
                continue
            holding.add(name)
            free = self._free_slots()
            if free <= 0:
                return taken
            pending = await self.r.xpending_range(stream, keys.GEN_GROUP, min="-", max="+", count=free,
                                                  consumername=name)
            ids = [p["message_id"] for p in pending]
            # min idle: when two replicas race for the same entries, only the first claim succeeds
            claimed = await self.r.xclaim(stream, keys.GEN_GROUP, self.replica_id, min_idle_time=1000,
                                          message_ids=ids) if ids else []
            for entry_id, fields in claimed:
                if not fields:  # deleted meanwhile (finished or withdrawn)
                    await self.queue.finish(Entry(stream, entry_id))
                    continue
                self._spawn(Entry(stream, entry_id), fields, resume=True)
                taken += 1
        return taken

    async def _write(self, request_id: str, chunk: Chunk) -> str:
        """Append a chunk to the request's response stream if this replica still owns it.

        Returns "" to go on, or why to stop: the client cancelled; another replica took the
        request over (this one was presumed dead) and nothing was written; or no gateway relays
        the stream any more, and it was closed with a retryable error instead of the chunk."""
        result = await self._guarded_xadd(
            keys=[keys.response_stream(request_id), keys.stream_owner(request_id), keys.cancel_flag(request_id),
                  keys.relay_lease(request_id)],
            args=[self.replica_id, chunk.to_fields()["c"], keys.RESPONSE_TTL_S, _ABANDONED],
        )
        return {0: "", 1: "client cancelled", 2: "another replica took the request over",
                3: "no gateway relays the stream any more"}[int(result)]
