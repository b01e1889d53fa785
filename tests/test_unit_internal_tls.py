"""shared/internal_tls.py: start-up checks of the internal certificates, and mTLS on a real gRPC server."""

from __future__ import annotations

import asyncio
import datetime as dt

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from llamaship.internal_certs import issue, make_ca, write_set
from shared import config, internal_tls
from shared.config import ConfigError
from shared.grpc_server import add_health_and_reflection, bind, create_server, set_serving


def _pem(cert) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture()
def certs(tmp_path):
    return write_set(tmp_path / "tls", ["127.0.0.1", "localhost"])


def test_good_set_passes(certs):
    ca, cert, key = internal_tls.check(str(certs["ca"]), str(certs["cert"]), str(certs["key"]))
    assert ca == certs["ca"].read_bytes() and cert.startswith(b"-----BEGIN CERTIFICATE")
    assert certs["key"].stat().st_mode & 0o077 == 0


def test_missing_file(certs, tmp_path):
    with pytest.raises(ConfigError, match=r"--internal-tls-key .*nope\.pem: cannot read"):
        internal_tls.check(str(certs["ca"]), str(certs["cert"]), str(tmp_path / "nope.pem"))


def test_not_pem(certs, tmp_path):
    junk = tmp_path / "junk.pem"
    junk.write_text("hello")
    with pytest.raises(ConfigError, match="--internal-tls-ca .*no PEM certificate"):
        internal_tls.check(str(junk), str(certs["cert"]), str(certs["key"]))


def test_key_of_another_certificate(certs, tmp_path):
    _, other_key = issue(make_ca(), "x", ["127.0.0.1"])
    (tmp_path / "other-key.pem").write_bytes(other_key)
    with pytest.raises(ConfigError, match="is not the key of --internal-tls-cert"):
        internal_tls.check(str(certs["ca"]), str(certs["cert"]), str(tmp_path / "other-key.pem"))


def test_expired_and_not_yet_valid(tmp_path):
    ca = make_ca()
    (tmp_path / "ca.pem").write_bytes(_pem(ca[0]))
    now = dt.datetime.now(dt.timezone.utc)
    for name, nb, na, msg in (("old", now - dt.timedelta(days=10), now - dt.timedelta(days=1), "expired on"),
                              ("new", now + dt.timedelta(days=1), now + dt.timedelta(days=10), "not valid before")):
        cert, key = issue(ca, name, ["127.0.0.1"], not_before=nb, not_after=na)
        (tmp_path / f"{name}.pem").write_bytes(cert)
        (tmp_path / f"{name}-key.pem").write_bytes(key)
        with pytest.raises(ConfigError, match=f"--internal-tls-cert .*{msg}"):
            internal_tls.check(str(tmp_path / "ca.pem"), str(tmp_path / f"{name}.pem"), str(tmp_path / f"{name}-key.pem"))


def test_certificate_of_another_ca(certs, tmp_path):
    (tmp_path / "other-ca.pem").write_bytes(_pem(make_ca("another CA")[0]))
    with pytest.raises(ConfigError, match="not signed by --internal-tls-ca"):
        internal_tls.check(str(tmp_path / "other-ca.pem"), str(certs["cert"]), str(certs["key"]))


def test_settings_go_together_and_bad_files_stop_the_service(certs, tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        config.resolve(config.COMPILER, {"internal_tls_ca": str(certs["ca"])}, env={})
    assert internal_tls.from_settings(config.resolve(config.COMPILER, {}, env={})) is None
    bad = config.resolve(config.COMPILER, {"internal_tls_ca": str(certs["ca"]), "internal_tls_cert": str(certs["cert"]),
                                           "internal_tls_key": str(tmp_path / "missing.pem")}, env={})
    with pytest.raises(RuntimeError, match="internal TLS: --internal-tls-key"):
        internal_tls.from_settings(bad)


def _settings(paths, server_name: str = ""):
    return config.resolve(config.GATEWAY, {"internal_tls_ca": str(paths["ca"]), "internal_tls_cert": str(paths["cert"]),
                                           "internal_tls_key": str(paths["key"]),
                                           "internal_tls_server_name": server_name}, env={})


async def _check(address: str, tls) -> grpc.StatusCode | None:
    async with internal_tls.channel(address, tls) as ch:
        try:
            await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return None


def test_mtls_server_refuses_clients_without_an_internal_certificate(certs, tmp_path):
    server_tls = internal_tls.from_settings(_settings(certs))
    other = write_set(tmp_path / "other", ["127.0.0.1"])

    async def run():
        server = create_server()
        health = add_health_and_reflection(server, [])
        port = bind(server, "127.0.0.1", 0, internal=server_tls)
        await server.start()
        await set_serving(health, [], True)
        addr = f"127.0.0.1:{port}"
        try:
            ok = await _check(addr, server_tls)
            plaintext = await _check(addr, None)
            # right CA to check the server, but no client certificate
            async with grpc.aio.secure_channel(addr, grpc.ssl_channel_credentials(certs["ca"].read_bytes())) as ch:
                try:
                    await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
                    no_cert = None
                except grpc.aio.AioRpcError as exc:
                    no_cert = exc.code()
            foreign = await _check(addr, internal_tls.from_settings(_settings(other)))
            # the server presents a certificate without the name this client expects
            wrong_name = await _check(addr, internal_tls.from_settings(_settings(certs, "compiler.internal")))
            return ok, plaintext, no_cert, foreign, wrong_name
        finally:
            await server.stop(None)

    ok, plaintext, no_cert, foreign, wrong_name = asyncio.run(run())
    assert ok is None
    assert plaintext == grpc.StatusCode.UNAVAILABLE
    assert no_cert == grpc.StatusCode.UNAVAILABLE
    assert foreign == grpc.StatusCode.UNAVAILABLE
    assert wrong_name == grpc.StatusCode.UNAVAILABLE
