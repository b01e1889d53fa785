"""Model names: their syntax, their owner tenant, who may generate from them, and publishing.

Redis: `ls:aliases` (name -> alias JSON, shared.catalog) and `ls:models:access` (name -> JSON
{"owner": tenant, "readers": [tenant, ...]}). The first tenant whose compile names a model owns
the name; only the owner or an admin may publish under it, change who may generate from it, or
delete it. The owner and admins always may generate from it; `readers` lists other tenants ("*":
every tenant). A name published before owners existed (no access record) is managed by admins
only and open to every tenant, as it was.
"""

from __future__ import annotations

import json
import re
import unicodedata
from dataclasses import dataclass, field

import redis.asyncio as aioredis

from shared import redis_keys as keys
from shared.catalog import Alias
from shared.errors import InvalidArgument, NotFound, PermissionDenied, shown
from shared.tenancy import Caller

MAX_NAME = 64
MAX_READERS = 64
EVERYONE = "*"
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._:-]{0,%d}[A-Za-z0-9])?" % (MAX_NAME - 2))
_TENANT = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def check_name(name: str, field_name: str = "model") -> str:
    """A model name: 1-64 ASCII letters, digits and . _ : - , starting and ending with a letter or
    digit. Anything else (look-alike letters, full-width forms, '.', '..') is refused, not mapped."""
    if not name:
        raise InvalidArgument(f"{field_name}: required")
    if len(name) > MAX_NAME or unicodedata.normalize("NFKC", name) != name or not _NAME.fullmatch(name):
        raise InvalidArgument(f"{field_name}: {shown(name)} is not a model name: 1-{MAX_NAME} ASCII letters, digits "
                              "and . _ : - , starting and ending with a letter or digit")
    return name


@dataclass(frozen=True)
class ModelAccess:
    owner: str
    readers: tuple[str, ...] = field(default_factory=tuple)

    def may_generate(self, caller: Caller) -> bool:
        return caller.owns(self.owner) or EVERYONE in self.readers or caller.tenant in self.readers

    def to_json(self) -> str:
        return json.dumps({"owner": self.owner, "readers": list(self.readers)})

    @classmethod
    def from_json(cls, text: str) -> "ModelAccess":
        data = json.loads(text)
        return cls(str(data.get("owner", "")), tuple(str(t) for t in data.get("readers") or ()))


LEGACY = ModelAccess(owner="", readers=(EVERYONE,))  # published before owners existed


def check_readers(readers: list[str]) -> tuple[str, ...]:
    if len(readers) > MAX_READERS:
        raise InvalidArgument(f"readers: at most {MAX_READERS} tenants")
    for t in readers:
        if t != EVERYONE and not _TENANT.fullmatch(t):
            raise InvalidArgument(f"readers: {shown(t)} is not a tenant name")
    return tuple(sorted(set(readers)))


# KEYS: access hash, alias hash. ARGV: name, tenant, admin "1"/"0", new record json.
# Returns the record that holds after the call, or "DENIED".
_CLAIM = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  local rec = cjson.decode(raw)
  if rec['owner'] == ARGV[2] or ARGV[3] == '1' then return raw end
  return 'DENIED'
end
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 and ARGV[3] ~= '1' then return 'DENIED' end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[4])
return ARGV[4]
"""

# KEYS: access hash, alias hash, announce stream. ARGV: name, tenant, admin, alias json, build id,
# pool, announce maxlen, new access record json (if the name has none).
_PUBLISH = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
if raw then
  if cjson.decode(raw)['owner'] ~= ARGV[2] and ARGV[3] ~= '1' then return 'DENIED' end
elseif redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  if ARGV[3] ~= '1' then return 'DENIED' end
else
  redis.call('HSET', KEYS[1], ARGV[1], ARGV[8])
end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[4])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[7], '*', 'name', ARGV[1], 'build_id', ARGV[5], 'pool', ARGV[6])
return 'OK'
"""

# KEYS: access hash, alias hash, announce stream. ARGV: name, tenant, admin, announce maxlen.
# The announcement of a deletion carries an empty build id: replicas of the pool stop serving the name.
_DELETE = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local published = redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1
if not raw and not published then return 'MISSING' end
local owner = ''
if raw then owner = cjson.decode(raw)['owner'] end
if owner ~= ARGV[2] and ARGV[3] ~= '1' then return 'DENIED' end
local pool = ''
if published then pool = cjson.decode(redis.call('HGET', KEYS[2], ARGV[1]))['pool'] or '' end
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[4], '*', 'name', ARGV[1], 'build_id', '', 'pool', pool)
return 'OK'
"""

# KEYS: access hash, alias hash. ARGV: name, tenant, admin, readers json.
_SET_READERS = """
local raw = redis.call('HGET', KEYS[1], ARGV[1])
local rec
if raw then
  rec = cjson.decode(raw)
  if rec['owner'] ~= ARGV[2] and ARGV[3] ~= '1' then return 'DENIED' end
elseif redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then
  if ARGV[3] ~= '1' then return 'DENIED' end
  rec = {owner = ARGV[2]}
else
  return 'MISSING'
end
rec['readers'] = cjson.decode(ARGV[4])
local out = cjson.encode(rec)
redis.call('HSET', KEYS[1], ARGV[1], out)
return out
"""


def _denied(name: str, caller: Caller) -> PermissionDenied:
    return PermissionDenied(f"model {shown(name)} belongs to another tenant; tenant {shown(caller.tenant)} may not change it")


class ModelRegistry:
    def __init__(self, r: aioredis.Redis):
        self.r = r
        self._claim = r.register_script(_CLAIM)
        self._publish = r.register_script(_PUBLISH)
        self._delete = r.register_script(_DELETE)
        self._set_readers = r.register_script(_SET_READERS)

    async def access(self, name: str) -> ModelAccess | None:
        """The access record of a published or claimed name (LEGACY for an old alias), or None."""
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hget(keys.MODEL_ACCESS, name)
            pipe.hexists(keys.ALIASES, name)
            raw, published = await pipe.execute()
        if raw:
            return ModelAccess.from_json(raw)
        return LEGACY if published else None

    async def all_access(self) -> dict[str, ModelAccess]:
        return {name: ModelAccess.from_json(raw) for name, raw in (await self.r.hgetall(keys.MODEL_ACCESS)).items()}

    async def claim(self, name: str, caller: Caller) -> ModelAccess:
        """Make `caller` the owner of a new name, or check it may publish under an existing one."""
        check_name(name, "model_name")
        out = await self._claim(keys=[keys.MODEL_ACCESS, keys.ALIASES],
                                args=[name, caller.tenant, "1" if caller.admin else "0",
                                      ModelAccess(caller.tenant).to_json()])
        if out == "DENIED":
            raise _denied(name, caller)
        return ModelAccess.from_json(out)

    async def publish(self, alias: Alias, caller: Caller) -> None:
        """Point the name at the build and announce it, if `caller` may (checked in the same step)."""
        out = await self._publish(
            keys=[keys.MODEL_ACCESS, keys.ALIASES, keys.ANNOUNCE],
            args=[alias.name, caller.tenant, "1" if caller.admin else "0", alias.to_json(), alias.build_id, alias.pool,
                  keys.ANNOUNCE_MAXLEN, ModelAccess(caller.tenant).to_json()])
        if out == "DENIED":
            raise _denied(alias.name, caller)

    async def set_readers(self, name: str, readers: list[str], caller: Caller) -> ModelAccess:
        check_name(name)
        out = await self._set_readers(keys=[keys.MODEL_ACCESS, keys.ALIASES],
                                      args=[name, caller.tenant, "1" if caller.admin else "0",
                                            json.dumps(list(check_readers(readers)))])
        if out == "DENIED":
            raise _denied(name, caller)
        if out == "MISSING":
            raise NotFound(f"model {shown(name)} not found")
        return ModelAccess.from_json(out)

    async def delete(self, name: str, caller: Caller) -> None:
        check_name(name)
        out = await self._delete(keys=[keys.MODEL_ACCESS, keys.ALIASES, keys.ANNOUNCE],
                                 args=[name, caller.tenant, "1" if caller.admin else "0", keys.ANNOUNCE_MAXLEN])
        if out == "DENIED":
            raise _denied(name, caller)
        if out == "MISSING":
            raise NotFound(f"model {shown(name)} not found")
