"""The gateway's admission policy: who may use which model, and what a request must be before it
is queued (name syntax, field limits, validation, seed, deadline, tenant, a live replica).

The servicer converts protos and calls these; nothing here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import re
import secrets
import uuid
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from shared import catalog
from shared.catalog import Alias, ReplicaHeartbeat
from shared.errors import InvalidArgument, NotFound, Unavailable, shown
from shared.generation import SEED_LIMIT, GenRequest, validate
from shared.model_registry import LEGACY, ModelAccess, ModelRegistry, check_name
from shared.tenancy import Caller

MAX_REQUEST_ID = 128
MAX_ID = 128  # job, build and upload ids the gateway relays
_CURSOR = re.compile(r"\d{1,20}-\d{1,20}")


def check_request_id(rid: str, field_name: str = "request_id") -> str:
    if len(rid) > MAX_REQUEST_ID or any(c.isspace() or not c.isprintable() for c in rid):
        raise InvalidArgument(f"{field_name}: at most {MAX_REQUEST_ID} printable characters, no spaces")
    return rid


def request_id(explicit: str, metadata_id: str) -> str:
    """The client's id (field, else x-request-id metadata), checked; a fresh one when it sent none."""
    return check_request_id(explicit or metadata_id) or uuid.uuid4().hex


def check_resume(rid_given: str, cursor: str) -> None:
    if not rid_given or not _CURSOR.fullmatch(cursor):
        raise InvalidArgument("resume_cursor: needs the request_id and a cursor from one of its chunks")


def check_id(value: str, field_name: str) -> str:
    """An opaque id relayed to the compiler: bounded, so an error that echoes it stays small."""
    if len(value) > MAX_ID:
        raise InvalidArgument(f"{field_name}: at most {MAX_ID} characters")
    return value


def unknown_model(name: str) -> NotFound:
    """The one answer for a name that does not exist and for one the caller may not use."""
    return NotFound(f"model {shown(name)} not found; `llamaship models` lists what you may use")


async def access_of(registry: ModelRegistry, name: str, caller: Caller) -> ModelAccess:
    """The model's access record, if the caller may see it (generate from it); else NOT_FOUND."""
    check_name(name)
    access = await registry.access(name)
    if access is None or not access.may_generate(caller):
        raise unknown_model(name)
    return access


class Admission:
    def __init__(self, r: aioredis.Redis, registry: ModelRegistry):
        self.r = r
        self.registry = registry

    async def admit(self, req: GenRequest, caller: Caller, time_remaining: float | None) -> Alias:
        """Check and complete `req` for the queue; returns the alias it is served under."""
        check_name(req.model)
        (alias, replicas), access = await asyncio.gather(
            catalog.alias_and_replicas(self.r, req.model), self.registry.access(req.model))
        if alias is None or not (access or LEGACY).may_generate(caller):
            raise unknown_model(req.model)
        validate(req, alias.context_length)
        req.tenant = caller.tenant
        if not req.greedy and req.seed is None:
            # A fixed seed makes a sampled stream replayable: a replica that takes it over after
            # a failure continues it exactly.
            req.seed = secrets.randbelow(SEED_LIMIT)
        if time_remaining is not None:
            req.deadline_s = max(0.0, time_remaining)
        if not any(hb.pool == alias.pool for hb in replicas):
            raise Unavailable(f"no live replica in the {alias.pool} pool; the request may be retried")
        return alias


@dataclass
class ModelView:
    """A published model as one caller may see it."""

    alias: Alias
    access: ModelAccess
    served_build_ids: list[str] = field(default_factory=list)
    replicas: list[ReplicaHeartbeat] = field(default_factory=list)  # admins only


def visible_models(aliases: list[Alias], access: dict[str, ModelAccess], replicas: list[ReplicaHeartbeat],
                   caller: Caller) -> list[ModelView]:
    """The models `caller` may generate from, with the builds live replicas serve under each name.
    Replica ids, addresses and loads are internals, for admins only."""
    out = []
    for a in aliases:
        acc = access.get(a.name, LEGACY)
        if not acc.may_generate(caller):
            continue
        serving = [hb for hb in replicas if a.name in hb.builds]
        out.append(ModelView(a, acc, sorted({hb.builds[a.name] for hb in serving}),
                             serving if caller.admin else []))
    return out
