"""Service-to-service mTLS: every service serves with its internal certificate and requires one from
the internal CA; every internal client presents its certificate and checks the server's against the CA.

Configured by the INTERNAL_TLS settings (shared/config.py); none given means plaintext. The files are
read and checked once, at start-up: a missing or unreadable file, a key that is not the certificate's,
a certificate outside its validity period or not signed by the CA stops the service with a message.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from shared.config import ConfigError, Settings


@dataclass(frozen=True)
class InternalTLS:
    ca: bytes
    cert: bytes
    key: bytes
    server_name: str = ""  # the SAN peers must carry; empty = the host of the address called

    def server_credentials(self) -> grpc.ServerCredentials:
        return grpc.ssl_server_credentials([(self.key, self.cert)], root_certificates=self.ca,
                                           require_client_auth=True)

    def channel_credentials(self) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials(self.ca, self.key, self.cert)

    def channel_options(self) -> list[tuple[str, str]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def _read(flag: str, path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot read ({exc.strerror or exc})") from None


def _certs(flag: str, path: str, data: bytes) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        certs = []
    if not certs:
        raise ConfigError(f"{flag} {path}: no PEM certificate in it")
    return certs


def _signed_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    pub = issuer.public_key()
    try:
        if isinstance(pub, rsa.RSAPublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
        elif isinstance(pub, ec.EllipticCurvePublicKey):
            pub.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
        else:
            pub.verify(cert.signature, cert.tbs_certificate_bytes)  # Ed25519 / Ed448
    except InvalidSignature:
        return False
    return True


def _check_validity(flag: str, path: str, cert: x509.Certificate, now: dt.datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise ConfigError(f"{flag} {path}: certificate {cert.subject.rfc4514_string()} expired on "
                          f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")
    if now < cert.not_valid_before_utc:
        raise ConfigError(f"{flag} {path}: certificate {cert.subject.rfc4514_string()} is not valid before "
                          f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC")


def check(ca_path: str, cert_path: str, key_path: str, now: dt.datetime | None = None) -> tuple[bytes, bytes, bytes]:
    """Read and check the three files; returns their bytes (ca, cert, key) or raises ConfigError."""
    now = now or dt.datetime.now(dt.timezone.utc)
    ca_pem, cert_pem, key_pem = (_read("--internal-tls-ca", ca_path), _read("--internal-tls-cert", cert_path),
                                 _read("--internal-tls-key", key_path))
    cas = _certs("--internal-tls-ca", ca_path, ca_pem)
    chain = _certs("--internal-tls-cert", cert_path, cert_pem)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"--internal-tls-key {key_path}: not an unencrypted PEM private key ({exc})") from None
    leaf = chain[0]
    if key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo) != \
            leaf.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo):
        raise ConfigError(f"--internal-tls-key {key_path} is not the key of --internal-tls-cert {cert_path}")
    _check_validity("--internal-tls-cert", cert_path, leaf, now)
    for ca in cas:
        _check_validity("--internal-tls-ca", ca_path, ca, now)
    # The leaf must chain to one of the CAs, through the intermediates its file carries.
    cert, seen = leaf, 0
    while not any(_signed_by(cert, ca) for ca in cas):
        parent = next((c for c in chain[1:] if _signed_by(cert, c)), None)
        seen += 1
        if parent is None or seen > len(chain):
            raise ConfigError(f"--internal-tls-cert {cert_path}: not signed by --internal-tls-ca {ca_path} "
                              f"(issuer {cert.issuer.rfc4514_string()})")
        cert = parent
    return ca_pem, cert_pem, key_pem


def from_settings(settings: Settings) -> InternalTLS | None:
    """The service's internal TLS, checked (RuntimeError, which stops the service, if bad); None when
    not configured (plaintext)."""
    if not getattr(settings, "internal_tls_ca", ""):
        return None
    try:
        ca, cert, key = check(settings.internal_tls_ca, settings.internal_tls_cert, settings.internal_tls_key)
    except ConfigError as exc:
        raise RuntimeError(f"internal TLS: {exc}") from None
    return InternalTLS(ca, cert, key, settings.internal_tls_server_name)


def channel(address: str, tls: InternalTLS | None, options: list[tuple[str, object]] | None = None) -> grpc.aio.Channel:
    """A grpc.aio channel to another service: mTLS when configured, else plaintext."""
    opts = list(options or [])
    if tls is None:
        return grpc.aio.insecure_channel(address, options=opts)
    return grpc.aio.secure_channel(address, tls.channel_credentials(), options=opts + tls.channel_options())
