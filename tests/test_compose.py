"""No Docker engine runs here: docker-compose.yml and the Dockerfile are parsed and cross-checked
against the code (commands, ports, env vars, volumes, build targets, health checks)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from shared import config

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
DOCKERFILE = (ROOT / "Dockerfile").read_text()
SERVICES = COMPOSE["services"]
ENV_NAMES = {s.env for s in config.SETTINGS.values()}
PORT_ENV = {"compiler_service": "LLAMASHIP_COMPILER_PORT", "serving_service": "LLAMASHIP_SERVING_PORT",
            "gateway": "LLAMASHIP_GATEWAY_PORT"}


def _module(svc: dict) -> str | None:
    cmd = svc.get("command") or []
    return cmd[cmd.index("-m") + 1] if "-m" in cmd else None


def test_expected_services_and_gpu_profile():
    assert set(SERVICES) == {"redis", "compiler", "serving-cpu", "serving-cuda", "gateway"}
    assert SERVICES["redis"]["image"].startswith("redis:")
    assert SERVICES["serving-cuda"]["profiles"] == ["gpu"]
    assert "--pool" in SERVICES["serving-cuda"]["command"] and SERVICES["serving-cuda"]["command"][-1] == "cuda"
    assert SERVICES["serving-cpu"]["command"][-1] == "cpu"


@pytest.mark.parametrize("name", ["compiler", "serving-cpu", "serving-cuda", "gateway"])
def test_service_is_consistent_with_the_code(name):
    svc = SERVICES[name]
    module = _module(svc)
    assert (ROOT / module / "__main__.py").is_file(), f"{name}: no module {module}"
    env = svc["environment"]
    unknown = {k for k in env if k.startswith("LLAMASHIP_")} - ENV_NAMES
    assert not unknown, f"{name}: env vars the code does not read: {unknown}"
    for key, value in env.items():
        setting = next(s for s in config.SETTINGS.values() if s.env == key)
        config.resolve([setting.name], {}, env={key: str(value)})  # valid value
    port = str(env[PORT_ENV[module]])
    assert svc["healthcheck"]["test"][-1] == f"127.0.0.1:{port}"
    target = svc["build"]["target"]
    assert re.search(rf"^FROM .* AS {re.escape(target)}$", DOCKERFILE, re.M), f"{name}: no Dockerfile target {target}"
    if module != "gateway":  # the compiler writes the store, replicas read it
        store_mounts = [v for v in svc.get("volumes", []) if v.startswith("store:")]
        assert store_mounts and store_mounts[0].split(":")[1] == env["LLAMASHIP_STORE"]
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert env["LLAMASHIP_REDIS_URL"] == "redis://redis:6379/0"
    # the service parses its own arguments from this command line
    flags = svc["command"][3:]
    names = {"compiler_service": config.COMPILER, "serving_service": config.SERVING, "gateway": config.GATEWAY}[module]
    config.parse_service_args(module, "", names, flags)


def test_addresses_between_services_match():
    gw = SERVICES["gateway"]["environment"]
    host, port = gw["LLAMASHIP_COMPILER_ADDRESS"].split(":")
    assert host in SERVICES and port == SERVICES[host]["environment"]["LLAMASHIP_COMPILER_PORT"]
    for name in ("serving-cpu", "serving-cuda"):
        env = SERVICES[name]["environment"]
        host, port = env["LLAMASHIP_ADVERTISE_ADDRESS"].split(":")
        assert host == name and port == env["LLAMASHIP_SERVING_PORT"]
    published = SERVICES["gateway"]["ports"][0].rsplit(":", 1)[1]
    assert published == gw["LLAMASHIP_GATEWAY_PORT"]
    # the OpenAI-compatible HTTP front is on and published on its port
    assert f"127.0.0.1:{gw['LLAMASHIP_HTTP_PORT']}:{gw['LLAMASHIP_HTTP_PORT']}" in SERVICES["gateway"]["ports"]
    assert set(COMPOSE["volumes"]) >= {"store"}


def test_runtime_images_stay_small():
    runtime = DOCKERFILE.split("FROM base AS runtime")[1].split("FROM ")[0]
    assert "torch" not in runtime and "transformers" not in runtime
    assert "onnxruntime-genai-cuda" in DOCKERFILE.split("AS runtime-cuda")[1].split("FROM ")[0]


def test_healthcheck_command_against_a_live_service(stack):
    for proc in ("gateway", "compiler", "serving-cpu-0"):
        out = subprocess.run([sys.executable, "-m", "llamaship.healthcheck", stack.procs[proc].address],
                             capture_output=True, text=True, cwd=ROOT, timeout=30)
        assert out.returncode == 0 and "SERVING" in out.stdout
    dead = subprocess.run([sys.executable, "-m", "llamaship.healthcheck", "127.0.0.1:1"], capture_output=True,
                          text=True, cwd=ROOT, timeout=30)
    assert dead.returncode == 1


def test_every_service_serves_reflection(stack):
    import grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    expected = {"gateway": "llamaship.gateway.v1.Gateway", "compiler": "llamaship.compiler.v1.Compiler",
                "serving-cpu-0": "llamaship.serving.v1.Serving"}
    for proc, service in expected.items():
        with grpc.insecure_channel(stack.procs[proc].address) as ch:
            stub = reflection_pb2_grpc.ServerReflectionStub(ch)
            [resp] = list(stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                                                    timeout=10))
            names = {s.name for s in resp.list_services_response.service}
            assert {service, "grpc.health.v1.Health"} <= names, (proc, names)
