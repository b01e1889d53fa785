"""Background loops that outlive a Redis restart: retried with backoff, never fatal."""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError, TimeoutError as RedisTimeoutError

log = logging.getLogger("llamaship.resilience")
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ConnectionError, OSError)


def is_lost_group(exc: BaseException) -> bool:
    """Redis restarted without persistence: the stream and its consumer group are gone."""
    return isinstance(exc, ResponseError) and "NOGROUP" in str(exc)


async def forever(name: str, loop: Callable[[], Awaitable[None]], *, first_delay_s: float = 0.1,
                  max_delay_s: float = 5.0) -> None:
    """Run `loop` again whenever Redis drops (connection errors, lost consumer groups),
    backing off exponentially; any other error propagates."""
    delay = first_delay_s
    while True:
        try:
            await loop()
            return
        except TRANSIENT as exc:
            log.warning("%s: Redis unreachable (%s); retrying in %.1fs", name, exc, delay)
        except ResponseError as exc:
            if not is_lost_group(exc):
                raise
            log.warning("%s: consumer group lost (Redis restarted empty); recreating in %.1fs", name, delay)
        await asyncio.sleep(delay)
        delay = min(delay * 2, max_delay_s)
