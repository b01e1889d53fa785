"""API keys per tenant with scopes, and TLS, at the gateway."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from gateway.auth import create_key, hash_key

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _code(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code()


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


def test_scopes_and_tls(tmp_path, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    keys = tmp_path / "keys.json"
    cli = subprocess.run([sys.executable, "-m", "llamaship.cli", "keys", "create", "ops", "--scopes", "admin",
                          "--file", str(keys)], capture_output=True, text=True, cwd=ROOT)
    assert cli.returncode == 0, cli.stderr
    admin = cli.stdout.strip().splitlines()[-1]
    user = create_key(keys, "acme", ["generate"])
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=localhost",
                    "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True)
    cfg = StackConfig(store=tmp_path / "store", log_dir=tmp_path / "logs",
                      env={"LLAMASHIP_API_KEYS_FILE": str(keys), "LLAMASHIP_TLS_CERT_FILE": str(cert),
                           "LLAMASHIP_TLS_KEY_FILE": str(key)})
    with Stack(cfg) as stack:
        addr = stack.gateway_address.replace("127.0.0.1", "localhost")
        with GatewayClient(addr, api_key=admin, tls_ca=str(cert)) as ops:
            assert ops.compile(str(demo_model), "demo", "fp32").build_id
        with GatewayClient(addr, api_key=user, tls_ca=str(cert)) as acme:
            assert acme.generate("demo", "x = ", 4).completion_tokens == 4
            assert [m.name for m in acme.models()] == ["demo"]
            assert _code(lambda: acme.submit_compile(str(demo_model), "x", "fp32")) == grpc.StatusCode.PERMISSION_DENIED
        with GatewayClient(addr, api_key="lsk_wrong", tls_ca=str(cert)) as bad:
            assert _code(lambda: bad.generate("demo", "x", 4)) == grpc.StatusCode.UNAUTHENTICATED
        with GatewayClient(addr, tls_ca=str(cert)) as anonymous:
            assert _code(lambda: anonymous.models()) == grpc.StatusCode.UNAUTHENTICATED
        with GatewayClient(addr, api_key=user) as plaintext:  # TLS required
            assert _code(lambda: plaintext.models()) == grpc.StatusCode.UNAVAILABLE
        logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
        assert user not in logs and admin not in logs
