"""With no replica left to take over, a replica that dies mid-stream ends the caller's stream with
a clean UNAVAILABLE (retryable), never a hang; the stack serves again once a replica is back."""

from __future__ import annotations

import signal
import time

import grpc
import pytest

pytestmark = pytest.mark.integration


def test_replica_killed_mid_stream_gives_unavailable_then_recovers(tmp_path, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs", env={"LLAMASHIP_REPLICA_STALE_S": "2", "LLAMASHIP_HEARTBEAT_S": "0.5",
                                                                                  "LLAMASHIP_FAILOVER_TIMEOUT_S": "2"})
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        job = client.compile(str(demo_model), "demo", "fp32")
        assert job.build_id
        stream = client.stream("demo", "def main(argv):\n    ", 4000)  # greedy: this prompt never hits EOS
        first = next(stream)
        assert first.token_ids
        port = stack.ports["serving-cpu-0"]
        stack.stop_process("serving-cpu-0", signal.SIGKILL)
        t0 = time.time()
        with pytest.raises(grpc.RpcError) as info:
            for _ in stream:
                pass
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "may be retried" in info.value.details()
        assert time.time() - t0 < 15

        with pytest.raises(grpc.RpcError) as none_left:
            client.generate("demo", "x", 4)
        assert none_left.value.code() == grpc.StatusCode.UNAVAILABLE

        stack.start_service("serving-cpu-0", "serving_service", port, 60, ["--pool", "cpu", "--replica-id", "cpu-1"])
        client.wait_served("demo", job.build_id, timeout_s=30)
        assert client.generate("demo", "x = ", 4).completion_tokens == 4


def test_decode_worker_crash_is_retryable_and_the_replica_recovers(tmp_path, demo_model):
    import psutil

    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs")
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        assert client.compile(str(demo_model), "demo", "fp32").build_id
        replica = psutil.Process(stack.procs["serving-cpu-0"].popen.pid)
        [worker] = [p for p in replica.children() if "spawn_main" in " ".join(p.cmdline())]
        worker.kill()
        worker.wait(10)
        deadline = time.time() + 60
        failures = []
        while True:
            try:
                assert client.generate("demo", "x = ", 4).completion_tokens == 4
                break
            except grpc.RpcError as exc:
                failures.append((exc.code(), exc.details()))
                assert time.time() < deadline, "the replica never recovered its decode worker"
                time.sleep(0.5)
        # the first request after the crash is told, retryably, that the worker is being restarted
        assert failures, "a request after the crash succeeded without the worker being restarted"
        assert all(code == grpc.StatusCode.UNAVAILABLE for code, _ in failures), failures
        assert stack.procs["serving-cpu-0"].alive()
        assert [p for p in replica.children() if p.pid != worker.pid and "spawn_main" in " ".join(p.cmdline())]
