"""Every Redis key and stream Llamaship uses, in one place.

Every key one Lua script, MULTI/EXEC or multi-key command touches shares one hash slot, so the
same code runs on one server, behind Sentinel and on Redis Cluster: the part in {braces} is the
key's hash tag (Redis Cluster hashes only that part).

Catalog (slot {catalog}):
Aliases       HASH   ls:{catalog}:aliases            model name -> JSON alias record
Model access  HASH   ls:{catalog}:models:access      model name -> JSON {owner, readers} (shared.model_registry)
Announce      STREAM ls:{catalog}:announce           one entry per publish (name, build_id, pool)
Replicas (slot {replicas}):
Replicas      HASH   ls:{replicas}:replicas          replica id -> JSON heartbeat (pool, address, builds, slots)
Replica alive STRING ls:{replicas}:alive:<replica>   exists while the replica is live: set with a TTL on each heartbeat
One pool's queue (slot {pool:<pool>}):
Gen queue     STREAM ls:{pool:<pool>}:gen:<prio>:<tenant>  requests of one tenant at one priority; group "replicas"
Gen streams   SET    ls:{pool:<pool>}:genidx         the pool's queue streams
Tenant ring   LIST   ls:{pool:<pool>}:genring:<prio> tenants with waiting requests, in round-robin order
Doorbell      STREAM ls:{pool:<pool>}:genbell        one entry per enqueue: wakes idle replicas
Room          HASH   ls:{pool:<pool>}:room           replica -> "<free slots> <valid until ms>" (prefix routing)
Last acked    STRING ls:{pool:<pool>}:acked          the last enqueue WAITed for (on Redis Cluster: a write to WAIT on)
One request (slot {req:<sid>}):
Request claim STRING ls:{req:<sid>}:rid              a request id in use (not reused for 10 minutes): stream, entry
Responses     STREAM ls:{req:<sid>}:resp             chunks a replica produced for one request
Cancel flag   STRING ls:{req:<sid>}:cancel           set when the client went away or cancelled (only while in flight)
Stream owner  STRING ls:{req:<sid>}:owner            the replica allowed to write the response stream
Relay lease   STRING ls:{req:<sid>}:relay            a gateway relays the request's stream (expires when none does)
  <sid>: the scoped request id, "<tenant part>:<client request id>" (request_scope): tenants
  never share request ids. The protocol around these keys lives in shared.request_protocol.
Compile jobs (slot {jobs}: the queue, the index and every job's keys change together):
Jobs          STRING ls:{jobs}:job:<job_id>          one compile job's state (JSON)
Job events    STREAM ls:{jobs}:job:<job_id>:events   progress of one compile job
Job cancel    STRING ls:{jobs}:job:<job_id>:cancel   set when a running job should stop
Job index     ZSET   ls:{jobs}:index                 job ids by creation time
Job queue     LIST   ls:{jobs}:compile:queue         job ids waiting for a compiler worker
Prompt samples (slot {model:<model>}):
Sampling      STRING ls:{model:<model>}:sampling     sampling settings of one model
Samples       LIST   ls:{model:<model>}:samples      kept prompts (and ...:samples:seen, the count considered)

Key names changed in version 2 of this layout (hash tags): see the README, "Redis at scale",
for what an upgrade across it requires.
"""

from __future__ import annotations

import hashlib
import re

PREFIX = "ls:"
LAYOUT_VERSION = 2
CATALOG = PREFIX + "{catalog}:"
ALIASES = CATALOG + "aliases"
MODEL_ACCESS = CATALOG + "models:access"
ANNOUNCE = CATALOG + "announce"
REPLICAS_SLOT = PREFIX + "{replicas}:"
REPLICAS = REPLICAS_SLOT + "replicas"
JOBS_SLOT = PREFIX + "{jobs}:"
JOBS_INDEX = JOBS_SLOT + "index"
COMPILE_QUEUE = JOBS_SLOT + "compile:queue"
GEN_GROUP = "replicas"
ANNOUNCE_MAXLEN = 1000
RESPONSE_TTL_S = 600
CANCEL_TTL_S = 600


_TENANT_SAFE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_GEN_STREAM = re.compile(r"ls:\{pool:(?P<pool>[^}]*)\}:gen:(?P<prio>[^:]*):(?P<tenant>.*)")


def tenant_part(tenant: str) -> str:
    """A tenant name as it appears in keys: itself when short and plain, else a digest."""
    if _TENANT_SAFE.fullmatch(tenant):
        return tenant
    return "h-" + hashlib.sha256(tenant.encode()).hexdigest()[:24]


def pool_slot(pool: str) -> str:
    return f"{PREFIX}{{pool:{pool}}}:"


def gen_stream(pool: str, priority: str, tenant: str) -> str:
    """The queue stream of one tenant at one priority ("" tenant: the prefix of all of them)."""
    return f"{pool_slot(pool)}gen:{priority}:{tenant_part(tenant) if tenant else ''}"


def gen_stream_tenant_suffix(tenant: str) -> str:
    return ":" + tenant_part(tenant)


def _gen_parts(stream: str) -> re.Match:
    m = _GEN_STREAM.fullmatch(stream)
    if m is None:
        raise ValueError(f"{stream!r} is not a queue stream name")
    return m


def gen_stream_priority(stream: str) -> str:
    return _gen_parts(stream)["prio"]


def gen_stream_pool(stream: str) -> str:
    return _gen_parts(stream)["pool"]


def gen_stream_tenant(stream: str) -> str:
    """The tenant key part of a queue stream."""
    return _gen_parts(stream)["tenant"]


def request_scope(tenant: str, request_id: str) -> str:
    """The id a request's keys use: the client's id inside its tenant's namespace (the tenant
    part never holds a colon, so the two cannot be confused)."""
    return f"{tenant_part(tenant)}:{request_id}"


def replica_alive(replica_id: str) -> str:
    return f"{REPLICAS_SLOT}alive:{replica_id}"


def gen_streams(pool: str) -> str:
    return f"{pool_slot(pool)}genidx"


def gen_tenant_ring(pool: str, priority: str) -> str:
    return f"{pool_slot(pool)}genring:{priority}"


def gen_doorbell(pool: str) -> str:
    return f"{pool_slot(pool)}genbell"


def gen_room(pool: str) -> str:
    """Each replica's free slots as its last pick saw them (shared.request_protocol, prefix routing)."""
    return f"{pool_slot(pool)}room"


def gen_acked(pool: str) -> str:
    return f"{pool_slot(pool)}acked"


def _request(sid: str, kind: str) -> str:
    return f"{PREFIX}{{req:{sid}}}:{kind}"


def response_stream(sid: str) -> str:
    return _request(sid, "resp")


def cancel_flag(sid: str) -> str:
    return _request(sid, "cancel")


def request_claim(sid: str) -> str:
    return _request(sid, "rid")


def relay_lease(sid: str) -> str:
    return _request(sid, "relay")


def stream_owner(sid: str) -> str:
    return _request(sid, "owner")


def job(job_id: str) -> str:
    return f"{JOBS_SLOT}job:{job_id}"


def job_events(job_id: str) -> str:
    return f"{JOBS_SLOT}job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    return f"{JOBS_SLOT}job:{job_id}:cancel"


def sampling_settings(model: str) -> str:
    return f"{PREFIX}{{model:{model}}}:sampling"


def prompt_samples(model: str) -> str:
    return f"{PREFIX}{{model:{model}}}:samples"
