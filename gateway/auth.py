"""API keys per tenant, stored hashed, with scopes; checked by a gateway interceptor.

Keys file (JSON), written by `llamaship keys create`:
    {"tenants": {"acme": {"scopes": ["generate"], "keys": ["<sha256 hex of the key>", ...]}}}

A client sends `authorization: Bearer <key>`. Keys are never logged or stored in clear.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc

SCOPES = ("generate", "compile", "admin")
_SERVICE = "/llamaship.gateway.v1.Gateway/"
METHOD_SCOPES: dict[str, str | None] = {
    _SERVICE + "Generate": "generate",
    _SERVICE + "CancelGeneration": "generate",
    _SERVICE + "SubmitCompile": "compile",
    _SERVICE + "WatchCompile": "compile",
    _SERVICE + "CancelCompile": "compile",
    _SERVICE + "ListModels": None,  # any valid key
}


class KeysFileError(ValueError):
    pass


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class Tenant:
    name: str
    scopes: frozenset[str]

    def allows(self, scope: str | None) -> bool:
        return scope is None or "admin" in self.scopes or scope in self.scopes


class KeyStore:
    def __init__(self, by_hash: dict[str, Tenant]):
        self.by_hash = by_hash

    @classmethod
    def load(cls, path: str | Path) -> "KeyStore":
        try:
            data = json.loads(Path(path).read_text())
            tenants = data["tenants"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise KeysFileError(f"cannot read API keys file {path}: {exc}") from None
        by_hash = {}
        for name, t in tenants.items():
            scopes = frozenset(t.get("scopes", []))
            unknown = scopes - set(SCOPES)
            if unknown:
                raise KeysFileError(f"tenant {name}: unknown scopes {sorted(unknown)}; known: {', '.join(SCOPES)}")
            for h in t.get("keys", []):
                by_hash[h] = Tenant(name, scopes)
        return cls(by_hash)

    def tenant_for(self, key: str) -> Tenant | None:
        h = hash_key(key)
        for known, tenant in self.by_hash.items():
            if hmac.compare_digest(known, h):
                return tenant
        return None


def create_key(path: str | Path, tenant: str, scopes: list[str]) -> str:
    """Add a new key for `tenant` to the keys file (created if missing); returns the key."""
    bad = set(scopes) - set(SCOPES)
    if bad or not scopes:
        raise KeysFileError(f"scopes must be some of {', '.join(SCOPES)}")
    p = Path(path)
    data = json.loads(p.read_text()) if p.exists() else {"tenants": {}}
    key = f"lsk_{secrets.token_urlsafe(32)}"
    entry = data["tenants"].setdefault(tenant, {"scopes": [], "keys": []})
    entry["scopes"] = sorted(set(entry["scopes"]) | set(scopes))
    entry["keys"].append(hash_key(key))
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.chmod(0o600)
    tmp.replace(p)
    return key


def _bearer(metadata) -> str:
    for k, v in metadata or ():
        if k == "authorization" and isinstance(v, str) and v.startswith("Bearer "):
            return v[len("Bearer "):].strip()
    return ""


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Rejects gateway calls without a valid key (UNAUTHENTICATED) or the scope (PERMISSION_DENIED).
    Health and reflection stay open."""

    def __init__(self, keys: KeyStore):
        self.keys = keys

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method = details.method
        if method not in METHOD_SCOPES:
            return await continuation(details)
        key = _bearer(details.invocation_metadata)
        tenant = self.keys.tenant_for(key) if key else None
        if tenant is None:
            return _deny(grpc.StatusCode.UNAUTHENTICATED,
                         "missing or unknown API key (send 'authorization: Bearer <key>')", method)
        scope = METHOD_SCOPES[method]
        if not tenant.allows(scope):
            return _deny(grpc.StatusCode.PERMISSION_DENIED, f"tenant {tenant.name} lacks the '{scope}' scope", method)
        return await continuation(details)


def _deny(code: grpc.StatusCode, message: str, method: str) -> grpc.RpcMethodHandler:
    async def unary(request, context):
        await context.abort(code, message)

    async def stream(request, context):
        await context.abort(code, message)
        yield  # pragma: no cover - makes this an async generator

    streaming = method.endswith(("/Generate", "/WatchCompile"))
    if streaming:
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)
