"""A gateway SIGKILLed mid-stream: clients that know another gateway resume their streams there
and see every token once, in order, equal to the reference; a stream nobody resumes is stopped
by its replica once its relay lease runs out, freeing the slot."""

from __future__ import annotations

import signal
import threading
import time

import grpc
import pytest
import redis

from shared import redis_keys as keys
from shared.generation import Chunk
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2

pytestmark = pytest.mark.integration
PROMPT = "def main(argv):\n    "  # greedy: never reaches EOS within the context
TOKENS = 1500
CLIENTS = 6


def test_gateway_killed_mid_stream(tmp_path, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs", gateways=2, slots=8,
                      env={"LLAMASHIP_RELAY_LEASE_S": "4"})
    with Stack(cfg) as stack:
        doomed, survivor = stack.gateway_addresses
        with GatewayClient(survivor) as c:
            assert c.compile(str(demo_model), "demo", "fp32").build_id
            reference = c.generate("demo", PROMPT, TOKENS)
        assert len(reference.token_ids) == TOKENS

        results: list = [None] * CLIENTS
        errors: list = []
        started = threading.Barrier(CLIENTS + 2)

        def resuming_client(i: int) -> None:
            first = [True]

            def on_text(_text: str) -> None:
                if first[0]:
                    first[0] = False
                    started.wait(60)

            try:
                with GatewayClient(f"{doomed},{survivor}") as client:
                    results[i] = client.generate("demo", PROMPT, TOKENS, on_text=on_text, timeout=120)
            except grpc.RpcError as exc:  # pragma: no cover - reported below
                errors.append(f"{i}: {exc.code().name} {exc.details()}")

        # one more client that knows only the doomed gateway: it loses its stream and never resumes
        orphan = {"id": "orphan-1", "tokens": 0, "code": None}

        def orphan_client() -> None:
            with GatewayClient(doomed) as client:
                try:
                    for n, chunk in enumerate(client.stream("demo", PROMPT, 4000, request_id=orphan["id"])):
                        orphan["tokens"] += len(chunk.token_ids)
                        if n == 0:
                            started.wait(60)
                except grpc.RpcError as exc:
                    orphan["code"] = exc.code()

        threads = [threading.Thread(target=resuming_client, args=(i,)) for i in range(CLIENTS)]
        threads.append(threading.Thread(target=orphan_client))
        for t in threads:
            t.start()
        started.wait(60)  # every stream has its first tokens
        stack.stop_process("gateway", signal.SIGKILL)
        for t in threads:
            t.join(180)

        assert not errors, errors
        for r in results:
            assert r is not None, "a stream was lost"
            assert r.token_ids == reference.token_ids  # no token lost, repeated or reordered
            assert r.text == reference.text and r.completion_tokens == TOKENS and r.finish_reason == "length"
        assert orphan["code"] == grpc.StatusCode.UNAVAILABLE

        # the orphan's replica notices that nobody relays it and stops it early, with a retryable error
        r = redis.Redis.from_url(stack.redis_url, decode_responses=True)
        deadline = time.time() + 20
        while True:
            entries = r.xrange(keys.response_stream(keys.request_scope("default", orphan["id"])))
            last = Chunk.from_fields(entries[-1][1]) if entries else None
            if last and last.kind in ("end", "error") or time.time() > deadline:
                break
            time.sleep(0.2)
        assert last is not None and last.kind == "error" and last.error_code == "UNAVAILABLE", last
        produced = sum(len(Chunk.from_fields(f).token_ids) for _, f in entries)
        assert produced < 4000
        with GatewayClient(survivor) as c:  # its slot is free: the replica runs nothing (next heartbeat)
            deadline = time.time() + 10
            while any(rep.active for m in c.models() for rep in m.replicas) and time.time() < deadline:
                time.sleep(0.5)
            assert all(rep.active == 0 for m in c.models() for rep in m.replicas)
            # and a stream that ended cannot be resumed
            with pytest.raises(grpc.RpcError) as info:
                list(c.stub.Generate(gateway_pb2.GenerateRequest(request_id=orphan["id"], resume_cursor="0-0")))
            assert info.value.code() == grpc.StatusCode.NOT_FOUND
