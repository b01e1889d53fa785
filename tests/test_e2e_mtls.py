"""Service-to-service mTLS: a stack whose compiler and replicas require internal certificates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llamaship.internal_certs import issue, make_ca, write_set
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2, compiler_pb2_grpc
from shared.tenancy import ADMIN_HEADER, TENANT_HEADER

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _tls_env(paths) -> dict[str, str]:
    return {"LLAMASHIP_INTERNAL_TLS_CA": str(paths["ca"]), "LLAMASHIP_INTERNAL_TLS_CERT": str(paths["cert"]),
            "LLAMASHIP_INTERNAL_TLS_KEY": str(paths["key"])}


@pytest.fixture(scope="module")
def mtls(tmp_path_factory, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    tmp = tmp_path_factory.mktemp("mtls")
    paths = write_set(tmp / "internal", ["127.0.0.1", "localhost"])
    other = write_set(tmp / "other", ["127.0.0.1", "localhost"])  # a certificate from another CA
    cfg = StackConfig(store=tmp / "store", log_dir=tmp / "logs", env=_tls_env(paths))
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        yield {"stack": stack, "client": client, "paths": paths, "other": other, "tmp": tmp}


def _health(address: str, creds: grpc.ChannelCredentials | None, metadata=()) -> grpc.StatusCode:
    channel = grpc.secure_channel(address, creds) if creds else grpc.insecure_channel(address)
    with channel:
        try:
            health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5, metadata=metadata)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


def _creds(paths, with_cert: bool = True) -> grpc.ChannelCredentials:
    if not with_cert:
        return grpc.ssl_channel_credentials(paths["ca"].read_bytes())
    return grpc.ssl_channel_credentials(paths["ca"].read_bytes(), paths["key"].read_bytes(), paths["cert"].read_bytes())


def test_stack_generates_end_to_end_over_mtls(mtls, demo_model):
    client = mtls["client"]
    job = client.compile(str(demo_model), "demo", "fp32")  # gateway -> compiler over mTLS
    assert job.build_id
    assert client.generate("demo", "x = ", 6).completion_tokens == 6
    logs = "".join(p.read_text() for p in (mtls["tmp"] / "logs").glob("*.log"))
    assert "Handshake failed" not in logs


@pytest.mark.parametrize("service", ["compiler", "serving-cpu-0"])
def test_internal_services_refuse_callers_without_an_internal_certificate(mtls, service):
    address, paths, other = mtls["stack"].procs[service].address, mtls["paths"], mtls["other"]
    assert _health(address, _creds(paths)) == grpc.StatusCode.OK  # it serves the internal certificate's holder
    assert _health(address, None) == grpc.StatusCode.UNAVAILABLE  # plaintext
    assert _health(address, _creds(paths, with_cert=False)) == grpc.StatusCode.UNAVAILABLE  # TLS, no client cert
    foreign = grpc.ssl_channel_credentials(paths["ca"].read_bytes(), other["key"].read_bytes(), other["cert"].read_bytes())
    assert _health(address, foreign) == grpc.StatusCode.UNAVAILABLE  # client cert from another CA


def test_identity_metadata_only_from_internal_certificate_holders(mtls):
    """A caller that could reach the compiler and claim to be an admin of a tenant is refused before
    its metadata is read, unless it holds an internal certificate."""
    address, paths = mtls["stack"].procs["compiler"].address, mtls["paths"]
    metadata = ((TENANT_HEADER, "mallory"), (ADMIN_HEADER, "1"))
    with grpc.insecure_channel(address) as ch:
        with pytest.raises(grpc.RpcError) as info:
            compiler_pb2_grpc.CompilerStub(ch).GetCompile(compiler_pb2.GetCompileRequest(job_id="x"), timeout=5,
                                                          metadata=metadata)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def _start(module: str, env_extra: dict[str, str], tmp: Path) -> subprocess.CompletedProcess:
    import os

    env = dict(os.environ, LLAMASHIP_STORE=str(tmp / "store"), LLAMASHIP_REDIS_URL="redis://127.0.0.1:1/0",
               **env_extra)
    return subprocess.run([sys.executable, "-m", module, "--port", "0"], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=60)


def test_start_up_refuses_a_bad_configuration(tmp_path):
    import datetime as dt

    ca = make_ca()
    now = dt.datetime.now(dt.timezone.utc)
    cert, key = issue(ca, "old", ["127.0.0.1"], not_before=now - dt.timedelta(days=9), not_after=now - dt.timedelta(days=1))
    paths = write_set(tmp_path / "good", ["127.0.0.1"])
    (tmp_path / "old.pem").write_bytes(cert)
    (tmp_path / "old-key.pem").write_bytes(key)
    expired = _start("compiler_service", {**_tls_env(paths), "LLAMASHIP_INTERNAL_TLS_CERT": str(tmp_path / "old.pem"),
                                          "LLAMASHIP_INTERNAL_TLS_KEY": str(tmp_path / "old-key.pem")}, tmp_path)
    assert expired.returncode == 1
    assert "internal TLS: --internal-tls-cert" in expired.stderr and "expired on" in expired.stderr
    missing = _start("serving_service", {**_tls_env(paths), "LLAMASHIP_INTERNAL_TLS_KEY": str(tmp_path / "no.pem")},
                     tmp_path)
    assert missing.returncode == 1 and "--internal-tls-key" in missing.stderr and "cannot read" in missing.stderr
    half = _start("gateway", {"LLAMASHIP_INTERNAL_TLS_CA": str(paths["ca"])}, tmp_path)
    assert half.returncode == 2 and "go together" in half.stderr


def test_up_generates_a_throwaway_ca_and_refuses_half_a_configuration(tmp_path):
    import os
    import re
    import signal

    half = subprocess.run([sys.executable, "-m", "llamaship.cli", "up", "--internal-tls-ca", str(tmp_path / "ca.pem"),
                           "--log-dir", str(tmp_path / "logs0")], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert half.returncode == 1 and "go together" in half.stderr
    up = subprocess.Popen([sys.executable, "-m", "llamaship.cli", "up", "--internal-tls-generate", "--gateway-port", "0",
                           "--log-dir", str(tmp_path / "run" / "logs"), "--store", str(tmp_path / "store")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, start_new_session=True)
    try:
        lines = []
        for line in up.stdout:
            lines.append(line)
            if line.startswith("gateway ready") or len(lines) > 50:
                break
        text = "".join(lines)
        assert "mTLS between services" in text, text
        compiler = re.search(r"compiler\s+grpc (\S+)", text).group(1)
        paths = {k: tmp_path / "run" / "internal-tls" / f for k, f in
                 (("ca", "ca.pem"), ("cert", "service.pem"), ("key", "service-key.pem"))}
        assert _health(compiler, None) == grpc.StatusCode.UNAVAILABLE
        assert _health(compiler, _creds(paths)) == grpc.StatusCode.OK
    finally:
        os.killpg(up.pid, signal.SIGTERM)
        up.wait(30)
