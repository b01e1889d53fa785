"""One stack whose single replica is restarted on each decode engine in turn (genai, iteration),
for end-to-end tests that must hold on both."""

from __future__ import annotations

import time

import grpc

REPLICA = "serving-cpu-0"


def start_stack(base, demo_model, model: str = "demo"):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    stack = Stack(StackConfig(store=base / "store", log_dir=base / "logs", slots=4)).start()
    client = GatewayClient(stack.gateway_address)
    job = client.compile(str(demo_model), model, "fp32")
    assert job.build_id, job.message
    return stack, client


def use_engine(stack, client, engine: str, model: str = "demo", timeout_s: float = 120.0) -> None:
    """Restart the replica with `engine` and wait until it serves `model`."""
    port = stack.ports[REPLICA]
    stack.stop_process(REPLICA)
    stack.start_service(REPLICA, "serving_service", port, 60.0,
                        ["--pool", "cpu", "--slots", "4", "--replica-id", "cpu-0", "--serving-engine", engine])
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client.generate(model, "x", 1, timeout=30)
            return
        except grpc.RpcError as exc:
            if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.NOT_FOUND) or \
                    time.monotonic() > deadline:
                raise
            time.sleep(0.5)
