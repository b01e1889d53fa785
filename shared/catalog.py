"""What is published and who serves it: model aliases and replica heartbeats in Redis."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field

import redis.asyncio as aioredis

from shared import redis_keys as keys


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
        return cls(**json.loads(text))


@dataclass
class ReplicaHeartbeat:
    replica_id: str
    pool: str
    address: str
    slots: int
    active: int
    builds: dict[str, str] = field(default_factory=dict)  # model name -> build id served
    ts: float = 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "ReplicaHeartbeat":
        return cls(**json.loads(text))


async def get_alias(r: aioredis.Redis, name: str) -> Alias | None:
    raw = await r.hget(keys.ALIASES, name)
    return Alias.from_json(raw) if raw else None


async def list_aliases(r: aioredis.Redis) -> list[Alias]:
    raw = await r.hgetall(keys.ALIASES)
    return sorted((Alias.from_json(v) for v in raw.values()), key=lambda a: a.name)


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


async def put_heartbeat(r: aioredis.Redis, hb: ReplicaHeartbeat) -> None:
    hb.ts = time.time()
    await r.hset(keys.REPLICAS, hb.replica_id, hb.to_json())


async def remove_heartbeat(r: aioredis.Redis, replica_id: str) -> None:
    await r.hdel(keys.REPLICAS, replica_id)


async def alias_and_replicas(r: aioredis.Redis, name: str, stale_after_s: float) -> tuple[Alias | None, list[ReplicaHeartbeat]]:
    """The alias of `name` and the live replicas, in one round trip."""
    async with r.pipeline(transaction=False) as pipe:
        pipe.hget(keys.ALIASES, name)
        pipe.hgetall(keys.REPLICAS)
        raw_alias, raw_replicas = await pipe.execute()
    return (Alias.from_json(raw_alias) if raw_alias else None), _live(raw_replicas, stale_after_s, None)


def is_live(hb: ReplicaHeartbeat, stale_after_s: float, now: float | None = None) -> bool:
    return (now or time.time()) - hb.ts <= stale_after_s


async def replica_alive(r: aioredis.Redis, replica_id: str, stale_after_s: float) -> bool:
    raw = await r.hget(keys.REPLICAS, replica_id)
    return raw is not None and is_live(ReplicaHeartbeat.from_json(raw), stale_after_s)


async def live_replicas(r: aioredis.Redis, stale_after_s: float, pool: str | None = None) -> list[ReplicaHeartbeat]:
    return _live(await r.hgetall(keys.REPLICAS), stale_after_s, pool)


def _live(raw_replicas: dict[str, str], stale_after_s: float, pool: str | None) -> list[ReplicaHeartbeat]:
    now = time.time()
    out = []
    for raw in raw_replicas.values():
        hb = ReplicaHeartbeat.from_json(raw)
        if is_live(hb, stale_after_s, now) and (pool is None or hb.pool == pool):
            out.append(hb)
    return sorted(out, key=lambda h: h.replica_id)
