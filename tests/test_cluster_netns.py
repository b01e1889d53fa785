"""Llamaship across hosts: every host a network namespace with its own address (tests/netns.py).

    s3      SeaweedFS (the S3 build store)
    r1..r3  a Redis Cluster: 3 masters with a replica each, two redis-server nodes per host
            (ports 6379 and 6380; each master's replica on another host)
    a       the compiler
    b, c    a cpu replica each, each with its own local build cache
    d, e    a gateway each

Services listen on their host's address and speak mTLS to each other (one test CA; the gateways'
public ports stay plaintext). Enqueues wait for one Redis replica (`--redis-wait-replicas 1`).
The test process reaches every host through the bridge and plays the clients.

1. Compile on a (fp32), published to S3; b and c each fetch it into their own cache (fixture).
2. Two long streams through d and e; the replica serving the first one (b or c: the "victim") is
   cut off the network mid-stream (its link down). The other replica takes its streams over and
   they end token-exact. The link comes back: the victim's next write is refused (it no longer
   owns the stream), and no chunk of the victim's is in the response stream after the takeover.
3. The victim is killed, started again, and serves new requests.
4. The primary of the pool's queue slot is SIGKILLed under load; the cluster fails over, the old
   primary comes back as a replica. Every request should complete token-exact: clients retry a
   request the gateway refused (with the same request id) and resume a stream whose relay broke.
   May still fail at times (see the xfail reason).
5. The fault table: streams held, faults injected, requests lost.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import grpc
import pytest

from shared import redis_keys as keys
from shared.generation import Chunk
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from tests.conftest import ROOT
from tests.netns import Network, NetnsUnavailable, RedisClusterOnHosts, start_seaweedfs

pytestmark = pytest.mark.integration
HOSTS = ["s3", "r1", "r2", "r3", "a", "b", "c", "d", "e"]
REPLICAS = {"b": "cpu-b", "c": "cpu-c"}
PROMPTS = ["def main(argv):\n    ", "class Parser:\n    def __init__(self"]
STREAM_S = 10.0  # how long the streams cut mid-way should run: their length follows the decode speed
SHORT = 64  # tokens of the requests under the Redis failover
REQUEST_S = 120.0  # the most one request (with its retries and resumes) may take


@dataclass
class Outcome:
    ids: list[int] = field(default_factory=list)
    finished: bool = False
    refused: int = 0  # attempts the gateway refused before acknowledging (retried with the same id)
    resumed: int = 0  # streams whose relay broke, resumed from their cursor through the other gateway
    error: str = ""


class Tail(threading.Thread):
    """Every chunk written to one request's response stream, with the replica that wrote it."""

    def __init__(self, nodes: str, request_id: str, timeout_s: float = 2 * REQUEST_S):
        super().__init__(daemon=True)
        from redis.cluster import ClusterNode, RedisCluster

        self.r = RedisCluster(startup_nodes=[ClusterNode(*n.split(":")) for n in nodes.split(",")],
                              decode_responses=True, socket_timeout=5)
        self.key = keys.response_stream(keys.request_scope("default", request_id))
        self.deadline = time.monotonic() + timeout_s
        self.writers: list[str] = []  # replica id of every tokens/end chunk, in stream order
        self.start()

    def run(self) -> None:
        last = "0-0"
        while time.monotonic() < self.deadline:
            try:
                got = self.r.xread({self.key: last}, block=500, count=200)
            except Exception:  # noqa: BLE001 - a failover or a deleted stream: read again
                time.sleep(0.2)
                continue
            for _stream, entries in got or []:
                for cursor, fields in entries:
                    last = cursor
                    chunk = Chunk.from_fields(fields)
                    self.writers.append(chunk.replica_id)
                    if chunk.kind in ("end", "error"):
                        return

    def wait_writer(self, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        while not self.writers:
            assert time.monotonic() < deadline, f"no chunk on {self.key} within {timeout_s}s"
            time.sleep(0.05)
        return self.writers[0]


def request(stubs, first: int, request_id: str, prompt: str, max_tokens: int, budget_s: float = REQUEST_S) -> Outcome:
    """Generate until the stream ends: an attempt the gateway refuses (UNAVAILABLE before any chunk)
    is sent again with the same request id (ALREADY_EXISTS: it did land, so it is resumed); a stream
    cut after chunks is resumed from its cursor through the other gateway."""
    out, cursor, gw = Outcome(), "", first
    deadline = time.monotonic() + budget_s
    while time.monotonic() < deadline:
        stub = stubs[gw % len(stubs)]
        try:
            if cursor:
                call = stub.Generate(gateway_pb2.GenerateRequest(request_id=request_id, resume_cursor=cursor),
                                     timeout=max(1.0, deadline - time.monotonic()))
            else:
                call = stub.Generate(gateway_pb2.GenerateRequest(model="demo", prompt=prompt, max_tokens=max_tokens,
                                                                 request_id=request_id),
                                     timeout=max(1.0, deadline - time.monotonic()))
            for chunk in call:
                out.ids.extend(chunk.token_ids)
                cursor = chunk.cursor or cursor
                if chunk.finish_reason:
                    out.finished = True
                    return out
            out.error = "the stream ended without a finish reason"
            return out
        except grpc.RpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE and cursor:
                out.resumed += 1
            elif code == grpc.StatusCode.UNAVAILABLE:
                out.refused += 1
            elif code == grpc.StatusCode.ALREADY_EXISTS and not cursor:
                cursor = "0-0"  # acknowledged earlier: resume it from the start
            else:
                out.error = f"{code.name}: {exc.details()}"
                return out
            gw += 1
            time.sleep(0.3)
    out.error = out.error or "out of time"
    return out


def in_threads(jobs: list, timeout_s: float) -> list[Outcome]:
    results: list[Outcome | None] = [None] * len(jobs)

    def run(i, fn, args):
        try:
            results[i] = fn(*args)
        except Exception as exc:  # noqa: BLE001 - reported with the outcome
            results[i] = Outcome(error=f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=run, args=(i, fn, args), daemon=True) for i, (fn, args) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout_s)
    return [r or Outcome(error="did not finish in time") for r in results]


def wait_for(predicate, what: str, timeout_s: float, step_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out after {timeout_s}s waiting for {what}"
        time.sleep(step_s)


@dataclass
class Hosts:
    net: Network
    cluster: RedisClusterOnHosts
    stubs: list
    gateways: list[str]
    build_id: str
    refs: list[list[int]]  # each prompt's greedy tokens, alone
    long: int  # tokens of the streams cut mid-way
    start_replica: object
    table: dict[str, int]
    victim: str = ""  # the host cut off in the first test, restarted in the second


@contextlib.contextmanager
def logs_on_failure(net: Network):
    try:
        yield
    except BaseException:
        print(net.logs(), file=sys.stderr)
        raise


@pytest.fixture(scope="module")
def hosts(tmp_path_factory, demo_model):
    from tests.redis_servers import require_binaries

    require_binaries()
    tmp = tmp_path_factory.mktemp("netns")
    net = Network(HOSTS, tmp / "logs")
    try:
        net.start()
    except NetnsUnavailable as exc:
        pytest.skip(str(exc))
    channels: list[grpc.Channel] = []
    try:
        with logs_on_failure(net):
            yield _start(net, tmp, demo_model, channels)
    finally:
        for ch in channels:
            ch.close()
        net.close()


def _start(net: Network, tmp, demo_model, channels: list) -> Hosts:
    import boto3

    from llamaship.client import GatewayClient
    from llamaship.internal_certs import write_set

    aws = start_seaweedfs(net, "s3", tmp / "seaweedfs")
    cluster = RedisClusterOnHosts(net, ["r1", "r2", "r3"], tmp / "redis").start()
    bucket = f"llamaship-{uuid.uuid4().hex[:8]}"
    boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=aws["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=aws["AWS_SECRET_ACCESS_KEY"],
                 region_name=aws["AWS_REGION"]).create_bucket(Bucket=bucket)
    tls = write_set(tmp / "internal-tls", [net.addr[h] for h in "abcde"])
    common = {**aws, "LLAMASHIP_STORE": f"s3://{bucket}/llamaship",
              "LLAMASHIP_REDIS_CLUSTER_NODES": cluster.nodes, "LLAMASHIP_REDIS_WAIT_REPLICAS": "1",
              "LLAMASHIP_INTERNAL_TLS_CA": str(tls["ca"]), "LLAMASHIP_INTERNAL_TLS_CERT": str(tls["cert"]),
              "LLAMASHIP_INTERNAL_TLS_KEY": str(tls["key"])}
    py = sys.executable

    def env(host: str, **extra: str) -> dict[str, str]:
        return {**common, "LLAMASHIP_HOST": net.addr[host], "LLAMASHIP_STORE_CACHE_DIR": str(tmp / "cache" / host),
                **extra}

    def start_replica(host: str) -> None:
        net.spawn(host, f"serving-{host}", [py, "-m", "serving_service", "--port", "50053", "--pool", "cpu",
                                            "--slots", "2", "--replica-id", REPLICAS[host]],
                  env(host, LLAMASHIP_HEARTBEAT_S="0.5", LLAMASHIP_REPLICA_STALE_S="2.5"), cwd=ROOT)

    net.spawn("a", "compiler", [py, "-m", "compiler_service", "--port", "50052"], env("a"), cwd=ROOT)
    for host in "bc":
        start_replica(host)
    for host in "de":
        net.spawn(host, f"gateway-{host}", [py, "-m", "gateway", "--port", "50051",
                                            "--compiler-address", f"{net.addr['a']}:50052"],
                  env(host, LLAMASHIP_QUEUE_TIMEOUT_S="30", LLAMASHIP_FAILOVER_TIMEOUT_S="20"), cwd=ROOT)
    net.wait_ready(["compiler", "serving-b", "serving-c", "gateway-d", "gateway-e"], timeout_s=120)
    gateways = [f"{net.addr[h]}:50051" for h in "de"]
    channels.extend(grpc.insecure_channel(a) for a in gateways)
    stubs = [gateway_pb2_grpc.GatewayStub(ch) for ch in channels]

    # compile on a (through d): published to S3, fetched by b and c into their own caches
    with GatewayClient(gateways[0]) as client:
        job = client.compile(str(demo_model), "demo", "fp32")
        assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
        wait_for(serving(client, job.build_id, set(REPLICAS.values())), "both replicas to serve the build", 60)
    for host in "bc":
        assert (tmp / "cache" / host / "builds" / job.build_id / "model.onnx").is_file()
    # the decode speed here (shared machines vary several-fold) sets the long streams' length
    t0 = time.monotonic()
    probe = request(stubs, 0, uuid.uuid4().hex, PROMPTS[0], 2 * SHORT)
    assert probe.finished, probe.error
    long = int(min(3000, max(300, len(probe.ids) / (time.monotonic() - t0) * STREAM_S)))
    refs = [o.ids for o in in_threads([(request, (stubs, i, uuid.uuid4().hex, p, long))
                                       for i, p in enumerate(PROMPTS)], REQUEST_S)]
    assert all(len(r) > 2 * SHORT for r in refs), [len(r) for r in refs]
    table = {"requests sent": 0, "streams held": 0, "faults injected": 0, "refused at the door, retried": 0,
             "streams resumed": 0, "requests lost": 0}
    return Hosts(net, cluster, stubs, gateways, job.build_id, refs, long, start_replica, table)


def serving(client, build_id: str, replica_ids: set[str]):
    def check() -> bool:
        [m] = [m for m in client.models() if m.name == "demo"]
        return replica_ids <= {r.replica_id for r in m.replicas if r.build_id == build_id}
    return check


def account(table: dict[str, int], outcomes: list[Outcome], expected: list[list[int]], lost_key: str) -> list:
    """Count the outcomes into the fault table; the requests not completed token-exact."""
    problems = []
    for got, want in zip(outcomes, expected):
        table["requests sent"] += 1
        table["refused at the door, retried"] += got.refused
        table["streams resumed"] += got.resumed
        if not got.finished or got.ids != want:
            table[lost_key] = table.get(lost_key, 0) + 1
            problems.append((got.error, f"{len(got.ids)} of {len(want)} tokens", "a prefix" if
                             got.ids == want[:len(got.ids)] else "different tokens"))
    return problems


def test_a_stream_continues_token_exact_when_its_replica_is_cut_off(hosts):
    """Two long streams through d and e; the replica serving the first is cut off the network."""
    net, table = hosts.net, hosts.table
    with logs_on_failure(net):
        rids = [uuid.uuid4().hex for _ in PROMPTS]
        tails = [Tail(hosts.cluster.nodes, rid) for rid in rids]
        results: list[Outcome] = []
        streaming = threading.Thread(target=lambda: results.extend(in_threads(
            [(request, (hosts.stubs, i, rid, p, hosts.long)) for i, (rid, p) in enumerate(zip(rids, PROMPTS))],
            REQUEST_S)))
        streaming.start()
        victim_id = tails[0].wait_writer(30)
        tails[1].wait_writer(30)
        hosts.victim = victim = next(h for h, rid in REPLICAS.items() if rid == victim_id)
        survivor = next(h for h in REPLICAS if h != victim)
        survivor_id = REPLICAS[survivor]
        time.sleep(0.5)
        net.link_down(victim)
        try:
            table["faults injected"] += 1
            held = [t for t in tails if victim_id in t.writers]
            assert all(t.is_alive() for t in held), "a stream ended before its replica was cut off"
            wait_for(lambda: all(survivor_id in t.writers for t in held), f"{survivor_id} to take the streams over",
                     40)
        finally:
            net.link_up(victim)
        streaming.join(REQUEST_S + 10)
        assert not streaming.is_alive()
        table["streams held"] += len(held)
        problems = account(table, results, hosts.refs, "requests lost")
        assert not problems, f"streams not completed token-exact: {problems}"
        for t in tails:
            t.join(10)
            first = t.writers.index(survivor_id) if survivor_id in t.writers else len(t.writers)
            assert victim_id not in t.writers[first:], f"{victim_id} wrote after the takeover: {t.writers}"
        # back on the network, the victim's next write was refused: the stream was no longer its own
        wait_for(lambda: "another replica took the request over" in net.procs[f"serving-{victim}"].log(),
                 f"{victim_id} to find its stream taken over", 30)
        assert "continuing a request whose replica stopped" in net.procs[f"serving-{survivor}"].log()


def test_a_restarted_replica_rejoins_and_serves(hosts):
    net, victim = hosts.net, hosts.victim or "b"
    from llamaship.client import GatewayClient

    with logs_on_failure(net):
        net.kill(f"serving-{victim}", signal.SIGKILL)
        hosts.table["faults injected"] += 1
        hosts.start_replica(victim)
        net.wait_ready([f"serving-{victim}"], timeout_s=90)
        with GatewayClient(hosts.gateways[1]) as client:
            wait_for(serving(client, hosts.build_id, {REPLICAS[victim]}), f"{REPLICAS[victim]} to serve again", 60)
        # four concurrent requests for two slots on each replica: the restarted one takes some
        rids = [uuid.uuid4().hex for _ in range(4)]
        tails = [Tail(hosts.cluster.nodes, rid) for rid in rids]
        outcomes = in_threads([(request, (hosts.stubs, i, rid, PROMPTS[i % 2], 2 * SHORT))
                               for i, rid in enumerate(rids)], REQUEST_S)
        problems = account(hosts.table, outcomes, [hosts.refs[i % 2][:2 * SHORT] for i in range(4)], "requests lost")
        assert not problems, problems
        for t in tails:
            t.join(10)
        assert any(REPLICAS[victim] in t.writers for t in tails), [t.writers[:1] for t in tails]


class RequestsLost(AssertionError):
    pass


# Not strict: whether a chunk write meets the few seconds of failover varies from run to run.
@pytest.mark.xfail(strict=False, raises=RequestsLost, reason=(
    "known gap (#12): the replica now waits out a failover mid-write and continues from its stream, and an "
    "enqueue cut off by it frees its id soon, but a stream may still stall short of its end (1 of 8 requests "
    "'out of time' at 52 of 64 tokens in one of 3 runs): suspected a tail lost to asynchronous replication, "
    "which the gateway's cursor relay does not see"))
def test_no_acknowledged_request_is_lost_when_a_redis_primary_dies(hosts):
    """The primary of the pool's queue slot is SIGKILLed under load (8 requests through d and e)."""
    net, cluster, table = hosts.net, hosts.cluster, hosts.table
    with logs_on_failure(net):
        pool_key = keys.gen_streams("cpu")
        primary = cluster.master_of(pool_key)
        jobs = [(request, (hosts.stubs, i, uuid.uuid4().hex, PROMPTS[i % 2], SHORT, 30.0)) for i in range(8)]
        load: list[Outcome] = []
        loading = threading.Thread(target=lambda: load.extend(in_threads(jobs, 45)))
        loading.start()
        time.sleep(1.0)
        net.kill(cluster.process_of(primary), signal.SIGKILL)
        table["faults injected"] += 1
        promoted = wait_for(lambda: _new_primary(cluster, pool_key, primary), "the cluster to fail over", 30)
        host, port = next((h, p) for h, a in net.addr.items() for p in cluster.PORTS if f"{a}:{p}" == primary)
        cluster.start_node(host, port)  # the old primary comes back as the new one's replica
        loading.join(55)
        assert not loading.is_alive()
        cluster.wait_replicas_synced(30)
        assert cluster.master_of(pool_key) == promoted
        problems = account(table, load, [hosts.refs[i % 2][:SHORT] for i in range(8)], "requests lost (Redis failover)")
        if problems:
            raise RequestsLost(f"requests not completed token-exact: {problems}")


def test_fault_table(hosts):
    table = hosts.table
    width = max(map(len, table))
    print("\nmulti-host fault table:\n" + "\n".join(f"  {k:<{width}}  {v}" for k, v in table.items()))
    assert table["faults injected"] == 3 and table["streams held"] >= 1 and table["requests lost"] == 0


def _new_primary(cluster: RedisClusterOnHosts, key: str, old: str) -> str:
    try:
        now = cluster.master_of(key)
    except RuntimeError:
        return ""
    return now if now != old else ""
