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


def interpolate(value, env: dict[str, str]):
    """Compose's variable interpolation (${VAR}, ${VAR:-default}, ${VAR:+replacement}, $$) over a
    value, a list or a mapping, for the shell environment `env`."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, arg = m.group(1), m.group(2) or "", m.group(3) or ""
        given = env.get(name, "")
        if op == ":-":
            return given or arg
        if op == ":+":
            return arg if given else ""
        assert not op, f"interpolation {m.group(0)} not handled here"
        return given

    return re.sub(r"\$\$|\$\{(\w+)(:[-+])?([^}]*)\}", one, value)


def shell_expand(command: str, env: dict[str, str]) -> list[str]:
    """What `sh -c` runs for a CMD-SHELL health check (only ${VAR:+word} is used there)."""
    return interpolate(command, env).split()


S3_STORE = re.search(r"LLAMASHIP_STORE=(s3://\S+) docker compose --profile s3 up",
                     (ROOT / "docker-compose.yml").read_text()).group(1)
SCENARIOS = {"default": {}, "s3+mtls": {"LLAMASHIP_STORE": S3_STORE, "INTERNAL_TLS_DIR": "./certs"}}


def _module(svc: dict) -> str | None:
    cmd = svc.get("command") or []
    return cmd[cmd.index("-m") + 1] if "-m" in cmd else None


def test_expected_services_and_gpu_profile():
    assert set(SERVICES) == {"redis", "compiler", "serving-cpu", "serving-cuda", "gateway", "seaweedfs", "s3-bucket"}
    assert SERVICES["seaweedfs"]["profiles"] == SERVICES["s3-bucket"]["profiles"] == ["s3"]
    assert SERVICES["redis"]["image"].startswith("redis:")
    assert SERVICES["serving-cuda"]["profiles"] == ["gpu"]
    assert "--pool" in SERVICES["serving-cuda"]["command"] and SERVICES["serving-cuda"]["command"][-1] == "cuda"
    assert SERVICES["serving-cpu"]["command"][-1] == "cpu"


@pytest.mark.parametrize("scenario", list(SCENARIOS))
@pytest.mark.parametrize("name", ["compiler", "serving-cpu", "serving-cuda", "gateway"])
def test_service_is_consistent_with_the_code(name, scenario):
    svc = interpolate(SERVICES[name], SCENARIOS[scenario])
    module = _module(svc)
    assert (ROOT / module / "__main__.py").is_file(), f"{name}: no module {module}"
    env = svc["environment"]
    unknown = {k for k in env if k.startswith("LLAMASHIP_")} - ENV_NAMES
    assert not unknown, f"{name}: env vars the code does not read: {unknown}"
    assert {k for k in env if not k.startswith("LLAMASHIP_")} <= AWS_NAMES
    for key, value in env.items():
        if not key.startswith("LLAMASHIP_"):
            continue
        setting = next(s for s in config.SETTINGS.values() if s.env == key)
        config.resolve([setting.name], {}, env={key: str(value)})  # valid value
    # and together (all three internal TLS files or none, one Redis mode, ...)
    config.resolve(list(config.COMMON), {}, env={k: str(v) for k, v in env.items() if k.startswith("LLAMASHIP_")})
    port = str(env[PORT_ENV[module]])
    check = svc["healthcheck"]["test"]
    if check[0] == "CMD-SHELL":  # the compiler and replicas: over mTLS when it is on
        check = ["CMD", *shell_expand(check[1], env)]
        assert ("--internal-tls" in check) == bool(SCENARIOS[scenario].get("INTERNAL_TLS_DIR")), check
    assert check[:4] == ["CMD", "python", "-m", "llamaship.healthcheck"] and check[-1] == f"127.0.0.1:{port}"
    if module == "gateway":
        assert "--internal-tls" not in check  # its public port keeps its own scheme
    tls = [env[f"LLAMASHIP_INTERNAL_TLS_{p}"] for p in ("CA", "CERT", "KEY")]
    assert all(tls) or not any(tls)
    assert all(t.startswith("/internal-tls/") for t in tls if t)
    assert any(v.endswith(":/internal-tls:ro") for v in svc["volumes"])
    target = svc["build"]["target"]
    assert re.search(rf"^FROM .* AS {re.escape(target)}$", DOCKERFILE, re.M), f"{name}: no Dockerfile target {target}"
    if module != "gateway":  # the compiler writes the store, replicas read it
        store_mounts = [v for v in svc.get("volumes", []) if v.startswith("store:")]
        assert store_mounts and (store_mounts[0].split(":")[1] == env["LLAMASHIP_STORE"] or
                                 env["LLAMASHIP_STORE"] == S3_STORE)
        # with the s3 profile, the bucket exists first; without it the dependency is ignored
        assert svc["depends_on"]["s3-bucket"] == {"condition": "service_completed_successfully", "required": False}
    assert svc["depends_on"]["redis"]["condition"] == "service_healthy"
    assert env["LLAMASHIP_REDIS_URL"] == "redis://redis:6379/0"
    # the service parses its own arguments from this command line
    flags = svc["command"][3:]
    names = {"compiler_service": config.COMPILER, "serving_service": config.SERVING, "gateway": config.GATEWAY}[module]
    config.parse_service_args(module, "", names, flags)


AWS_NAMES = {"AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION"}  # boto3's own


def test_the_s3_profile_serves_the_store_the_services_use():
    from shared.store_s3 import S3Location

    seaweed, bucket_job = SERVICES["seaweedfs"], SERVICES["s3-bucket"]
    s3_port = next(a.split("=")[1] for a in seaweed["command"] if a.startswith("-s3.port="))
    assert "-s3" in seaweed["command"] and any(v.endswith(":/data") for v in seaweed["volumes"])
    job_env = interpolate(bucket_job["environment"], {})
    assert job_env["AWS_ENDPOINT_URL"] == f"http://seaweedfs:{s3_port}"
    bucket = S3Location.parse(S3_STORE).bucket
    script = bucket_job["command"][0]
    assert f"head-bucket --bucket {bucket}" in script and f"create-bucket --bucket {bucket}" in script
    assert "seq 60" in script and script.rstrip().endswith("exit 1")  # bounded, and fails when it never answers
    assert bucket_job["depends_on"]["seaweedfs"]["condition"] == "service_started"
    for name in ("compiler", "serving-cpu", "serving-cuda", "gateway"):
        env = interpolate(SERVICES[name]["environment"], SCENARIOS["s3+mtls"])
        assert env["LLAMASHIP_STORE"] == S3_STORE
        config.resolve(["store"], {}, env={"LLAMASHIP_STORE": env["LLAMASHIP_STORE"]})
        aws = {k: v for k, v in env.items() if k.startswith("AWS_")}
        assert set(aws) == AWS_NAMES
        assert aws == {**aws, **{k: job_env[k] for k in AWS_NAMES}}  # the bucket job's server and credentials
    # another S3 server: the variables the caller sets win over the SeaweedFS defaults
    real = interpolate(SERVICES["compiler"]["environment"], {"AWS_ENDPOINT_URL": "https://s3.eu-west-1.amazonaws.com"})
    assert real["AWS_ENDPOINT_URL"] == "https://s3.eu-west-1.amazonaws.com"
    assert {"s3-data", "internal-tls"} <= set(COMPOSE["volumes"])


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
