"""Redis behind Sentinel (a failover mid-load loses no acknowledged enqueue), Redis over TLS with
an ACL user, and the Redis settings' validation; real servers from Debian's redis-server 7."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.asyncio.sentinel import Sentinel
from redis.exceptions import AuthenticationError, ConnectionError as RedisConnectionError, RedisError

from shared import config, redis_conn
from shared import redis_keys as keys
from shared.generation import Chunk, GenRequest
from shared.request_protocol import DuplicateRequest, NotReplicated, PoolQueue, Requests
from tests.redis_servers import SentinelGroup, TlsServer, require_binaries

BUDGET = 1 << 40


def settings(**kw) -> config.Settings:
    return config.resolve(config.REDIS, kw, env={})


@pytest.mark.parametrize("given, message", [
    ({"redis_cluster_nodes": "a:1", "redis_sentinels": "b:2", "redis_sentinel_master": "m"}, "two modes"),
    ({"redis_sentinels": "b:2"}, "go together"),
    ({"redis_cluster_nodes": "a"}, "host:port"),
    ({"redis_tls_cert_file": "c.pem"}, "go together"),
    ({"redis_wait_replicas": "-1"}, ">= 0"),
])
def test_redis_settings_are_checked_at_start_up(given, message):
    with pytest.raises(config.ConfigError, match=message):
        settings(**given)


def test_every_service_and_up_take_the_redis_flags():
    from llamaship.cli import build_parser

    for names in (config.GATEWAY, config.SERVING, config.COMPILER):
        assert set(config.REDIS) <= set(names)
    up = build_parser().parse_args(["up", "--redis-cluster-nodes", "127.0.0.1:7000", "--redis-password", "x"])
    assert up.redis_cluster_nodes == "127.0.0.1:7000" and up.redis_password == "x"


def test_up_starts_no_embedded_redis_when_one_is_given(monkeypatch):
    from llamaship.cli import build_parser
    from llamaship.cli_up import _redis
    from llamaship.stack import Stack, StackConfig

    for name in config.REDIS:
        monkeypatch.delenv(config.SETTINGS[name].env, raising=False)

    def stack(*argv):
        url, given = _redis(build_parser().parse_args(["up", *argv]))
        return Stack(StackConfig(store="s", log_dir="l", redis_url=url, redis_settings=given))

    assert not stack().external_redis
    assert stack("--redis-url", "rediss://r:6380/0").external_redis
    cluster = stack("--redis-cluster-nodes", "a:1,b:2", "--redis-username", "u")
    assert cluster.external_redis and cluster.service_env()["LLAMASHIP_REDIS_USERNAME"] == "u"
    assert "LLAMASHIP_REDIS_URL" not in cluster.service_env()
    monkeypatch.setenv("LLAMASHIP_REDIS_SENTINELS", "s:26379")
    monkeypatch.setenv("LLAMASHIP_REDIS_SENTINEL_MASTER", "m")
    assert stack().external_redis
    with pytest.raises(config.ConfigError):
        stack("--redis-cluster-nodes", "a:1")  # and sentinels from the environment: two modes


async def _enqueue_until_acked(q: PoolQueue, rid: str, deadline: float) -> str:
    """Retry one request id until the enqueue is acknowledged: 'acked', 'duplicate' (an earlier
    try reached Redis; the client is told, nothing is lost silently) or 'gave-up'."""
    while time.time() < deadline:
        try:
            await q.enqueue(GenRequest(rid, "m", "p", 4), cost=8, max_depth=100_000, tenant_max=100_000)
            return "acked"
        except DuplicateRequest:
            return "duplicate"
        except (RedisError, OSError):  # NotReplicated, a dead primary, no primary yet
            await asyncio.sleep(0.1)
    return "gave-up"


def test_a_sentinel_failover_mid_load_loses_no_acknowledged_enqueue():
    require_binaries()

    async def body(group: SentinelGroup):
        s = settings(redis_sentinels=group.sentinels, redis_sentinel_master=SentinelGroup.MASTER,
                     redis_wait_replicas=1, redis_wait_timeout_ms=500)
        r = redis_conn.connect(s)
        await redis_conn.wait_ready(r, redis_conn.describe(s))
        q = PoolQueue(r, "cpu")
        outcomes: dict[str, str] = {}
        killed, back = asyncio.Event(), asyncio.Event()
        deadline = time.time() + 60

        async def fail_over():
            await killed.wait()
            while time.time() < deadline and await asyncio.to_thread(group.master_port) != group.replica:
                await asyncio.sleep(0.2)
            group.server(group.primary, "--replicaof", "127.0.0.1", str(group.replica))  # it returns as a replica
            back.set()

        watcher = asyncio.create_task(fail_over())
        after_back, i = 0, 0
        while time.time() < deadline and after_back < 20:
            rid = f"r{i}"
            i += 1
            outcomes[rid] = await _enqueue_until_acked(q, rid, deadline)
            if i == 50:
                group.kill(group.primary)  # mid-load, with acknowledged requests in the queue
                killed.set()
            elif back.is_set() and outcomes[rid] == "acked":
                after_back += 1
        await watcher
        assert after_back == 20, f"no acknowledged enqueue after the failover: {outcomes}"
        await redis_conn.close(r)

        # every acknowledged request is queued on the new primary, its id claimed
        fresh = redis_conn.connect(s)
        requests = Requests(fresh)
        acked = [rid for rid, o in outcomes.items() if o == "acked"]
        lost = []
        for rid in acked:
            entry = await requests.entry(keys.request_scope("default", rid))
            if entry is None or not await requests.queued(entry):
                lost.append(rid)
        assert not lost, f"{len(lost)} of {len(acked)} acknowledged enqueues lost: {lost[:10]}"
        assert len(acked) >= 60 and "gave-up" not in outcomes.values()
        assert (await PoolQueue(fresh, "cpu").depth_by_priority())["interactive"] == len(acked)
        await redis_conn.close(fresh)

    with SentinelGroup() as group:
        asyncio.run(body(group))


def test_tls_with_an_acl_user_runs_the_request_protocol():
    require_binaries()

    async def body(server: TlsServer):
        client_cert = {"redis_tls_cert_file": str(server.certs["client_cert"]),
                       "redis_tls_key_file": str(server.certs["client_key"])}
        s = settings(redis_url=server.url, redis_username="llamaship", redis_password="s3cret",
                     redis_tls_ca_file=str(server.certs["ca"]), **client_cert)
        r = redis_conn.connect(s)
        await redis_conn.wait_ready(r, s.redis_url, timeout_s=5)
        q, requests = PoolQueue(r, "cpu"), Requests(r)
        entry = await q.enqueue(GenRequest("t1", "m", "p", 4), cost=8, max_depth=10, tenant_max=10)
        picked = await q.pick("replica-1", BUDGET, BUDGET, {"m": 1})
        assert picked.entry == entry
        sid = picked.scoped_id(GenRequest.from_json(picked.request_json))
        assert not await requests.take_ownership(sid, "replica-1")
        assert await requests.write(sid, "replica-1", Chunk("end", token_ids=[1, 2])) == ""
        assert [c.token_ids for _, c in await requests.read(sid, "0-0", 10)] == [[1, 2]]
        assert await q.finish(entry, "replica-1")
        await redis_conn.close(r)

        for wrong in (settings(redis_url=server.url, redis_username="llamaship", redis_password="nope",
                               redis_tls_ca_file=str(server.certs["ca"]), **client_cert),
                      settings(redis_url=server.url, redis_username="intruder", redis_password="s3cret",
                               redis_tls_ca_file=str(server.certs["ca"]), **client_cert)):
            bad = redis_conn.connect(wrong)
            with pytest.raises(AuthenticationError):
                await bad.ping()
            await redis_conn.close(bad)
        for refused in (settings(redis_url=server.url, redis_username="llamaship", redis_password="s3cret",
                                 **client_cert),  # the system CAs: the server's is not among them
                        settings(redis_url=server.url, redis_username="llamaship", redis_password="s3cret",
                                 redis_tls_ca_file=str(server.certs["ca"]))):  # no client certificate
            bad = redis_conn.connect(refused)
            with pytest.raises(RedisConnectionError):
                await bad.ping()
            await redis_conn.close(bad)

    with TlsServer("llamaship", "s3cret") as server:
        asyncio.run(body(server))
