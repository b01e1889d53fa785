"""Every Redis key and stream Llamaship uses, in one place.

Aliases       HASH   ls:aliases                 model name -> JSON alias record
Model access  HASH   ls:models:access           model name -> JSON {owner, readers} (shared.model_registry)
Announce      STREAM ls:announce                one entry per publish (name, build_id, pool)
Replicas      HASH   ls:replicas                replica id -> JSON heartbeat (pool, address, builds, slots)
Replica alive STRING ls:alive:{replica_id}      exists while the replica is live: set with a TTL on each heartbeat
Gen queue     STREAM ls:gen:{pool}:{prio}:{tenant}  requests of one tenant at one priority; group "replicas"
Gen streams   SET    ls:genidx:{pool}           the pool's queue streams
Tenant ring   LIST   ls:genring:{pool}:{prio}   tenants with waiting requests, in round-robin order
Doorbell      STREAM ls:genbell:{pool}          one entry per enqueue: wakes idle replicas
Responses     STREAM ls:resp:{sid}              chunks a replica produced for one request
Cancel flag   STRING ls:cancel:{sid}            set when the client went away or cancelled (only while in flight)
Stream owner  STRING ls:owner:{sid}             the replica allowed to write the response stream
Request claim STRING ls:rid:{sid}               a request id in use (not reused for 10 minutes): stream, entry
Relay lease   STRING ls:relay:{sid}             a gateway relays the request's stream (expires when none does)
  {sid}: the scoped request id, "<tenant part>:<client request id>" (request_scope): tenants
  never share request ids. The protocol around these keys lives in shared.request_protocol.
Jobs          STRING ls:job:{job_id}            one compile job's state (JSON)
Job events    STREAM ls:job:{job_id}:events     progress of one compile job
Job cancel  STRING ls:job:{job_id}:cancel      set when a running job should stop
Job index     ZSET   ls:jobs                    job ids by creation time
Job queue     LIST   ls:compile:queue           job ids waiting for a compiler worker
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "ls:"
ALIASES = PREFIX + "aliases"
MODEL_ACCESS = PREFIX + "models:access"
ANNOUNCE = PREFIX + "announce"
REPLICAS = PREFIX + "replicas"
JOBS_INDEX = PREFIX + "jobs"
COMPILE_QUEUE = PREFIX + "compile:queue"
GEN_GROUP = "replicas"
ANNOUNCE_MAXLEN = 1000
RESPONSE_TTL_S = 600
CANCEL_TTL_S = 600


_TENANT_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,64}")


def tenant_part(tenant: str) -> str:
    """A tenant name as it appears in keys: itself when short and plain, else a digest."""
    if _TENANT_SAFE.fullmatch(tenant):
        return tenant
    return "h-" + hashlib.sha256(tenant.encode()).hexdigest()[:24]


def gen_stream(pool: str, priority: str, tenant: str) -> str:
    """The queue stream of one tenant at one priority ("" tenant: the prefix of all of them)."""
    return f"{PREFIX}gen:{pool}:{priority}:{tenant_part(tenant) if tenant else ''}"


def gen_stream_tenant_suffix(tenant: str) -> str:
    return ":" + tenant_part(tenant)


def gen_stream_priority(stream: str) -> str:
    return stream.split(":")[3]


def gen_stream_pool(stream: str) -> str:
    return stream.split(":")[2]


def gen_stream_tenant(stream: str) -> str:
    """The tenant key part of a queue stream."""
    return stream.split(":", 4)[4]


def request_scope(tenant: str, request_id: str) -> str:
    """The id a request's keys use: the client's id inside its tenant's namespace (the tenant
    part never holds a colon, so the two cannot be confused)."""
    return f"{tenant_part(tenant)}:{request_id}"


def replica_alive(replica_id: str) -> str:
    return f"{PREFIX}alive:{replica_id}"


def gen_streams(pool: str) -> str:
    return f"{PREFIX}genidx:{pool}"


def gen_tenant_ring(pool: str, priority: str) -> str:
    return f"{PREFIX}genring:{pool}:{priority}"


def gen_doorbell(pool: str) -> str:
    return f"{PREFIX}genbell:{pool}"


def response_stream(sid: str) -> str:
    return f"{PREFIX}resp:{sid}"


def cancel_flag(sid: str) -> str:
    return f"{PREFIX}cancel:{sid}"


def request_claim(sid: str) -> str:
    return f"{PREFIX}rid:{sid}"


def relay_lease(sid: str) -> str:
    return f"{PREFIX}relay:{sid}"


def stream_owner(sid: str) -> str:
    return f"{PREFIX}owner:{sid}"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:cancel"
