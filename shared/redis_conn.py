"""Redis clients for the services (asyncio), with a start-up check that names the URL."""

from __future__ import annotations

import asyncio

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError


def client(url: str) -> aioredis.Redis:
    # Blocking reads (XREAD BLOCK, BLPOP) wait up to seconds: no socket read timeout. A command on a
    # pooled connection that a restarted Redis closed is retried on a fresh one.
    return aioredis.Redis.from_url(
        url, decode_responses=True, health_check_interval=30, socket_timeout=None, socket_connect_timeout=5,
        retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 4),
        retry_on_error=[RedisConnectionError, RedisTimeoutError, ConnectionError],
    )


async def wait_ready(r: aioredis.Redis, url: str, timeout_s: float = 15.0) -> None:
    """Ping until Redis answers; raise a clear error after timeout_s."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    delay = 0.05
    while True:
        try:
            await r.ping()
            return
        except (RedisConnectionError, OSError) as exc:
            if loop.time() >= deadline:
                raise RuntimeError(f"cannot reach Redis at {url}: {exc}") from None
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)
