"""API keys per tenant, stored hashed, with scopes; checked by a gateway interceptor.

Keys file (JSON), written by `llamaship keys create`; each key has its own scopes:
    {"tenants": {"acme": {"keys": [{"sha256": "<hex of the key>", "scopes": ["generate"]}, ...]}}}

A client sends `authorization: Bearer <key>`. Keys are never logged or stored in clear.
"""

from __future__ import annotations

import hashlib
import json
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

import grpc

from shared.errors import PermissionDenied
from shared.tenancy import OPEN, Caller

SCOPES = ("generate", "compile", "admin")
_SERVICE = "/llamaship.gateway.v1.Gateway/"
METHOD_SCOPES: dict[str, str | None] = {
    _SERVICE + "Generate": "generate",
    _SERVICE + "CancelGeneration": "generate",
    _SERVICE + "SubmitCompile": "compile",
    _SERVICE + "WatchCompile": "compile",
    _SERVICE + "CancelCompile": "compile",
    _SERVICE + "GetBuild": "compile",
    _SERVICE + "CreateUpload": "compile",
    _SERVICE + "UploadFiles": "compile",
    _SERVICE + "GetUpload": "compile",
    _SERVICE + "SetPromptSampling": "admin",
    _SERVICE + "GetPromptSampling": "admin",
    _SERVICE + "ListModels": None,  # any valid key
    _SERVICE + "SetModelAccess": "compile",
    _SERVICE + "DeleteModel": "compile",
}


STREAMING_METHODS = frozenset({_SERVICE + "Generate", _SERVICE + "WatchCompile"})
CLIENT_STREAMING_METHODS = frozenset({_SERVICE + "UploadFiles"})


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
        by_hash = {}
        try:
            for name, t in _read(Path(path))["tenants"].items():
                for k in t["keys"]:
                    scopes = frozenset(k["scopes"])
                    unknown = scopes - set(SCOPES)
                    if unknown:
                        raise KeysFileError(f"tenant {name}: unknown scopes {sorted(unknown)}; known: {', '.join(SCOPES)}")
                    by_hash[k["sha256"]] = Tenant(name, scopes)
        except (KeyError, TypeError, AttributeError) as exc:
            raise KeysFileError(f"API keys file {path} is malformed ({exc!r})") from None
        return cls(by_hash)

    def tenant_for(self, key: str) -> Tenant | None:
        # the lookup is by hash, so its timing says nothing about the key
        return self.by_hash.get(hash_key(key))


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise KeysFileError(f"cannot read API keys file {path}: {exc}") from None


def create_key(path: str | Path, tenant: str, scopes: list[str]) -> str:
    """Add a new key for `tenant` to the keys file (created if missing); returns the key."""
    bad = set(scopes) - set(SCOPES)
    if bad or not scopes:
        raise KeysFileError(f"scopes must be some of {', '.join(SCOPES)}")
    p = Path(path)
    data = _read(p) if p.exists() else {"tenants": {}}
    key = f"lsk_{secrets.token_urlsafe(32)}"
    try:
        data["tenants"].setdefault(tenant, {"keys": []})["keys"].append(
            {"sha256": hash_key(key), "scopes": sorted(set(scopes))})
    except (KeyError, TypeError, AttributeError) as exc:
        raise KeysFileError(f"API keys file {path} is malformed ({exc!r})") from None
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.chmod(0o600)
    tmp.replace(p)
    return key


def bearer_key(metadata) -> str:
    for k, v in metadata or ():
        if k == "authorization" and isinstance(v, str) and v.startswith("Bearer "):
            return v[len("Bearer "):].strip()
    return ""


def caller_for(keys: KeyStore | None, metadata) -> Caller:
    """Who calls: the tenant of the key (admin when the key has the admin scope); without API
    keys configured, everyone is the one open tenant with every right."""
    if keys is None:
        return OPEN
    tenant = keys.tenant_for(bearer_key(metadata))
    if tenant is None:  # the interceptor turns these away first
        raise PermissionDenied("missing or unknown API key")
    return Caller(tenant.name, admin="admin" in tenant.scopes)


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
            if method.startswith(_SERVICE):  # a Gateway method nobody gave a scope: closed, not open
                return _deny(grpc.StatusCode.PERMISSION_DENIED, "method not authorised", method)
            return await continuation(details)
        key = bearer_key(details.invocation_metadata)
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

    if method in STREAMING_METHODS:
        return grpc.unary_stream_rpc_method_handler(stream)
    if method in CLIENT_STREAMING_METHODS:
        return grpc.stream_unary_rpc_method_handler(unary)
    return grpc.unary_unary_rpc_method_handler(unary)
