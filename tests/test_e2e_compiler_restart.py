"""Compile jobs live in Redis: a compiler killed mid-build leaves no job "running"; it is re-run."""

from __future__ import annotations

import signal

import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["killed", "terminated"])
def test_job_running_when_compiler_dies_is_rerun_after_restart(tmp_path, demo_model, sig):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs", env={"LLAMASHIP_JOB_LEASE_S": "3"})
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        job = client.submit_compile(str(demo_model), "restart", "int4")
        for current in client.watch_compile(job.job_id):
            if current.state == compiler_pb2.JOB_STATE_RUNNING and current.stage == "build":
                break
        assert current.stage == "build", f"job never reached the build stage: {current}"
        compiler_port = stack.ports["compiler"]
        stack.stop_process("compiler", sig)
        stack.start_service("compiler", "compiler_service", compiler_port, 60)
        final = None
        for final in client.watch_compile(job.job_id):
            if final.state in (compiler_pb2.JOB_STATE_SUCCEEDED, compiler_pb2.JOB_STATE_FAILED):
                break
        assert final.state == compiler_pb2.JOB_STATE_SUCCEEDED, final.message
        assert final.attempts == 2
        client.wait_served("restart", final.build_id, timeout_s=60)
        assert client.generate("restart", "x = ", 4).completion_tokens == 4


def test_cancel_stops_a_running_build_and_publishes_nothing(tmp_path, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs")
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        job = client.submit_compile(str(demo_model), "cancelled", "int8")
        for current in client.watch_compile(job.job_id):
            if current.stage == "build":
                break
        client.cancel_compile(job.job_id)
        final = None
        for final in client.watch_compile(job.job_id):
            pass
        assert final.state == compiler_pb2.JOB_STATE_CANCELLED
        assert client.cancel_compile(job.job_id).state == compiler_pb2.JOB_STATE_CANCELLED  # idempotent
        assert "cancelled" not in {m.name for m in client.models()}
        assert not list((stack.cfg.store / "builds").iterdir())
