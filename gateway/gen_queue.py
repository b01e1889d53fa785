"""The gateway's side of the Redis generation queue: enqueue, relay responses, cancel."""

from __future__ import annotations

import asyncio
import math
import time
from typing import AsyncIterator

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from shared import redis_keys as keys
from shared import catalog
from shared.errors import AlreadyExists, ResourceExhausted, Unavailable
from shared.fair_queue import DuplicateRequest, Entry, FairQueue, QueueFull, cost_tokens, lookup
from shared.resilience import is_lost_group
from shared.generation import Chunk, GenRequest


class GenerationQueue:
    def __init__(self, r: aioredis.Redis, max_depth: int, wait_timeout_s: float, replica_stale_s: float = 10.0,
                 failover_timeout_s: float = 15.0, tenant_max: int = 0, relay_lease_s: float = 10.0):
        self.r = r
        self.relay_lease_s = relay_lease_s
        self.max_depth = max_depth
        self.tenant_max = tenant_max or max_depth
        self.wait_timeout_s = wait_timeout_s
        self.replica_stale_s = replica_stale_s
        self.failover_timeout_s = failover_timeout_s
        self._pools: dict[str, FairQueue] = {}

    def pool(self, pool: str) -> FairQueue:
        if pool not in self._pools:
            self._pools[pool] = FairQueue(self.r, pool)
        return self._pools[pool]

    async def depth(self, pool: str) -> dict[str, int]:
        return await self.pool(pool).depth_by_priority()

    async def enqueue(self, req: GenRequest, pool: str, context_length: int) -> Entry:
        """Append the request unless the pool's or the tenant's queue is full (checked and added atomically)."""
        req.enqueued_at = time.time()
        try:
            return await self.pool(pool).enqueue(
                req.to_json(), req.request_id, priority=req.priority, tenant=req.tenant, model=req.model,
                cost=cost_tokens(req.prompt, req.max_tokens, context_length),
                max_depth=self.max_depth, tenant_max=self.tenant_max, relay_lease_s=self.relay_lease_s)
        except QueueFull as exc:
            if exc.scope == "tenant":
                raise ResourceExhausted(
                    f"tenant {req.tenant!r} has {self.tenant_max} requests waiting or running in the {pool} pool, "
                    "its limit; retry later", retry_after_s=1.0) from None
            raise ResourceExhausted(
                f"the {pool} pool's queue is full ({self.max_depth} requests waiting or running); retry later",
                retry_after_s=1.0,
            ) from None
        except DuplicateRequest:
            raise AlreadyExists(f"request_id {req.request_id!r} was used in the last "
                                f"{keys.RESPONSE_TTL_S // 60} minutes; use a new id for a new request") from None

    async def find(self, request_id: str, tenant: str) -> Entry | None:
        """The queue entry of a request `tenant` started and whose stream can still be resumed."""
        found = await lookup(self.r, request_id)
        if found is None or found[0] != keys.tenant_part(tenant):
            return None
        if not await self.r.exists(keys.relay_lease(request_id)):
            return None  # no gateway relayed it for a lease: the replica stopped it
        return found[1]

    async def responses(self, request_id: str, pool: str, entry: Entry, after: str = "0-0"
                        ) -> AsyncIterator[tuple[str, Chunk]]:
        """Yield (cursor, chunk) for the request's chunks after `after`, until its end or error chunk.

        While relaying, renews the request's relay lease: a request whose gateway went away is
        stopped by its replica once the lease runs out, unless a client resumed it meanwhile.

        While waiting, watches the replica working on the request. When it stops (no heartbeat),
        another replica of the pool takes the request over and continues the same stream; if
        none does within the failover timeout, the stream ends with UNAVAILABLE (retryable)
        instead of leaving the caller hanging.
        """
        key = keys.response_stream(request_id)
        lease_key = keys.relay_lease(request_id)
        lease_ttl = max(1, math.ceil(self.relay_lease_s))
        last = after
        waited_since = last_data = renewed = time.monotonic()
        await self.r.set(lease_key, "1", ex=lease_ttl)
        lost_since: float | None = None
        while True:
            if time.monotonic() - renewed > self.relay_lease_s / 3:
                await self.r.set(lease_key, "1", ex=lease_ttl)
                renewed = time.monotonic()
            resp = await self.r.xread({key: last}, block=1000, count=256)
            if not resp:
                replica_id = await self._consumer_of(entry)
                if not replica_id:
                    if not await self.r.xrange(entry.stream, entry.entry_id, entry.entry_id, count=1):
                        # neither waiting nor taken, and no end seen: Redis lost it (restarted empty)
                        raise Unavailable("the request was lost by the queue (Redis restarted); it may be retried")
                    if lost_since is None and time.monotonic() - waited_since > self.wait_timeout_s:
                        await self.withdraw(entry)
                        raise Unavailable(
                            f"no {pool} replica took the request within {self.wait_timeout_s:.0f}s; it may be retried"
                        )
                elif not await catalog.replica_alive(self.r, replica_id, self.replica_stale_s):
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since > self.failover_timeout_s:
                        raise Unavailable(
                            f"replica {replica_id} stopped while serving this request and no replica took it "
                            f"over within {self.failover_timeout_s:.0f}s; it may be retried"
                        )
                else:
                    lost_since = None
                    if time.monotonic() - last_data > self.wait_timeout_s:
                        raise Unavailable(
                            f"replica {replica_id} sent nothing for {self.wait_timeout_s:.0f}s; it may be retried"
                        )
                continue
            last_data = time.monotonic()
            for _stream, entries in resp:
                for last, fields in entries:
                    chunk = Chunk.from_fields(fields)
                    yield last, chunk
                    if chunk.kind in ("end", "error"):
                        await self.r.delete(key, lease_key)
                        return

    async def _consumer_of(self, entry: Entry) -> str:
        """The replica that took the queue entry, or "" while it waits (or if it is lost)."""
        try:
            pending = await self.r.xpending_range(entry.stream, keys.GEN_GROUP, min=entry.entry_id,
                                                  max=entry.entry_id, count=1)
        except ResponseError as exc:
            if not is_lost_group(exc):
                raise
            return ""
        return pending[0]["consumer"] if pending else ""

    async def cancel(self, request_id: str) -> None:
        """Tell the replica (now or when it picks the request up) to stop. Idempotent."""
        await self.r.set(keys.cancel_flag(request_id), "1", ex=keys.CANCEL_TTL_S)

    async def withdraw(self, entry: Entry) -> None:
        """Remove a request that no replica has taken yet."""
        await self.r.xdel(entry.stream, entry.entry_id)

    async def abandon(self, request_id: str, entry: Entry) -> None:
        await asyncio.gather(self.cancel(request_id), self.withdraw(entry))
        await self.r.expire(keys.response_stream(request_id), 60)
