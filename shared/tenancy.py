"""Who is calling: the tenant of the request's API key and whether the key is an admin's.

The gateway authenticates the caller and passes its identity to the compiler as metadata on
every call it proxies (the compiler is internal: only gateways reach it). A call that carries no
identity comes from inside the deployment, or from a gateway without API keys, where everyone is
the `default` tenant with every right.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_TENANT = "default"
TENANT_HEADER = "x-llamaship-tenant"
ADMIN_HEADER = "x-llamaship-admin"


@dataclass(frozen=True)
class Caller:
    tenant: str = DEFAULT_TENANT
    admin: bool = True

    def owns(self, owner: str) -> bool:
        """May act on an object `owner` holds: its own, or any as an admin."""
        return self.admin or owner == self.tenant

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return ((TENANT_HEADER, self.tenant), (ADMIN_HEADER, "1" if self.admin else "0"))


OPEN = Caller(DEFAULT_TENANT, True)  # no API keys configured: one tenant, every right


def caller_from_metadata(metadata) -> Caller:
    """The identity a gateway attached to a proxied call; none at all means an internal caller."""
    md = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    if TENANT_HEADER not in md:
        return OPEN
    return Caller(md[TENANT_HEADER], md.get(ADMIN_HEADER) == "1")
