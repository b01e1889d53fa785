"""The per-request generation protocol in Redis: one home for every rule and Lua script.

A request is known by its scoped id, `<tenant key part>:<client request id>`
(`redis_keys.request_scope`): its claim, response stream, cancel flag, owner and relay lease are
keyed by it, so tenants never see or touch each other's ids (the same client id used by two
tenants is two requests).

Per pool (see shared.redis_keys):
- one queue STREAM per (priority, tenant) with the consumer group GROUP. An entry stays in its
  stream, pending under the replica that took it, until its response has ended, so a replica
  that dies leaves its requests to be claimed by another one, never lost;
- per priority a LIST of tenants with waiting requests, rotated on every pick (round robin);
- a SET of its streams (depth, limits, reclaiming) and a doorbell STREAM that wakes replicas.

Per request:
- claim      "<stream>\\t<entry id>" while the id is in use (RESPONSE_TTL_S): same-tenant reuse
             is refused, and resume/cancel find the entry through it;
- owner      the replica allowed to append to the response stream (the last one to take it);
- relay      a lease a relaying gateway renews; the replica stops a stream nobody relays;
- cancel     set only while the request is in flight (queued or running);
- responses  the chunks, ending with one "end" or "error" chunk.

The gateway enqueues (bounded per pool and per tenant, atomically). A replica with a free slot
picks: the highest priority with waiting work first, and in it the tenant whose turn it is,
skipping (with fair slots) a tenant that already runs its share of the replica's slots while
another tenant waits. A request is taken only if its worst-case KV need fits the replica's free
budget, otherwise the replica waits (head of line). Reclaiming a dead replica's requests applies
the same admission. Taking and acknowledging are atomic scripts: a request is never taken twice,
and only its current owner can remove it from the queue.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError

from shared import redis_conn
from shared import redis_keys as keys
from shared.generation import Chunk, GenRequest
from shared.resilience import is_lost_group

PRIORITIES = ("interactive", "batch")  # served strictly in this order
GROUP = keys.GEN_GROUP
RECLAIM_MIN_IDLE_MS = 1000  # when two replicas race to claim the same entries, only the first wins
# A replica's free-slot report (the room hash) is valid this long; every pick renews it, and an
# idle replica picks at least once a second (its doorbell wait times out), a full one reports 0.
ROOM_TTL_MS = 3000

_LUA_COMMON = """
local function field(flat, name)
  for i = 1, #flat, 2 do if flat[i] == name then return flat[i + 1] end end
end
local function next_waiting(stream, group)
  if redis.call('EXISTS', stream) == 0 then return nil end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    if field(g, 'name') == group then
      local e = redis.call('XRANGE', stream, '(' .. field(g, 'last-delivered-id'), '+', 'COUNT', 1)
      return e[1]
    end
  end
end
-- 'take' | 'wait' (does not fit the free KV budget yet) | 'skip' (model not served here), and
-- the KV bytes it needs. A request larger than the whole budget is taken, for the replica to
-- refuse it, rather than left blocking the queue.
local function admit(f, free, budget, per_token)
  local per = per_token[field(f, 'model') or '']
  if not per then return 'skip', 0 end
  local need = tonumber(field(f, 'cost') or '0') * per
  if need > free and need <= budget then return 'wait', need end
  return 'take', need
end
"""

# Every key a script touches is in its KEYS and in one hash slot (shared.redis_keys): a pool's
# scripts are given the pool's streams the caller knows of, and answer RETRY when the pool has one
# more (the caller then reads the set again).
_LUA_DECLARED = """
local declared = {}
for i = 1, #KEYS do declared[KEYS[i]] = true end
local function undeclared(set_key)
  for _, s in ipairs(redis.call('SMEMBERS', set_key)) do
    if not declared[s] then return true end
  end
  return false
end
"""

# A request's own keys first (its slot): KEYS: claim, relay lease. ARGV: claim ttl, relay lease
# seconds. Takes the id (DUPLICATE when in use) and starts the relay lease before the entry exists,
# so a replica never finds the request unrelayed.
_CLAIM = """
if not redis.call('SET', KEYS[1], '', 'NX', 'EX', tonumber(ARGV[1])) then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[2]))
return 1
"""

# Then the pool's (its slot): KEYS: streams set, tenant ring, stream, doorbell, then every stream
# of the pool. ARGV: request json, max depth, tenant max, tenant part, cost, model, tenant stream
# suffix, group, scoped id, preferred replica ("" none). Returns the entry id, or FULL /
# TENANT_FULL / RETRY.
_ENQUEUE = _LUA_DECLARED + """
if undeclared(KEYS[1]) then return 'RETRY' end
local total, mine = 0, 0
local suffix = ARGV[7]
for _, s in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local n = redis.call('XLEN', s)
  total = total + n
  if string.sub(s, -string.len(suffix)) == suffix then mine = mine + n end
end
if total >= tonumber(ARGV[2]) then return 'FULL' end
if mine >= tonumber(ARGV[3]) then return 'TENANT_FULL' end
if redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('XGROUP', 'CREATE', KEYS[3], ARGV[8], '0', 'MKSTREAM')
end
redis.call('SADD', KEYS[1], KEYS[3])
local id
if ARGV[10] ~= '' then
  id = redis.call('XADD', KEYS[3], '*', 'req', ARGV[1], 'cost', ARGV[5], 'model', ARGV[6], 'sid', ARGV[9], 'pref', ARGV[10])
else
  id = redis.call('XADD', KEYS[3], '*', 'req', ARGV[1], 'cost', ARGV[5], 'model', ARGV[6], 'sid', ARGV[9])
end
if not redis.call('LPOS', KEYS[2], ARGV[4]) then redis.call('RPUSH', KEYS[2], ARGV[4]) end
redis.call('XADD', KEYS[4], 'MAXLEN', '~', '100', '*', 'id', id)
return id
"""

# ARGV: group, consumer, free KV bytes, JSON {model: KV bytes per token} of the models the
# replica serves, whole KV budget, fair slots (1/0), the replica's slots, JSON {tenant part:
# requests it runs here}, headroom window ms (0: off), prefix grace ms, room report ttl ms, then
# per priority (highest first): its ring key and stream key prefix. KEYS: streams set, room hash,
# the rings, then every stream of the pool.
# Headroom: while another tenant has sent this pool work within the window, one tenant may not
# take a replica's last free slot (a newcomer then never waits for a long request to end).
# Prefix routing: an entry preferred for another replica (the gateway's choice for its prompt
# prefix, whose KV that replica caches) is left to it for the grace after its enqueue, while that
# replica reports free slots in the room hash (replica -> "<free slots> <valid until ms>", written
# by every pick). A stream's entries are delivered in order, so a held entry holds its tenant's
# stream for this replica for at most the grace.
# Returns {} (nothing to take), {'WAIT'} (the next request does not fit), {'HOLD', ms} (nothing
# to take now; an entry held for its preferred replica is free for all in ms), or {stream, id,
# req, sid, tenant part, preferred replica}, or {'RETRY'} (the pool has a stream not in KEYS).
_PICK = _LUA_COMMON + _LUA_DECLARED + """
if undeclared(KEYS[1]) then return {'RETRY'} end
local group, consumer = ARGV[1], ARGV[2]
local free, budget = tonumber(ARGV[3]), tonumber(ARGV[5])
local per_token = cjson.decode(ARGV[4])
local running = cjson.decode(ARGV[8])
local share = nil
if ARGV[6] == '1' then
  local with_work, n, waiting, n_waiting = {}, 0, {}, 0
  for t, c in pairs(running) do
    if tonumber(c) > 0 then with_work[t] = true; n = n + 1 end
  end
  for p = 12, #ARGV, 2 do
    for _, t in ipairs(redis.call('LRANGE', ARGV[p], 0, -1)) do
      if not waiting[t] and declared[ARGV[p + 1] .. t] and next_waiting(ARGV[p + 1] .. t, group) then
        waiting[t] = true
        n_waiting = n_waiting + 1
        if not with_work[t] then with_work[t] = true; n = n + 1 end
      end
    end
  end
  if n_waiting > 1 then share = math.max(1, math.floor(tonumber(ARGV[7]) / n)) end
end
local total = 0
for _, c in pairs(running) do total = total + tonumber(c) end
local last_slot = ARGV[6] == '1' and tonumber(ARGV[7]) > 1 and total + 1 >= tonumber(ARGV[7])
local others_recent = nil
-- has a tenant other than `tenant` enqueued in this pool within the headroom window?
local function others_active(tenant)
  if others_recent == nil then
    others_recent = {}
    local window = tonumber(ARGV[9])
    if window > 0 then
      local now = redis.call('TIME')
      local since = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) - window
      for _, s in ipairs(redis.call('SMEMBERS', KEYS[1])) do
        if redis.call('EXISTS', s) == 1 then
          local info = redis.call('XINFO', 'STREAM', s)
          local last = field(info, 'last-generated-id') or '0-0'
          if tonumber(string.match(last, '^(%d+)')) >= since then
            others_recent[string.match(s, ':([^:]*)$')] = true
          end
        end
      end
    end
  end
  for t, _ in pairs(others_recent) do
    if t ~= tenant then return true end
  end
  return false
end
local grace, room_ttl = tonumber(ARGV[10]), tonumber(ARGV[11])
local now_ms = nil
local function clock()
  if now_ms == nil then
    local t = redis.call('TIME')
    now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return now_ms
end
local function has_room(replica)
  local v = redis.call('HGET', KEYS[2], replica)
  if not v then return false end
  local n, valid = string.match(v, '^(%-?%d+) (%d+)$')
  if not n or tonumber(valid) < clock() then
    redis.call('HDEL', KEYS[2], replica)
    return false
  end
  return tonumber(n) > 0
end
local hold_ms = nil
-- is the entry left to the replica its prefix prefers (still within the grace, and it has room)?
local function preferred_elsewhere(entry)
  local pref = field(entry[2], 'pref')
  if not pref or pref == '' or pref == consumer or grace <= 0 then return false end
  local left = grace - (clock() - tonumber(string.match(entry[1], '^(%d+)')))
  if left <= 0 or not has_room(pref) then return false end
  if hold_ms == nil or left < hold_ms then hold_ms = left end
  return true
end
local function take(share)
  local held = false
  for p = 12, #ARGV, 2 do
    local ring, prefix = ARGV[p], ARGV[p + 1]
    for _ = 1, redis.call('LLEN', ring) do
      local tenant = redis.call('LINDEX', ring, 0)
      local stream = prefix .. tenant
      local entry = declared[stream] and next_waiting(stream, group)
      if not entry then
        redis.call('LPOP', ring)
      elseif preferred_elsewhere(entry) then
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      elseif share and tonumber(running[tenant] or 0) >= share then
        held = true
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
      elseif last_slot and tonumber(running[tenant] or 0) == total and others_active(tenant) then
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')  -- the last slot is kept for the others
      else
        local verdict = admit(entry[2], free, budget, per_token)
        if verdict == 'wait' then return {'WAIT'} end
        redis.call('LMOVE', ring, ring, 'LEFT', 'RIGHT')
        if verdict == 'take' then
          local got = redis.call('XREADGROUP', 'GROUP', group, consumer, 'COUNT', 1, 'STREAMS', stream, '>')
          local e = got[1][2][1]
          return {stream, e[1], field(e[2], 'req') or '', field(e[2], 'sid') or '', tenant, field(e[2], 'pref') or ''}
        end
      end
    end
  end
  return held
end
local got = take(share)
-- every tenant with work waiting is at its share: a free slot is still better used than idle
if got == true then got = take(nil) end
local free_slots = tonumber(ARGV[7]) - total - ((got == true or got == false or got[1] == 'WAIT') and 0 or 1)
redis.call('HSET', KEYS[2], consumer, free_slots .. ' ' .. (clock() + room_ttl))
if got == true or got == false then
  if hold_ms then return {'HOLD', tostring(hold_ms)} end
  return {}
end
return got
"""

# KEYS: stream (the caller checked that the dead replica's liveness key is gone). ARGV: group, consumer, dead consumer, min idle
# ms, free slots, free KV bytes, per-token JSON, whole KV budget.
# Takes over the dead replica's entries that this replica admits, in queue order, while slots
# last; an entry that must wait for KV stops the round. Entries deleted meanwhile (finished or
# withdrawn) are acknowledged. Returns a flat list id, req, sid, ...
_RECLAIM = _LUA_COMMON + """
local group, me, dead = ARGV[1], ARGV[2], ARGV[3]
local slots, free, budget = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[8])
local per_token = cjson.decode(ARGV[7])
local out = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], group, '-', '+', 100, dead)) do
  if slots <= 0 then break end
  local id = p[1]
  local e = redis.call('XRANGE', KEYS[1], id, id)[1]
  if not e then
    redis.call('XACK', KEYS[1], group, id)
  else
    local verdict, need = admit(e[2], free, budget, per_token)
    if verdict == 'wait' then break end
    if verdict == 'take' then
      local got = redis.call('XCLAIM', KEYS[1], group, me, tonumber(ARGV[4]), id)
      if got[1] then
        slots = slots - 1
        if need <= budget then free = free - need end
        table.insert(out, id)
        table.insert(out, field(e[2], 'req') or '')
        table.insert(out, field(e[2], 'sid') or '')
      end
    end
  end
end
return out
"""

# KEYS: stream. ARGV: group, consumer, entry id. Acknowledge and remove the entry only while it
# is pending under this consumer: a replica that was presumed dead and replaced must not remove
# the entry from its new owner's pending list.
_FINISH = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[3], ARGV[3], 1, ARGV[2]) == 0 then return 0 end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[3])
redis.call('XDEL', KEYS[1], ARGV[3])
return 1
"""

# KEYS: claim, cancel flag. ARGV: ttl, the claim the caller found (its entry still queued or
# running: the queue lives in another hash slot, so the caller checked it). Flag the request only
# while the claim still says so; never create anything for an id that is unknown or reused.
_CANCEL = """
if redis.call('GET', KEYS[1]) ~= ARGV[2] then return 0 end
redis.call('SET', KEYS[2], '1', 'EX', tonumber(ARGV[1]))
return 1
"""

# KEYS: response stream, owner, cancel flag, relay lease. ARGV: consumer, chunk, ttl, the chunk
# that closes an unrelayed stream. Append only while this replica owns the stream and a gateway
# relays it (else close the stream with ARGV[4]); report a cancel flag in the same round trip.
_WRITE = """
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
WRITE_OUTCOMES = {0: "", 1: "client cancelled", 2: "another replica took the request over",
                  3: "no gateway relays the stream any more"}
_ABANDONED = Chunk("error", error_code="UNAVAILABLE",
                   error_message="the stream was stopped: no gateway relayed it (its gateway went away and no "
                                 "client resumed it in time); it may be retried").to_fields()["c"]


@dataclass(frozen=True)
class Entry:
    """Where one request sits: its stream and its id in it."""

    stream: str
    entry_id: str

    @property
    def enqueued_ms(self) -> int:
        """Redis's clock (ms) when the entry was added: its id's first part."""
        return int(self.entry_id.split("-")[0])


@dataclass(frozen=True)
class Picked:
    entry: Entry
    request_json: str
    sid: str  # scoped request id ("" from gateways older than the scoping: derive it from the request)
    tenant: str  # the tenant's key part
    preferred: str = ""  # the replica the gateway preferred for the prompt's prefix ("" none)

    def scoped_id(self, req: GenRequest) -> str:
        return self.sid or keys.request_scope(req.tenant, req.request_id)


@dataclass(frozen=True)
class Held:
    """Nothing to take now: a request is left to the replica its prefix prefers for `wait_ms` more."""

    wait_ms: int


class QueueFull(Exception):
    def __init__(self, scope: str):
        super().__init__(scope)
        self.scope = scope  # "pool" | "tenant"


class DuplicateRequest(Exception):
    pass


class NotReplicated(RedisConnectionError):
    """The enqueue reached the primary but not the replicas asked for (WAIT) in time: it was
    withdrawn, and the caller may retry with the same request id."""


_RETRIES = 8  # rounds of "the pool gained a stream meanwhile" before giving up (each one reads the set)
_PENDING_CLAIM_S = 30  # the id's claim until its enqueue is acknowledged (then RESPONSE_TTL_S)


def cost_tokens(prompt: str, max_tokens: int, context_length: int) -> int:
    """An upper bound of the tokens a request can hold in the KV cache before it is tokenized:
    byte-level and byte-fallback tokenizers give at most one token per byte (plus BOS/prefix)."""
    return min(context_length, len(prompt.encode()) + 2 + max_tokens)


async def redis_now_ms(r: aioredis.Redis, key: str | None = None) -> int:
    """Redis's clock: the one clock every host compares against (entry ids are stamped by it). On
    Redis Cluster, the clock of the primary serving `key` (the one that stamps its entry ids)."""
    if key is not None and redis_conn.is_cluster(r):
        sec, usec = await r.execute_command("TIME", target_nodes=r.get_node_from_key(key))
    else:
        sec, usec = await r.time()
    return int(sec) * 1000 + int(usec) // 1000


class PoolQueue:
    """The queue of one pool: enqueue, pick, reclaim, finish."""

    def __init__(self, r: aioredis.Redis, pool: str):
        self.r = r
        self.pool = pool
        self._claim = r.register_script(_CLAIM)
        self._enqueue = r.register_script(_ENQUEUE)
        self._pick = r.register_script(_PICK)
        self._reclaim = r.register_script(_RECLAIM)
        self._finish = r.register_script(_FINISH)
        self.streams_key = keys.gen_streams(pool)
        self.room_key = keys.gen_room(pool)
        self.bell = keys.gen_doorbell(pool)
        self._known: list[str] = []  # the pool's streams as last read (scripts declare them as KEYS)

    async def _declared(self, script, fixed: list[str], args: list, *, client=None):
        """Run a pool script with the pool's streams declared; re-read them while it says RETRY."""
        for _ in range(_RETRIES):
            result = await script(keys=fixed + [s for s in self._known if s not in fixed], args=args,
                                  client=client)
            if result not in ("RETRY", ["RETRY"]):
                return result
            self._known = sorted(await self.r.smembers(self.streams_key))
        raise RuntimeError(f"the streams of pool {self.pool!r} kept changing during {_RETRIES} tries")

    async def enqueue(self, req: GenRequest, *, cost: int, max_depth: int, tenant_max: int,
                      relay_lease_s: float = 10.0, preferred: str = "") -> Entry:
        """`preferred`: the replica to leave the request to for the pick's grace (prefix routing)."""
        if req.priority not in PRIORITIES:
            raise ValueError(f"unknown priority {req.priority!r}")
        sid = keys.request_scope(req.tenant, req.request_id)
        stream = keys.gen_stream(self.pool, req.priority, req.tenant)
        claim, lease = keys.request_claim(sid), keys.relay_lease(sid)
        # Two hash slots, two atomic steps: the request's id (and relay lease), then the pool's queue.
        # A short claim first: if the enqueue fails and so does its release (the primary died), the
        # id frees itself soon; _replicated extends it to RESPONSE_TTL_S once the entry is acknowledged.
        pending_s = _PENDING_CLAIM_S + math.ceil(redis_conn.durability(self.r)[1] / 1000)
        if not await self._claim(keys=[claim, lease], args=[pending_s, lease_seconds(relay_lease_s)]):
            raise DuplicateRequest(req.request_id)
        try:
            result = await self._declared(
                self._enqueue, [self.streams_key, keys.gen_tenant_ring(self.pool, req.priority), stream, self.bell],
                [req.to_json(), max_depth, tenant_max, keys.tenant_part(req.tenant), cost, req.model,
                 keys.gen_stream_tenant_suffix(req.tenant), GROUP, sid, preferred])
        except BaseException:
            await self._release(claim, lease)
            raise
        if result in ("FULL", "TENANT_FULL"):
            await self._release(claim, lease)
            raise QueueFull("pool" if result == "FULL" else "tenant")
        entry = Entry(stream, result)
        await self._replicated(entry, claim, lease)
        return entry

    async def _release(self, claim: str, lease: str) -> None:
        await self.r.delete(claim, lease)

    async def _replicated(self, entry: Entry, claim: str, lease: str) -> None:
        """With a WAIT policy (redis_conn.durability), return only once the replicas asked for
        hold the entry; else withdraw it and raise NotReplicated (the id is free to retry)."""
        replicas, timeout_ms = redis_conn.durability(self.r)
        value = f"{entry.stream}\t{entry.entry_id}"
        if replicas <= 0:
            await self.r.set(claim, value, ex=keys.RESPONSE_TTL_S)
            return
        acked = await redis_conn.set_and_wait(self.r, claim, value, keys.RESPONSE_TTL_S, replicas, timeout_ms)
        if redis_conn.is_cluster(self.r):  # the queue's slot may live on another primary
            acked = min(acked, await redis_conn.set_and_wait(self.r, keys.gen_acked(self.pool), entry.entry_id,
                                                             keys.RESPONSE_TTL_S, replicas, timeout_ms))
        if acked >= replicas:
            return
        await self.withdraw(entry)
        await self._release(claim, lease)
        raise NotReplicated(f"the request reached {acked} of {replicas} Redis replicas within {timeout_ms} ms")

    async def pick(self, consumer: str, free_kv_bytes: int, kv_budget_bytes: int, kv_bytes_per_token: dict[str, int],
                   running: dict[str, int] | None = None, fair_slots: bool = False, slots: int = 1,
                   headroom_s: float = 0.0, prefix_grace_s: float = 0.0) -> Picked | Held | str | None:
        """Take the next request for `consumer` among those for the models in `kv_bytes_per_token`:
        a Picked, "WAIT" (the next one does not fit the free KV budget) or None (nothing to take).
        With `fair_slots`, while more than one tenant has work waiting, a tenant that runs its
        share of `slots` (`running`: tenant key part -> requests this replica runs) is passed
        over, unless every waiting tenant is at its share; and while another tenant has sent the pool
        work in the last `headroom_s` seconds, a tenant that runs everything here may not take
        the last free slot. A request the gateway preferred for another replica with free slots
        (prefix routing) is left to it for `prefix_grace_s` after its enqueue: Held says how long.
        Every pick reports this replica's free slots after it (the room hash)."""
        if not kv_bytes_per_token:
            return None
        args: list = [GROUP, consumer, int(free_kv_bytes), json.dumps(kv_bytes_per_token), int(kv_budget_bytes),
                      "1" if fair_slots else "0", int(slots), json.dumps(running or {}), int(headroom_s * 1000),
                      int(prefix_grace_s * 1000), ROOM_TTL_MS]
        rings = [keys.gen_tenant_ring(self.pool, priority) for priority in PRIORITIES]
        for ring, priority in zip(rings, PRIORITIES):
            args += [ring, keys.gen_stream(self.pool, priority, "")]
        result = await self._declared(self._pick, [self.streams_key, self.room_key, *rings], args)
        if not result:
            return None
        if result[0] == "WAIT":
            return "WAIT"
        if result[0] == "HOLD":
            return Held(int(result[1]))
        return Picked(Entry(result[0], result[1]), result[2], result[3], result[4], result[5] if len(result) > 5 else "")

    async def report_room(self, consumer: str, free_slots: int) -> None:
        """Tell the pool's replicas how many slots `consumer` has free (a full replica says 0, so a
        request preferred for it is not left waiting for the grace)."""
        now = await redis_now_ms(self.r, self.room_key)
        await self.r.hset(self.room_key, consumer, f"{int(free_slots)} {now + ROOM_TTL_MS}")

    async def reclaim(self, stream: str, consumer: str, dead: str, free_slots: int, free_kv_bytes: int,
                      kv_budget_bytes: int, kv_bytes_per_token: dict[str, int]) -> list[Picked]:
        """Take over what the replica `dead` (no liveness key) holds in `stream`, admitted as by `pick`."""
        if free_slots <= 0 or not kv_bytes_per_token:
            return []
        if await self.r.exists(keys.replica_alive(dead)):  # another slot: checked here, not in the script
            return []
        flat = await self._reclaim(
            keys=[stream],
            args=[GROUP, consumer, dead, RECLAIM_MIN_IDLE_MS, int(free_slots), int(free_kv_bytes),
                  json.dumps(kv_bytes_per_token), int(kv_budget_bytes)])
        tenant = keys.gen_stream_tenant(stream)
        return [Picked(Entry(stream, flat[i]), flat[i + 1], flat[i + 2], tenant) for i in range(0, len(flat), 3)]

    async def finish(self, entry: Entry, consumer: str) -> bool:
        """Acknowledge and remove the entry if it is pending under `consumer`; False if another
        replica took it over (or it is gone)."""
        try:
            return bool(await self._finish(keys=[entry.stream], args=[GROUP, consumer, entry.entry_id]))
        except ResponseError as exc:
            if is_lost_group(exc):
                return False
            raise

    async def withdraw(self, entry: Entry) -> None:
        """Remove a request that no replica has taken yet."""
        await self.r.xdel(entry.stream, entry.entry_id)

    async def streams(self) -> list[str]:
        return sorted(await self.r.smembers(self.streams_key))

    async def consumers(self, stream: str) -> dict[str, int]:
        """Consumer name -> entries pending under it ({} when the stream or its group is gone)."""
        try:
            summary = await self.r.xpending(stream, GROUP)
            infos = await self.r.xinfo_consumers(stream, GROUP)
        except ResponseError:
            return {}
        out = {c["name"]: int(c["pending"]) for c in summary.get("consumers") or []}
        for info in infos:
            out.setdefault(info["name"], 0)
        return out

    async def forget_consumer(self, stream: str, name: str) -> None:
        await self.r.xgroup_delconsumer(stream, GROUP, name)

    async def pending_of(self, consumer: str, count: int) -> list[Picked]:
        """The entries pending under `consumer` (an earlier process with the same name), with their
        fields; entries deleted meanwhile come back with an empty request."""
        out = []
        for stream in await self.streams():
            try:
                pending = await self.r.xpending_range(stream, GROUP, min="-", max="+", count=count,
                                                      consumername=consumer)
            except ResponseError:
                continue
            for p in pending:
                found = await self.r.xrange(stream, p["message_id"], p["message_id"], count=1)
                fields = found[0][1] if found else {}
                out.append(Picked(Entry(stream, p["message_id"]), fields.get("req", ""), fields.get("sid", ""),
                                  keys.gen_stream_tenant(stream)))
        return out

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


def lease_seconds(lease_s: float) -> int:
    return max(1, math.ceil(lease_s))


class Requests:
    """One request's keys, by its scoped id: claim, owner, relay lease, cancel flag, responses."""

    def __init__(self, r: aioredis.Redis):
        self.r = r
        self._cancel = r.register_script(_CANCEL)
        self._write = r.register_script(_WRITE)

    async def entry(self, sid: str) -> Entry | None:
        """The queue entry of a request enqueued in the last RESPONSE_TTL_S seconds."""
        stream, tab, entry_id = (await self.r.get(keys.request_claim(sid)) or "").partition("\t")
        return Entry(stream, entry_id) if tab and entry_id else None

    async def relayed(self, sid: str) -> bool:
        return bool(await self.r.exists(keys.relay_lease(sid)))

    async def cancel(self, sid: str) -> bool:
        """Flag the request to stop if it is in flight (queued or running); True if it is."""
        claim = await self.r.get(keys.request_claim(sid)) or ""
        stream, tab, entry_id = claim.partition("\t")
        if not tab or not entry_id or not await self.queued(Entry(stream, entry_id)):
            return False
        return bool(await self._cancel(keys=[keys.request_claim(sid), keys.cancel_flag(sid)],
                                       args=[keys.CANCEL_TTL_S, claim]))

    async def renew_relay(self, sid: str, lease_s: float) -> None:
        await self.r.set(keys.relay_lease(sid), "1", ex=lease_seconds(lease_s))

    async def read(self, sid: str, after: str, block_ms: int) -> list[tuple[str, Chunk]]:
        resp = await self.r.xread({keys.response_stream(sid): after}, block=block_ms, count=256)
        return [(cursor, Chunk.from_fields(fields)) for _s, entries in resp or [] for cursor, fields in entries]

    async def has_after(self, sid: str, after: str) -> bool:
        return bool(await self.r.xread({keys.response_stream(sid): after}, count=1))

    async def relay_ended(self, sid: str) -> None:
        await self.r.delete(keys.response_stream(sid), keys.relay_lease(sid))

    async def expire_responses(self, sid: str, ttl_s: int = 60) -> None:
        await self.r.expire(keys.response_stream(sid), ttl_s)

    async def consumer_of(self, entry: Entry) -> str:
        """The replica that took the queue entry, or "" while it waits (or if it is lost)."""
        try:
            pending = await self.r.xpending_range(entry.stream, GROUP, min=entry.entry_id, max=entry.entry_id, count=1)
        except ResponseError as exc:
            if not is_lost_group(exc):
                raise
            return ""
        return pending[0]["consumer"] if pending else ""

    async def queued(self, entry: Entry) -> bool:
        """The entry is still in its stream (waiting or running)."""
        return bool(await self.r.xrange(entry.stream, entry.entry_id, entry.entry_id, count=1))

    async def take_ownership(self, sid: str, consumer: str) -> bool:
        """Make `consumer` the stream's only writer; True if the request was cancelled meanwhile."""
        return (await self.take_ownership_at(sid, consumer, None))[0]

    async def take_ownership_at(self, sid: str, consumer: str, entry: Entry | None) -> tuple[bool, int]:
        """take_ownership, and Redis's clock (ms) as `entry`'s stream sees it (0 without an entry):
        one round trip on a single server; on Redis Cluster the clock is asked of the queue's primary."""
        cluster = redis_conn.is_cluster(self.r)
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.set(keys.stream_owner(sid), consumer, ex=keys.RESPONSE_TTL_S)
            pipe.exists(keys.cancel_flag(sid))
            if entry is not None and not cluster:
                pipe.time()
            out = await pipe.execute()
        if entry is None:
            return bool(out[1]), 0
        if cluster:
            return bool(out[1]), await redis_now_ms(self.r, entry.stream)
        sec, usec = out[2]
        return bool(out[1]), int(sec) * 1000 + int(usec) // 1000

    async def write(self, sid: str, consumer: str, chunk: Chunk) -> str:
        """Append a chunk to the response stream if `consumer` still owns it.

        Returns "" to go on, or why to stop (WRITE_OUTCOMES): the client cancelled; another
        replica took the request over and nothing was written; or no gateway relays the stream
        any more, and it was closed with a retryable error instead of the chunk."""
        result = await self._write(
            keys=[keys.response_stream(sid), keys.stream_owner(sid), keys.cancel_flag(sid), keys.relay_lease(sid)],
            args=[consumer, chunk.to_fields()["c"], keys.RESPONSE_TTL_S, _ABANDONED],
        )
        return WRITE_OUTCOMES[int(result)]

    async def written(self, sid: str) -> tuple[list[int], str, bool]:
        """(token ids, build id, ended) of what was written so far (to continue a request)."""
        ids, build_id, ended = [], "", False
        for _id, fields in await self.r.xrange(keys.response_stream(sid)):
            chunk = Chunk.from_fields(fields)
            ids.extend(chunk.token_ids)
            build_id = chunk.build_id or build_id
            ended = ended or chunk.kind in ("end", "error")
        return ids, build_id, ended
