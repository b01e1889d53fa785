"""The caller's gRPC deadline travels with the request: work whose deadline passed while it
waited in the queue is never run."""

from __future__ import annotations

import re
import threading
import urllib.request

import grpc
import pytest

pytestmark = pytest.mark.integration


def _metric(stack, name: str, metric: str) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports[name]}/metrics", timeout=5).read().decode()
    return sum(float(v) for v in re.findall(rf"^{metric}(?:{{[^}}]*}})? (\S+)$", text, re.M))


def test_expired_request_is_dropped_before_it_runs(tmp_path, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs", slots=1, metrics=True)
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        assert client.compile(str(demo_model), "demo", "fp32").build_id
        busy = client.stream("demo", "def main(argv):\n    ", 4000)  # holds the only slot
        first = next(busy)
        done = {}
        t = threading.Thread(target=lambda: done.update(n=len(first.token_ids) + sum(len(c.token_ids) for c in busy)))
        t.start()
        with pytest.raises(grpc.RpcError) as info:
            client.generate("demo", "x = ", 8, timeout=0.3)
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        t.join(60)
        assert done["n"] == 4000
        short = [len(c.token_ids) for c in client.stream("demo", "y = ", 3) if c.token_ids]
        assert sum(short) == 3
        # the replica produced exactly the two streams that were served: never the expired one
        assert _metric(stack, "serving-cpu-0", "llamaship_serving_tokens_total") == 4000 + 3 + 0
        assert _metric(stack, "gateway", "llamaship_gateway_rejects_total") == 0
        # one inter-token sample per token after each stream's first chunk (that chunk is the TTFT)
        expected = (4000 - len(first.token_ids)) + (3 - short[0])
        assert _metric(stack, "gateway", "llamaship_gateway_inter_token_seconds_count") == expected
