"""Every Redis key and stream Llamaship uses, in one place.

Aliases       HASH   ls:aliases                 model name -> JSON alias record
Model access  HASH   ls:models:access           model name -> JSON {owner, readers} (shared.model_registry)
Announce      STREAM ls:announce                one entry per publish (name, build_id, pool)
Replicas      HASH   ls:replicas                replica id -> JSON heartbeat (pool, builds, slots, ts)
Gen queue     STREAM ls:gen:{pool}:{prio}:{tenant}  requests of one tenant at one priority; group "replicas"
Gen streams   SET    ls:genidx:{pool}           the pool's queue streams
Tenant ring   LIST   ls:genring:{pool}:{prio}   tenants with waiting requests, in round-robin order
Doorbell      STREAM ls:genbell:{pool}          one entry per enqueue: wakes idle replicas
Responses     STREAM ls:resp:{request_id}       chunks a replica produced for one request
Cancel flag   STRING ls:cancel:{request_id}     set when the client went away or cancelled
Stream owner  STRING ls:owner:{request_id}      the replica allowed to write the response stream
Request claim STRING ls:rid:{request_id}        a request id in use (not reused for 10 minutes): tenant, stream, entry
Relay lease   STRING ls:relay:{request_id}      a gateway relays the request's stream (expires when none does)
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


def gen_streams(pool: str) -> str:
    return f"{PREFIX}genidx:{pool}"


def gen_tenant_ring(pool: str, priority: str) -> str:
    return f"{PREFIX}genring:{pool}:{priority}"


def gen_doorbell(pool: str) -> str:
    return f"{PREFIX}genbell:{pool}"


def response_stream(request_id: str) -> str:
    return f"{PREFIX}resp:{request_id}"


def cancel_flag(request_id: str) -> str:
    return f"{PREFIX}cancel:{request_id}"


def request_claim(request_id: str) -> str:
    return f"{PREFIX}rid:{request_id}"


def relay_lease(request_id: str) -> str:
    return f"{PREFIX}relay:{request_id}"


def stream_owner(request_id: str) -> str:
    return f"{PREFIX}owner:{request_id}"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:cancel"
