"""The Redis-backed core flows on a real 3-master Redis Cluster: the request protocol, the model
registry and catalog, and the compile job store. The existing unit tests of those modules run here
again with their client pointed at the cluster, so every Lua script, transaction and multi-key
command they drive must keep its keys in one hash slot (Redis Cluster refuses anything else)."""

from __future__ import annotations

import asyncio
import inspect

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from shared import config, redis_conn
from shared import redis_keys as keys
from shared.request_protocol import PoolQueue, Requests, redis_now_ms
from tests import (test_unit_admission, test_unit_compile_worker, test_unit_jobs_queue,
                   test_unit_request_protocol)
from tests.redis_servers import Cluster, require_binaries

CLUSTER_URL = "redis://cluster.invalid/0"  # what the borrowed tests are given: connects to the cluster

MODULES = (test_unit_request_protocol, test_unit_jobs_queue, test_unit_admission, test_unit_compile_worker)
BORROWED = [getattr(m, name) for m in MODULES for name in dir(m)
            if name.startswith("test_") and list(inspect.signature(getattr(m, name)).parameters) == ["redis_url"]]


def cluster_settings(nodes: str, **kw) -> config.Settings:
    return config.resolve(config.REDIS, {"redis_cluster_nodes": nodes, **kw}, env={})


@pytest.fixture(scope="module")
def cluster():
    require_binaries()
    with Cluster() as c:
        yield c


@pytest.fixture
def cluster_url(cluster, monkeypatch):
    real = redis_conn.client

    def client(url, **kw):
        return redis_conn.connect(cluster_settings(cluster.nodes)) if url == CLUSTER_URL else real(url, **kw)

    monkeypatch.setattr(redis_conn, "client", client)
    return CLUSTER_URL


def test_the_factory_builds_a_cluster_client_and_slots_spread_over_masters(cluster):
    async def body():
        r = redis_conn.connect(cluster_settings(cluster.nodes))
        assert isinstance(r, RedisCluster)
        await redis_conn.wait_ready(r, cluster.nodes)
        assert len({n.name for n in r.get_primaries()}) == 3
        with pytest.raises((RedisError, RedisClusterException)):  # the cluster refuses what the borrowed tests must never do
            await r.eval("return redis.call('GET', KEYS[2])", 2, keys.gen_streams("cpu"), keys.ALIASES)
        # the units of atomicity hash to different slots, each one whole
        slots = {r.keyslot(k) for k in (keys.gen_streams("cpu"), keys.gen_streams("cuda"), keys.ALIASES,
                                        keys.REPLICAS, keys.COMPILE_QUEUE, keys.request_claim("t:1"))}
        assert len(slots) == 6
        assert r.keyslot(keys.gen_stream("cpu", "batch", "x")) == r.keyslot(keys.gen_doorbell("cpu"))
        # the clock a queue entry is compared with is the one of the primary that stamped it
        stream = keys.gen_stream("cpu", "batch", "x")
        stamped = int((await r.xadd(stream, {"f": "v"})).split("-")[0])
        assert 0 <= await redis_now_ms(r, stream) - stamped < 5000
        assert r.keyslot(keys.ANNOUNCE) == r.keyslot(keys.MODEL_ACCESS)
        assert r.keyslot(keys.replica_alive("a")) == r.keyslot(keys.REPLICAS)
        assert r.keyslot(keys.job_events("j")) == r.keyslot(keys.JOBS_INDEX)
        assert len({r.keyslot(f(sid)) for sid in ["t:x}y"] for f in (
            keys.request_claim, keys.response_stream, keys.cancel_flag, keys.stream_owner, keys.relay_lease)}) == 1
        await redis_conn.close(r)

    asyncio.run(body())


def test_an_enqueue_waited_for_on_a_cluster_without_replicas_is_withdrawn(cluster):
    """WAIT runs on the connection that wrote: with no replica to acknowledge, the enqueue is
    withdrawn and its id is free again."""
    from shared.generation import GenRequest
    from shared.request_protocol import NotReplicated

    async def body():
        r = redis_conn.connect(cluster_settings(cluster.nodes, redis_wait_replicas=1, redis_wait_timeout_ms=50))
        await r.flushdb()
        q = PoolQueue(r, "cpu")
        req = GenRequest("w1", "m", "p", 4)
        with pytest.raises(NotReplicated):
            await q.enqueue(req, cost=10, max_depth=10, tenant_max=10)
        assert await q.depth_by_priority() == {"interactive": 0, "batch": 0}
        assert await Requests(r).entry(keys.request_scope("default", "w1")) is None
        redis_conn.set_durability(r, 0, 0)
        assert (await q.enqueue(req, cost=10, max_depth=10, tenant_max=10)).entry_id
        await redis_conn.close(r)

    asyncio.run(body())


@pytest.mark.parametrize("test", BORROWED, ids=lambda t: f"{t.__module__.rsplit('.', 1)[-1]}::{t.__name__}")
def test_unit_flow_on_the_cluster(test, cluster_url):
    test(redis_url=cluster_url)
