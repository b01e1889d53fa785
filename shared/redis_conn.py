"""Redis clients for the services (asyncio): one factory for the three modes, a start-up check
that names the target, and WAIT on the connection that wrote (acknowledged writes reach replicas).

Modes (settings in shared.config, group REDIS): a single server (`redis_url`, `rediss://` for TLS),
Redis Cluster (`redis_cluster_nodes`), or a primary found through Sentinel (`redis_sentinels` and
`redis_sentinel_master`). Every mode takes the ACL user/password and the TLS files.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException
from redis.exceptions import TimeoutError as RedisTimeoutError

_DURABILITY = "_llamaship_wait"  # (replicas, timeout ms) a client's acknowledged enqueues wait for
_NODE_CLIENTS = "_llamaship_node_clients"


def _retry_kwargs() -> dict[str, Any]:
    # Blocking reads (XREAD BLOCK, BLPOP) wait up to seconds: no socket read timeout. A command on a
    # pooled connection that a restarted Redis closed is retried on a fresh one.
    return dict(health_check_interval=30, socket_timeout=None, socket_connect_timeout=5,
                retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 4),
                retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionError])


def host_ports(value: str) -> list[tuple[str, int]]:
    """"host:port,host:port" (IPv6 as [addr]:port) -> [(host, port)]; ValueError when malformed."""
    out = []
    for item in filter(None, (part.strip() for part in value.split(","))):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{item!r} is not host:port")
        out.append((host.strip("[]"), int(port)))
    return out


def _tls_kwargs(settings: Any) -> dict[str, Any]:
    """ssl_* keyword arguments (empty when TLS is off)."""
    if not (settings.redis_tls or settings.redis_url.startswith("rediss://")):
        return {}
    kw: dict[str, Any] = {"ssl": True, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    if settings.redis_tls_ca_file:
        kw["ssl_ca_certs"] = settings.redis_tls_ca_file
    if settings.redis_tls_cert_file:
        kw["ssl_certfile"] = settings.redis_tls_cert_file
        kw["ssl_keyfile"] = settings.redis_tls_key_file or None
    return kw


def _auth_kwargs(settings: Any) -> dict[str, Any]:
    kw = {}
    if settings.redis_username:
        kw["username"] = settings.redis_username
    if settings.redis_password:
        kw["password"] = settings.redis_password
    return kw


def describe(settings: Any) -> str:
    """The Redis a service talks to, for logs and errors (no secrets)."""
    if settings.redis_cluster_nodes:
        return f"Redis Cluster {settings.redis_cluster_nodes}"
    if settings.redis_sentinels:
        return f"Redis primary {settings.redis_sentinel_master!r} via Sentinel {settings.redis_sentinels}"
    return settings.redis_url


def connect(settings: Any) -> aioredis.Redis | RedisCluster:
    """The client for the configured mode (settings: the REDIS group of shared.config)."""
    common = dict(decode_responses=True, **_auth_kwargs(settings), **_tls_kwargs(settings))
    if settings.redis_cluster_nodes:
        nodes = [ClusterNode(h, p) for h, p in host_ports(settings.redis_cluster_nodes)]
        kw = _retry_kwargs()
        kw.pop("retry_on_error")
        kw.pop("health_check_interval")
        r: Any = RedisCluster(startup_nodes=nodes, **common, **kw)
    elif settings.redis_sentinels:
        sentinel = Sentinel(host_ports(settings.redis_sentinels),
                            sentinel_kwargs={"decode_responses": True, "socket_connect_timeout": 5,
                                             **_tls_kwargs(settings)},
                            **common, **_retry_kwargs())
        r = sentinel.master_for(settings.redis_sentinel_master, decode_responses=True)
    else:
        tls = _tls_kwargs(settings)
        tls.pop("ssl", None)  # the URL's scheme chooses TLS
        r = client(settings.redis_url, **_auth_kwargs(settings), **tls)
    set_durability(r, settings.redis_wait_replicas, settings.redis_wait_timeout_ms)
    return r


def client(url: str, **kwargs: Any) -> aioredis.Redis:
    """A single server by URL (tests, tools); services use connect(settings)."""
    return aioredis.Redis.from_url(url, decode_responses=True, **_retry_kwargs(), **kwargs)


def set_durability(r: Any, replicas: int, timeout_ms: int) -> None:
    """Acknowledge enqueues through `r` only once `replicas` replicas hold them (0: at once)."""
    setattr(r, _DURABILITY, (int(replicas), int(timeout_ms)))


def durability(r: Any) -> tuple[int, int]:
    return getattr(r, _DURABILITY, (0, 0))


def is_cluster(r: Any) -> bool:
    return isinstance(r, RedisCluster)


async def _node_client(r: RedisCluster, key: str) -> aioredis.Redis:
    """A plain client to the primary serving `key`'s slot (WAIT counts one connection's writes)."""
    node = r.get_node_from_key(key)
    cache: dict = getattr(r, _NODE_CLIENTS, None) or {}
    setattr(r, _NODE_CLIENTS, cache)
    if node.name not in cache:
        kw = {k: v for k, v in node.connection_kwargs.items() if k not in ("host", "port")}
        pool = aioredis.ConnectionPool(host=node.host, port=node.port, **kw)
        cache[node.name] = aioredis.Redis(connection_pool=pool)
    return cache[node.name]


async def set_and_wait(r: Any, key: str, value: str, ex: int, replicas: int, timeout_ms: int) -> int:
    """SET key value EX ex, then WAIT on the same connection: the replicas (of the primary serving
    `key`) that acknowledged it and every earlier write to that primary."""
    target = await _node_client(r, key) if is_cluster(r) else r
    async with target.pipeline(transaction=False) as pipe:
        pipe.set(key, value, ex=ex)
        pipe.execute_command("WAIT", replicas, timeout_ms)
        _, acked = await pipe.execute()
    return int(acked)


async def close(r: Any) -> None:
    for node_client in (getattr(r, _NODE_CLIENTS, None) or {}).values():
        await node_client.aclose()
    await r.aclose()


async def wait_ready(r: Any, url: str, timeout_s: float = 15.0) -> None:
    """Ping until Redis answers; raise a clear error after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.05
    while True:
        try:
            await r.ping()
            return
        except (RedisConnectionError, RedisClusterException, OSError) as exc:
            if loop.time() >= deadline:
                raise RuntimeError(f"cannot reach Redis at {url}: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
