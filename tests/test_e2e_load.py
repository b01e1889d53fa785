"""Load through several gateways and replicas: 32 concurrent streams, nothing lost, every greedy
stream equal to the reference, both replicas used."""

from __future__ import annotations

import threading

import grpc
import pytest


pytestmark = pytest.mark.integration
STREAMS = 32
PROMPTS = ["def main(argv):\n    ", "class Parser:\n    ", "import os\n", "for i in range(10):\n    "]


def test_32_streams_through_2_gateways_and_2_replicas(tmp_path, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs", serving_ports=[0, 0], gateways=2,
                      slots=16, metrics=True)
    with Stack(cfg) as stack:
        assert len(stack.gateway_addresses) == 2
        with GatewayClient(stack.gateway_addresses[0]) as c:
            assert c.compile(str(demo_model), "demo", "fp32").build_id
            reference = {p: c.generate("demo", p, 64).token_ids for p in PROMPTS}
        results: list = [None] * STREAMS
        errors: list = []

        def one(i: int) -> None:
            try:
                with GatewayClient(stack.gateway_addresses[i % 2]) as client:
                    results[i] = client.generate("demo", PROMPTS[i % len(PROMPTS)], 64, timeout=120)
            except grpc.RpcError as exc:  # pragma: no cover - reported below
                errors.append(f"{i}: {exc.code().name} {exc.details()}")

        threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(180)
        assert not errors, errors
        assert all(r is not None for r in results), "a stream was lost"
        for i, r in enumerate(results):
            assert r.token_ids == reference[PROMPTS[i % len(PROMPTS)]]
            assert r.completion_tokens == 64
        served = {}
        for name in [n for n in stack.procs if n.startswith("serving")]:
            import urllib.request

            text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports[name]}/metrics", timeout=5).read().decode()
            served[name] = sum(float(line.split()[-1]) for line in text.splitlines()
                               if line.startswith("llamaship_serving_requests_total{"))
        assert all(v > 0 for v in served.values()), f"a replica took no work: {served}"
        assert sum(served.values()) >= STREAMS
