"""The gateway's side of the generation protocol (shared.request_protocol): enqueue, relay
responses while watching the request's replica, cancel, resume."""

from __future__ import annotations

import dataclasses
import time
from typing import AsyncIterator

import redis.asyncio as aioredis

from gateway import metrics
from gateway.prefix_routing import PrefixRouter
from shared import catalog
from shared import redis_keys as keys
from shared.errors import AlreadyExists, ResourceExhausted, Unavailable, shown
from shared.generation import Chunk, GenRequest
from shared.request_protocol import DuplicateRequest, Entry, PoolQueue, QueueFull, Requests, cost_tokens


def coalesced(chunks: list[tuple[str, Chunk]]) -> list[tuple[str, Chunk]]:
    """Consecutive token chunks read together (the reader was behind) as one chunk, under the
    last one's cursor: fewer messages to send while behind, and never a token held back."""
    out: list[tuple[str, Chunk]] = []
    for cursor, chunk in chunks:
        if out and chunk.kind == "tokens" and out[-1][1].kind == "tokens" and out[-1][1].build_id == chunk.build_id:
            prev = out[-1][1]
            out[-1] = (cursor, dataclasses.replace(prev, text=prev.text + chunk.text,
                                                   token_ids=prev.token_ids + chunk.token_ids))
        else:
            out.append((cursor, chunk))
    return out


class GenerationQueue:
    def __init__(self, r: aioredis.Redis, max_depth: int, wait_timeout_s: float, failover_timeout_s: float = 15.0,
                 tenant_max: int = 0, relay_lease_s: float = 10.0, prefix_route_chars: int = 0):
        self.r = r
        self.router = PrefixRouter(prefix_route_chars, lambda: catalog.live_replicas(r))
        self.relay_lease_s = relay_lease_s
        self.max_depth = max_depth
        self.tenant_max = tenant_max or max_depth
        self.wait_timeout_s = wait_timeout_s
        self.failover_timeout_s = failover_timeout_s
        self.requests = Requests(r)
        self._pools: dict[str, PoolQueue] = {}
        self._leased: set[str] = set()  # requests just enqueued: the enqueue started their relay lease

    def pool(self, pool: str) -> PoolQueue:
        if pool not in self._pools:
            self._pools[pool] = PoolQueue(self.r, pool)
        return self._pools[pool]

    async def depth(self, pool: str) -> dict[str, int]:
        return await self.pool(pool).depth_by_priority()

    async def enqueue(self, req: GenRequest, pool: str, context_length: int) -> Entry:
        """Append the request unless the pool's or the tenant's queue is full (checked and added
        atomically). `req.request_id` is the client's id, scoped to `req.tenant` in Redis. A long
        prompt prefers the replica its prefix routes to (gateway.prefix_routing)."""
        preferred = await self.router.preferred(req, pool)
        try:
            entry = await self.pool(pool).enqueue(
                req, cost=cost_tokens(req.text_for_cost, req.max_tokens, context_length),
                max_depth=self.max_depth, tenant_max=self.tenant_max, relay_lease_s=self.relay_lease_s,
                preferred=preferred)
        except QueueFull as exc:
            if exc.scope == "tenant":
                raise ResourceExhausted(
                    f"tenant {shown(req.tenant)} has {self.tenant_max} requests waiting or running in the {pool} pool, "
                    "its limit; retry later", retry_after_s=1.0) from None
            raise ResourceExhausted(
                f"the {pool} pool's queue is full ({self.max_depth} requests waiting or running); retry later",
                retry_after_s=1.0,
            ) from None
        except DuplicateRequest:
            raise AlreadyExists(f"request_id {shown(req.request_id)} was used in the last "
                                f"{keys.RESPONSE_TTL_S // 60} minutes; use a new id for a new request") from None
        if preferred:
            metrics.PREFIX_ROUTED.labels(pool).inc()
        if len(self._leased) > 100_000:  # entries of requests whose relay never started
            self._leased.clear()
        self._leased.add(keys.request_scope(req.tenant, req.request_id))
        return entry

    async def find(self, request_id: str, tenant: str) -> Entry | None:
        """The queue entry of a request `tenant` started and whose stream can still be resumed."""
        sid = keys.request_scope(tenant, request_id)
        entry = await self.requests.entry(sid)
        if entry is None or not await self.requests.relayed(sid):
            return None  # unknown to this tenant, or no gateway relayed it for a lease: the replica stopped it
        return entry

    async def cancel(self, request_id: str, tenant: str) -> bool:
        """Tell the replica (now or when it picks the request up) to stop; True if `tenant` has
        the request in flight. Idempotent; creates nothing for an unknown or finished id."""
        return await self.requests.cancel(keys.request_scope(tenant, request_id))

    async def responses(self, request_id: str, tenant: str, pool: str, entry: Entry, after: str = "0-0"
                        ) -> AsyncIterator[tuple[str, Chunk]]:
        """Yield (cursor, chunk) for the request's chunks after `after`, until its end or error chunk.

        While relaying, renews the request's relay lease: a request whose gateway went away is
        stopped by its replica once the lease runs out, unless a client resumed it meanwhile.

        While waiting, watches the replica working on the request. When it stops (its liveness
        key expired), another replica of the pool takes the request over and continues the same
        stream; if none does within the failover timeout, the stream ends with UNAVAILABLE
        (retryable) instead of leaving the caller hanging.
        """
        sid = keys.request_scope(tenant, request_id)
        last = after
        waited_since = last_data = renewed = time.monotonic()
        if sid in self._leased:  # one round trip less before the first token
            self._leased.discard(sid)
        else:
            await self.requests.renew_relay(sid, self.relay_lease_s)
        lost_since: float | None = None
        while True:
            if time.monotonic() - renewed > self.relay_lease_s / 3:
                await self.requests.renew_relay(sid, self.relay_lease_s)
                renewed = time.monotonic()
            chunks = await self.requests.read(sid, last, block_ms=1000)
            if not chunks:
                replica_id = await self.requests.consumer_of(entry)
                if not replica_id:
                    if not await self.requests.queued(entry):
                        if await self.requests.has_after(sid, last):
                            continue  # it ended just now: its last chunks are there
                        # neither waiting nor taken, and no end seen: Redis lost it (restarted empty)
                        raise Unavailable("the request was lost by the queue (Redis restarted); it may be retried")
                    if lost_since is None and time.monotonic() - waited_since > self.wait_timeout_s:
                        await self.withdraw(entry)
                        raise Unavailable(
                            f"no {pool} replica took the request within {self.wait_timeout_s:.0f}s; it may be retried"
                        )
                elif not await catalog.replica_alive(self.r, replica_id):
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
            for last, chunk in coalesced(chunks):
                yield last, chunk
                if chunk.kind in ("end", "error"):
                    await self.requests.relay_ended(sid)
                    return

    async def withdraw(self, entry: Entry) -> None:
        """Remove a request that no replica has taken yet."""
        await self.pool(keys.gen_stream_pool(entry.stream)).withdraw(entry)

    async def abandon(self, request_id: str, tenant: str, entry: Entry) -> None:
        """The client went away: stop the request and let its responses expire soon."""
        sid = keys.request_scope(tenant, request_id)
        await self.requests.cancel(sid)  # first: it flags only a request still in its queue stream
        await self.withdraw(entry)
        await self.requests.expire_responses(sid, 60)
