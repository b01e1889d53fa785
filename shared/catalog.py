"""What is published and who serves it: model aliases, replica records and replica liveness (TTL keys) in Redis."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from shared import redis_keys as keys
from shared import wire

log = logging.getLogger("llamaship.catalog")


@dataclass(frozen=True)
class Alias:
    name: str
    build_id: str
    pool: str
    recipe: str
    context_length: int
    max_batch: int
    published_at: float

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Alias":
        return wire.from_json(cls, text)


@dataclass
class ReplicaHeartbeat:
    replica_id: str
    pool: str
    address: str
    slots: int
    active: int
    builds: dict[str, str] = field(default_factory=dict)  # model name -> build id served
    ts: float = 0.0  # informational only: liveness is the replica's TTL key, never a clock compare

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ReplicaHeartbeat":
        return wire.from_json(cls, text)


async def get_alias(r: aioredis.Redis, name: str) -> Alias | None:
    raw = await r.hget(keys.ALIASES, name)
    return Alias.from_json(raw) if raw else None


async def list_aliases(r: aioredis.Redis) -> list[Alias]:
    raw = await r.hgetall(keys.ALIASES)
    return sorted(_decoded(Alias, raw.values()), key=lambda a: a.name)


async def publish_alias(r: aioredis.Redis, alias: Alias) -> None:
    """Point the name at the build and announce it, in one transaction."""
    async with r.pipeline(transaction=True) as pipe:
        pipe.hset(keys.ALIASES, alias.name, alias.to_json())
        pipe.xadd(
            keys.ANNOUNCE,
            {"name": alias.name, "build_id": alias.build_id, "pool": alias.pool},
            maxlen=keys.ANNOUNCE_MAXLEN,
            approximate=True,
        )
        await pipe.execute()


async def put_heartbeat(r: aioredis.Redis, hb: ReplicaHeartbeat, alive_s: float) -> None:
    """Record the replica and keep it live for `alive_s` more seconds (Redis expires the key, so
    no host's clock is ever compared with another's)."""
    hb.ts = time.time()
    async with r.pipeline(transaction=True) as pipe:
        pipe.hset(keys.REPLICAS, hb.replica_id, hb.to_json())
        pipe.set(keys.replica_alive(hb.replica_id), "1", px=max(1, int(alive_s * 1000)))
        await pipe.execute()


async def remove_heartbeat(r: aioredis.Redis, replica_id: str) -> None:
    async with r.pipeline(transaction=True) as pipe:
        pipe.hdel(keys.REPLICAS, replica_id)
        pipe.delete(keys.replica_alive(replica_id))
        await pipe.execute()


# KEYS: replicas hash, then the liveness key of each replica in ARGV (same order, one hash slot).
_FORGET_GONE = """
local gone = 0
for i = 1, #ARGV do
  if redis.call('EXISTS', KEYS[i + 1]) == 0 and redis.call('HDEL', KEYS[1], ARGV[i]) == 1 then gone = gone + 1 end
end
return gone
"""


async def forget_gone_replicas(r: aioredis.Redis) -> int:
    """Drop the records of replicas whose liveness key expired (atomically with the check, so a
    replica beating meanwhile is never dropped)."""
    ids = list(await r.hkeys(keys.REPLICAS))  # one registered after this read is left for the next round
    if not ids:
        return 0
    return int(await r.eval(_FORGET_GONE, 1 + len(ids), keys.REPLICAS, *map(keys.replica_alive, ids), *ids))


async def replica_alive(r: aioredis.Redis, replica_id: str) -> bool:
    """Its liveness key has not expired (the replica sets the TTL: no clocks are compared)."""
    return bool(await r.exists(keys.replica_alive(replica_id)))


async def alias_and_replicas(r: aioredis.Redis, name: str) -> tuple[Alias | None, list[ReplicaHeartbeat]]:
    """The alias of `name` and the live replicas."""
    async with r.pipeline(transaction=False) as pipe:
        pipe.hget(keys.ALIASES, name)
        pipe.hgetall(keys.REPLICAS)
        raw_alias, raw_replicas = await pipe.execute()
    return (Alias.from_json(raw_alias) if raw_alias else None), await _live(r, raw_replicas, None)


async def live_replicas(r: aioredis.Redis, pool: str | None = None) -> list[ReplicaHeartbeat]:
    return await _live(r, await r.hgetall(keys.REPLICAS), pool)


async def _live(r: aioredis.Redis, raw_replicas: dict[str, str], pool: str | None) -> list[ReplicaHeartbeat]:
    ids = sorted(raw_replicas)
    alive = await r.mget([keys.replica_alive(i) for i in ids]) if ids else []
    out = [hb for hb in _decoded(ReplicaHeartbeat, (raw_replicas[i] for i, a in zip(ids, alive) if a))
           if pool is None or hb.pool == pool]
    return sorted(out, key=lambda h: h.replica_id)


def _decoded(cls, raws):
    """The records that decode; one that does not (another version's, damaged) is logged and skipped."""
    for raw in raws:
        try:
            yield cls.from_json(raw)
        except wire.WireError as exc:
            log.warning("skipping an unreadable %s record: %s", cls.__name__, exc)
