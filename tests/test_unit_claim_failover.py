"""An enqueue cut off by a Redis primary's death (issue #12, defect 2): the request id's claim must
not outlive the failover, or a retry with the same id answers ALREADY_EXISTS for RESPONSE_TTL_S."""

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from shared import redis_conn
from shared import redis_keys as keys
from shared import request_protocol
from shared.generation import GenRequest
from shared.request_protocol import DuplicateRequest, PoolQueue


class _PrimaryDiesAfterTheClaim(PoolQueue):
    """The claim is written, then the primary is gone: the enqueue and the release both fail."""

    async def _declared(self, *a, **kw):
        raise RedisConnectionError("primary died")

    async def _release(self, claim: str, lease: str) -> None:
        raise RedisConnectionError("primary died")


def _req(rid="r1"):
    return GenRequest(rid, "m", "p", 4)


def _enqueue(q: PoolQueue, req: GenRequest):
    return q.enqueue(req, cost=8, max_depth=10, tenant_max=10)


def test_an_acknowledged_enqueue_holds_its_id_for_the_response_ttl(redis_url):
    async def body():
        r = redis_conn.client(redis_url)
        await r.flushdb()
        await _enqueue(PoolQueue(r, "cpu"), _req())
        ttl = await r.ttl(keys.request_claim(keys.request_scope("default", "r1")))
        assert ttl > request_protocol._PENDING_CLAIM_S
        assert ttl <= keys.RESPONSE_TTL_S
        with pytest.raises(DuplicateRequest):
            await _enqueue(PoolQueue(r, "cpu"), _req())
    asyncio.run(body())


def test_a_claim_left_by_a_failed_enqueue_frees_the_id_soon(redis_url, monkeypatch):
    monkeypatch.setattr(request_protocol, "_PENDING_CLAIM_S", 1)

    async def body():
        r = redis_conn.client(redis_url)
        await r.flushdb()
        with pytest.raises(RedisConnectionError):
            await _enqueue(_PrimaryDiesAfterTheClaim(r, "cpu"), _req())
        claim = keys.request_claim(keys.request_scope("default", "r1"))
        assert 0 < await r.ttl(claim) <= 1
        await asyncio.sleep(1.5)
        entry = await _enqueue(PoolQueue(r, "cpu"), _req())  # the client's retry with the same id
        assert await request_protocol.Requests(r).queued(entry)
    asyncio.run(body())
