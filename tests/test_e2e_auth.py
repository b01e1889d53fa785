"""API keys per tenant with scopes, and TLS, at the gateway."""

from __future__ import annotations

import json
import os
import subprocess
import time
import sys
from pathlib import Path

import grpc
import pytest

from gateway.auth import create_key, hash_key

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _details(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def _code(fn):
    return _details(fn)[0]


def test_keys_are_stored_hashed(tmp_path):
    path = tmp_path / "keys.json"
    key = create_key(path, "acme", ["generate"])
    text = path.read_text()
    assert key not in text and hash_key(key) in text
    assert json.loads(text)["tenants"]["acme"]["keys"][0]["scopes"] == ["generate"]
    assert path.stat().st_mode & 0o077 == 0
    admin = create_key(path, "acme", ["admin"])  # scopes are per key: the first key stays generate-only
    from gateway.auth import KeyStore

    store = KeyStore.load(path)
    assert store.tenant_for(key).scopes == {"generate"} and store.tenant_for(admin).scopes == {"admin"}
    assert store.tenant_for("lsk_unknown") is None


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, demo_model):
    """A stack with API keys and TLS: ops (admin), acme (generate only), acme-dev (acme: compile and
    generate), beta (beta: compile and generate); ops has compiled "demo"."""
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    tmp = tmp_path_factory.mktemp("keyed")
    keys = tmp / "keys.json"
    cli = subprocess.run([sys.executable, "-m", "llamaship.cli", "keys", "create", "ops", "--scopes", "admin",
                          "--file", str(keys)], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    k = {"ops": cli.stdout.strip().splitlines()[-1], "acme": create_key(keys, "acme", ["generate"]),
         "acme-dev": create_key(keys, "acme", ["compile", "generate"]),
         "beta": create_key(keys, "beta", ["compile", "generate"])}
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    cfg = StackConfig(store=tmp / "store", log_dir=tmp / "logs",
                      env={"LLAMASHIP_API_KEYS_FILE": str(keys), "LLAMASHIP_TLS_CERT_FILE": str(cert),
                           "LLAMASHIP_TLS_KEY_FILE": str(key)})
    with Stack(cfg) as stack:
        addr = stack.gateway_address.replace("127.0.0.1", "localhost")
        clients = {name: GatewayClient(addr, api_key=v, tls_ca=str(cert)) for name, v in k.items()}
        assert clients["ops"].compile(str(demo_model), "demo", "fp32").build_id
        yield {"addr": addr, "cert": cert, "keys": k, "clients": clients, "logs": tmp / "logs"}
        for c in clients.values():
            c.close()


def test_scopes_and_tls(keyed):
    from llamaship.client import GatewayClient

    addr, cert, ops, acme = keyed["addr"], keyed["cert"], keyed["clients"]["ops"], keyed["clients"]["acme"]
    # an admin's model is the admin's until access is granted
    assert _code(lambda: acme.generate("demo", "x = ", 4)) == grpc.StatusCode.NOT_FOUND
    assert ops.set_model_access("demo", ["acme"]).readers == ["acme"]
    assert acme.generate("demo", "x = ", 4).completion_tokens == 4
    assert [m.name for m in acme.models()] == ["demo"]
    assert _code(lambda: acme.submit_compile("/x", "x", "fp32")) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: acme.set_model_access("demo", ["*"])) == grpc.StatusCode.PERMISSION_DENIED  # scope compile
    with GatewayClient(addr, api_key="lsk_wrong", tls_ca=str(cert)) as bad:
        assert _code(lambda: bad.generate("demo", "x", 4)) == grpc.StatusCode.UNAUTHENTICATED
    with GatewayClient(addr, tls_ca=str(cert)) as anonymous:
        assert _code(lambda: anonymous.models()) == grpc.StatusCode.UNAUTHENTICATED
    with GatewayClient(addr, api_key=keyed["keys"]["acme"]) as plaintext:  # TLS required
        assert _code(lambda: plaintext.models()) == grpc.StatusCode.UNAVAILABLE
    logs = "".join(p.read_text() for p in keyed["logs"].glob("*.log"))
    assert not any(key in logs for key in keyed["keys"].values())


def test_models_belong_to_their_tenant(keyed, demo_model):
    dev, beta, ops = keyed["clients"]["acme-dev"], keyed["clients"]["beta"], keyed["clients"]["ops"]
    job = dev.compile(str(demo_model), "acme-m", "fp32")  # the same build as demo: reused
    assert job.build_id
    mine = {m.name: m for m in dev.models()}["acme-m"]
    assert mine.owner == "acme" and list(mine.readers) == [] and list(mine.served_build_ids) == [job.build_id]
    assert not mine.replicas  # replica addresses are for admins
    assert {m.name: m for m in ops.models()}["acme-m"].replicas[0].address
    # to beta it does not exist: not listed, and the same answer as an unknown name
    assert "acme-m" not in [m.name for m in beta.models()]
    hidden = _details(lambda: beta.generate("acme-m", "x", 4))
    unknown = _details(lambda: beta.generate("acme-n", "x", 4))
    assert hidden[0] == unknown[0] == grpc.StatusCode.NOT_FOUND and hidden[1] == unknown[1].replace("acme-n", "acme-m")
    assert _code(lambda: beta.set_model_access("acme-m", ["*"])) == grpc.StatusCode.NOT_FOUND
    assert _code(lambda: beta.submit_compile(str(demo_model), "acme-m", "fp32")) == grpc.StatusCode.PERMISSION_DENIED
    # acme lets beta generate; beta still may not change or delete it
    assert dev.set_model_access("acme-m", ["beta"]).owner == "acme"
    assert beta.generate("acme-m", "x = ", 4).completion_tokens == 4
    assert _code(lambda: beta.set_model_access("acme-m", ["*"])) == grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: beta.delete_model("acme-m")) == grpc.StatusCode.PERMISSION_DENIED
    # cancelling: only the tenant's own request
    stream = dev.stream("acme-m", "def main(argv):\n    ", 2000, request_id="acme-long")
    next(stream)
    assert beta.cancel("acme-long") is False
    assert dev.cancel("acme-long") is True
    assert _code(lambda: list(stream)) == grpc.StatusCode.CANCELLED
    # deleting: the owner, through the CLI
    env = dict(os.environ, LLAMASHIP_API_KEY=keyed["keys"]["acme-dev"], LLAMASHIP_TLS_CA=str(keyed["cert"]),
               LLAMASHIP_GATEWAY=keyed["addr"])
    shown = subprocess.run([sys.executable, "-m", "llamaship.cli", "models", "access", "acme-m", "--public"],
                           capture_output=True, text=True, cwd=ROOT, env=env)
    assert shown.returncode == 0 and "every tenant" in shown.stdout, shown.stderr
    gone = subprocess.run([sys.executable, "-m", "llamaship.cli", "models", "delete", "acme-m"],
                          capture_output=True, text=True, cwd=ROOT, env=env)
    assert gone.returncode == 0, gone.stderr
    assert _code(lambda: dev.generate("acme-m", "x", 4)) == grpc.StatusCode.NOT_FOUND
    assert "acme-m" not in [m.name for m in ops.models()]
    # the replicas stop serving it (and keep serving the build under its other name)
    deadline = time.time() + 20
    while "stopped serving acme-m" not in "".join(p.read_text() for p in keyed["logs"].glob("serving-*.log")):
        assert time.time() < deadline, "no replica stopped serving the deleted model"
        time.sleep(0.2)
    assert dev.generate("demo", "x = ", 4).completion_tokens == 4


def test_upload_through_a_gateway_with_keys(keyed, tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    state = keyed["clients"]["acme-dev"].upload(str(tmp_path))
    assert state.complete
