"""Mid-stream failover: a replica killed while streaming; another replica of the pool takes the
request over and the caller sees one uninterrupted, exact stream."""

from __future__ import annotations

import signal
import uuid

import grpc
import pytest

from shared.proto_gen.llamaship.serving.v1 import serving_pb2, serving_pb2_grpc

pytestmark = pytest.mark.integration
PROMPT = "def main(argv):\n    "
N = 3000


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    base = tmp_path_factory.mktemp("failover")
    cfg = StackConfig(store=base / "store", log_dir=base / "logs", serving_ports=[0, 0],
                      env={"LLAMASHIP_REPLICA_STALE_S": "2", "LLAMASHIP_HEARTBEAT_S": "0.5"})
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        assert client.compile(str(demo_model), "demo", "fp32").build_id
        yield stack, client


def _busy_replica(stack) -> str:
    for name in [n for n in stack.procs if n.startswith("serving")]:
        with grpc.insecure_channel(stack.procs[name].address) as ch:
            if serving_pb2_grpc.ServingStub(ch).GetStatus(serving_pb2.GetStatusRequest(), timeout=5).active:
                return name
    raise AssertionError("no replica is running the request")


@pytest.mark.parametrize("options", [{}, {"temperature": 0.9, "seed": 0}], ids=["greedy", "seeded"])
def test_killed_replica_stream_continues_exactly_on_the_other(two_replicas, options):
    stack, client = two_replicas
    reference = client.generate("demo", PROMPT, N, **options)
    assert reference.completion_tokens == N

    ids, text, finish = [], "", 0
    stream = client.stream("demo", PROMPT, N, **options)
    first = next(stream)
    ids += first.token_ids
    text += first.text
    victim = _busy_replica(stack)
    port = stack.ports[victim]
    stack.stop_process(victim, signal.SIGKILL)
    for chunk in stream:
        ids += chunk.token_ids
        text += chunk.text
        finish = chunk.finish_reason or finish
    assert ids == reference.token_ids
    assert text == reference.text
    assert finish and len(ids) == N
    # back to two replicas for the next case (a fresh consumer name: the dead one's entries are gone)
    stack.start_service(victim, "serving_service", port, 60, ["--pool", "cpu", "--replica-id", uuid.uuid4().hex[:8]])
