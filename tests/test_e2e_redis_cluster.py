"""The whole stack (compiler, a cpu replica, gateway) on a real 3-master Redis Cluster: compile,
publish, generate and stream tokens, with every service in cluster mode and no embedded Redis."""

from __future__ import annotations

import pytest

from tests.redis_servers import Cluster, require_binaries

pytestmark = pytest.mark.integration
PROMPT = "import os\n"


def test_the_stack_generates_tokens_on_a_redis_cluster(tmp_path, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    require_binaries()
    with Cluster() as cluster:
        cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs",
                          redis_settings={"redis_cluster_nodes": cluster.nodes})
        with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
            assert "redis" not in stack.procs  # an external Redis: none embedded
            client.compile(str(demo_model), "demo", "fp32")
            out = client.generate("demo", PROMPT, 16)
            assert len(out.token_ids) == 16
            assert client.generate("demo", PROMPT, 16).token_ids == out.token_ids  # greedy: the same tokens
            chunks = list(client.stream("demo", PROMPT, 8))
            assert len(chunks) > 1 and sum(len(c.token_ids) for c in chunks) == 8  # streamed, chunk by chunk
