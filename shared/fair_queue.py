"""The generation queue of a pool: priorities, per-tenant fairness, capacity-aware admission.

Layout in Redis (see shared.redis_keys):
- one STREAM per (pool, priority, tenant), each with the consumer group "replicas". An entry
  stays in its stream, pending under the replica that took it, until its response has ended,
  so a replica that dies leaves its requests to be claimed by another one, never lost;
- per (pool, priority) a LIST of tenants with waiting requests, rotated on every pick (round
  robin between tenants);
- per pool a SET of its streams (for depth, limits and reclaiming) and a doorbell STREAM that
  wakes idle replicas when a request arrives.

The gateway enqueues (bounded per pool and per tenant, atomically). A replica with a free slot
picks: the highest priority with waiting work first, and in it the tenant whose turn it is;
the request is taken only if its worst-case KV need fits the replica's free budget, otherwise
the replica waits (head of line, so large requests are not starved by small ones).
Picking and taking are one atomic script, so a request is never taken twice or dropped.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import redis.asyncio as aioredis

from shared import redis_keys as keys

PRIORITIES = ("interactive", "batch")  # served strictly in this order
DEFAULT_TENANT = "default"


# KEYS: streams set, tenant ring, stream, request-id claim, doorbell, relay lease.
# ARGV: request json, max depth, tenant max, rid ttl, tenant, cost tokens, model, tenant stream
# suffix, relay lease seconds.
# Returns the entry id, or FULL / TENANT_FULL / DUPLICATE.
_ENQUEUE = """
local total, mine = 0, 0
local prefix = ARGV[8]
for _, s in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local n = redis.call('XLEN', s)
  total = total + n
  if string.sub(s, -string.len(prefix)) == prefix then mine = mine + n end
end
if total >= tonumber(ARGV[2]) then return 'FULL' end
if mine >= tonumber(ARGV[3]) then return 'TENANT_FULL' end
if not redis.call('SET', KEYS[4], '1', 'NX', 'EX', tonumber(ARGV[4])) then return 'DUPLICATE' end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[3], 'replicas', '0', 'MKSTREAM')
end
redis.call('SADD', KEYS[1], KEYS[3])
local id = redis.call('XADD', KEYS[3], '*', 'req', ARGV[1], 'cost', ARGV[6], 'model', ARGV[7])
if not redis.call('LPOS', KEYS[2], ARGV[5]) then redis.call('RPUSH', KEYS[2], ARGV[5]) end
redis.call('XADD', KEYS[5], 'MAXLEN', '~', '100', '*', 'id', id)
redis.call('SET', KEYS[4], ARGV[5] .. '\t' .. KEYS[3] .. '\t' .. id, 'EX', tonumber(ARGV[4]))
redis.call('SET', KEYS[6], '1', 'EX', tonumber(ARGV[9]))
return id
"""

# ARGV: consumer, free KV bytes, JSON {model: KV bytes per token} of the models the replica
# serves, whole KV budget, then per priority (highest first): its ring key and its stream key
# prefix. A request for a model the replica does not serve (yet) is left for one that does.
# A request larger than the whole budget is taken (for the replica to refuse it) rather than
# left blocking the queue.
# Returns {} (nothing it can take), {'WAIT'} (the next request does not fit), or {stream, id, req}.
_PICK = """
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
end
local function next_waiting(stream)
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    if field(g, 'name') == 'replicas' then
      local e = redis.call('XRANGE', stream, '(' .. field(g, 'last-delivered-id'), '+', 'COUNT', 1)
      return e[1]
    end
  end
end
local free = tonumber(ARGV[2])
local per_token = cjson.decode(ARGV[3])
for p = 5, #ARGV, 2 do
  local ring, prefix = ARGV[p], ARGV[p + 1]
  for _ = 1, redis.call('LLEN', ring) do
    local tenant = redis.call('LINDEX', ring, 0)
    local stream = prefix .. tenant
    local entry = nil
    if redis.call('EXISTS', stream) == 1 then entry = next_waiting(stream) end
    if not entry then
      redis.call('LPOP', ring)
    else
      local f = entry[2]
      local per = per_token[field(f, 'model') or '']
      local need = tonumber(field(f, 'cost') or '0') * (per or 0)
      if per and need > free and need <= tonumber(ARGV[4]) then return {'WAIT'} end
      redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      if per then
        local got = redis.call('XREADGROUP', 'GROUP', 'replicas', ARGV[1], 'COUNT', 1, 'STREAMS', stream, '>')
        local e = got[1][2][1]
        return {stream, e[1], field(e[2], 'req')}
      end
    end
  end
end
return {}
"""


@dataclass(frozen=True)
class Entry:
    """Where one request sits: its stream and its id in it."""

    stream: str
    entry_id: str


@dataclass(frozen=True)
class Picked:
    entry: Entry
    request_json: str


class QueueFull(Exception):
    def __init__(self, scope: str):
        super().__init__(scope)
        self.scope = scope  # "pool" | "tenant"


class DuplicateRequest(Exception):
    pass


def cost_tokens(prompt: str, max_tokens: int, context_length: int) -> int:
    """An upper bound of the tokens a request can hold in the KV cache before it is tokenized:
    byte-level and byte-fallback tokenizers give at most one token per byte (plus BOS/prefix)."""
    return min(context_length, len(prompt.encode()) + 2 + max_tokens)


class FairQueue:
    def __init__(self, r: aioredis.Redis, pool: str):
        self.r = r
        self.pool = pool
        self._enqueue = r.register_script(_ENQUEUE)
        self._pick = r.register_script(_PICK)
        self.streams_key = keys.gen_streams(pool)
        self.bell = keys.gen_doorbell(pool)

    async def enqueue(self, request_json: str, request_id: str, *, priority: str, tenant: str, cost: int,
                      model: str, max_depth: int, tenant_max: int, relay_lease_s: float = 10.0) -> Entry:
        if priority not in PRIORITIES:
            raise ValueError(f"unknown priority {priority!r}")
        stream = keys.gen_stream(self.pool, priority, tenant)
        result = await self._enqueue(
            keys=[self.streams_key, keys.gen_tenant_ring(self.pool, priority), stream,
                  keys.request_claim(request_id), self.bell, keys.relay_lease(request_id)],
            args=[request_json, max_depth, tenant_max, keys.RESPONSE_TTL_S, keys.tenant_part(tenant), cost, model,
                  keys.gen_stream_tenant_suffix(tenant), max(1, math.ceil(relay_lease_s))],
        )
        if result == "FULL":
            raise QueueFull("pool")
        if result == "TENANT_FULL":
            raise QueueFull("tenant")
        if result == "DUPLICATE":
            raise DuplicateRequest(request_id)
        return Entry(stream, result)

    async def pick(self, consumer: str, free_kv_bytes: int, kv_budget_bytes: int,
                   kv_bytes_per_token: dict[str, int]) -> Picked | str | None:
        """Take the next request for `consumer` among those for the models in `kv_bytes_per_token`:
        a Picked, "WAIT" (the next one does not fit the free KV budget), or None (nothing to take)."""
        if not kv_bytes_per_token:
            return None
        args: list = [consumer, int(free_kv_bytes), json.dumps(kv_bytes_per_token), int(kv_budget_bytes)]
        for priority in PRIORITIES:
            args += [keys.gen_tenant_ring(self.pool, priority), keys.gen_stream(self.pool, priority, "")]
        result = await self._pick(keys=[self.streams_key], args=args)
        if not result:
            return None
        if result[0] == "WAIT":
            return "WAIT"
        return Picked(Entry(result[0], result[1]), result[2])

    async def streams(self) -> list[str]:
        return sorted(await self.r.smembers(self.streams_key))

    async def depth_by_priority(self) -> dict[str, int]:
        """Requests waiting or running, per priority."""
        streams = await self.streams()
        async with self.r.pipeline(transaction=False) as pipe:
            for s in streams:
                pipe.xlen(s)
            lengths = await pipe.execute()
        depth = dict.fromkeys(PRIORITIES, 0)
        for s, n in zip(streams, lengths):
            depth[keys.gen_stream_priority(s)] = depth.get(keys.gen_stream_priority(s), 0) + n
        return depth

    async def latest_bell(self) -> str:
        last = await self.r.xrevrange(self.bell, count=1)
        return last[0][0] if last else "0-0"

    async def wait_bell(self, last_id: str, timeout_ms: int) -> str:
        """Block until a request is enqueued after `last_id` (or the timeout); returns the new last id."""
        resp = await self.r.xread({self.bell: last_id}, block=timeout_ms, count=100)
        for _stream, entries in resp or []:
            if entries:
                last_id = entries[-1][0]
        return last_id

    async def finish(self, entry: Entry) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.xack(entry.stream, keys.GEN_GROUP, entry.entry_id)
            pipe.xdel(entry.stream, entry.entry_id)
            await pipe.execute()


async def lookup(r: aioredis.Redis, request_id: str) -> tuple[str, Entry] | None:
    """(tenant key part, queue entry) of a request enqueued in the last RESPONSE_TTL_S seconds."""
    raw = await r.get(keys.request_claim(request_id))
    parts = raw.split("\t") if raw else []
    if len(parts) != 3:
        return None
    return parts[0], Entry(parts[1], parts[2])
