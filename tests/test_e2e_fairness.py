"""Per-tenant fairness, tenant limits and priorities through the whole stack: a replica with one
slot, a tenant flooding the queue, another tenant and batch work arriving behind it."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from gateway.auth import create_key
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2

pytestmark = pytest.mark.integration
PROMPT = "def main(argv):\n    "


def test_a_flooding_tenant_neither_starves_another_nor_exceeds_its_limit(tmp_path, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    keys = tmp_path / "keys.json"
    ops = create_key(keys, "ops", ["admin"])
    flood_key, calm_key = create_key(keys, "flood", ["generate"]), create_key(keys, "calm", ["generate"])
    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs", slots=1,
                      env={"LLAMASHIP_API_KEYS_FILE": str(keys), "LLAMASHIP_TENANT_MAX_REQUESTS": "10"})
    with Stack(cfg) as stack:
        with GatewayClient(stack.gateway_address, api_key=ops) as c:
            assert c.compile(str(demo_model), "demo", "fp32").build_id
            c.set_model_access("demo", ["*"])
        finished: list[str] = []
        rejected: list[str] = []
        lock = threading.Lock()

        def run(key: str, label: str, **options) -> None:
            with GatewayClient(stack.gateway_address, api_key=key) as client:
                try:
                    client.generate("demo", PROMPT, 1500, timeout=120, **options)
                except grpc.RpcError as exc:
                    with lock:
                        rejected.append(f"{label}: {exc.code().name} {exc.details()}")
                    return
                with lock:
                    finished.append(label)

        floods = [threading.Thread(target=run, args=(flood_key, f"flood-{i}"), kwargs={"request_id": f"job-{i}"})
                  for i in range(12)]
        for t in floods:
            t.start()
        time.sleep(0.5)  # the flood is queued (10 accepted: its limit) and one of it is running
        with GatewayClient(stack.gateway_address, api_key=calm_key) as c:
            # request ids are per tenant: another tenant can neither cancel nor detect the flood's
            assert not c.cancel("job-0") and not c.cancel("job-5")
        calm = threading.Thread(target=run, args=(calm_key, "calm"), kwargs={"request_id": "job-0"})
        calm.start()
        for t in [*floods, calm]:
            t.join(300)
        assert len(rejected) == 2 and all("RESOURCE_EXHAUSTED" in r and "tenant 'flood'" in r for r in rejected)
        assert len(finished) == 11
        # round robin: calm waits for the running request and at most one more of the flood, not all ten
        assert finished.index("calm") <= 2, finished

        # priorities: batch work queued first still yields to an interactive request
        finished.clear()
        batch = [threading.Thread(target=run, args=(flood_key, f"batch-{i}"),
                                  kwargs={"priority": gateway_pb2.PRIORITY_BATCH}) for i in range(4)]
        for t in batch:
            t.start()
            time.sleep(0.02)
        time.sleep(0.5)
        interactive = threading.Thread(target=run, args=(flood_key, "interactive"))
        interactive.start()
        for t in [*batch, interactive]:
            t.join(300)
        assert finished.index("interactive") <= 1, finished
