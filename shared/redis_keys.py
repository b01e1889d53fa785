"""Every Redis key and stream Llamaship uses, in one place.

Aliases       HASH   ls:aliases                 model name -> JSON alias record
Announce      STREAM ls:announce                one entry per publish (name, build_id, pool)
Replicas      HASH   ls:replicas                replica id -> JSON heartbeat (pool, builds, slots, ts)
Gen queue     STREAM ls:gen:{pool}              requests waiting for a replica; group "replicas"
Responses     STREAM ls:resp:{request_id}       chunks a replica produced for one request
Cancel flag   STRING ls:cancel:{request_id}     set when the client went away or cancelled
Stream owner  STRING ls:owner:{request_id}      the replica allowed to write the response stream
Request claim STRING ls:rid:{request_id}        a request id in use (ids are not reused for 10 minutes)
Jobs          STRING ls:job:{job_id}            one compile job's state (JSON)
Job events    STREAM ls:job:{job_id}:events     progress of one compile job
Job cancel  STRING ls:job:{job_id}:cancel      set when a running job should stop
Job index     ZSET   ls:jobs                    job ids by creation time
Job queue     LIST   ls:compile:queue           job ids waiting for a compiler worker
"""

from __future__ import annotations

PREFIX = "ls:"
ALIASES = PREFIX + "aliases"
ANNOUNCE = PREFIX + "announce"
REPLICAS = PREFIX + "replicas"
JOBS_INDEX = PREFIX + "jobs"
COMPILE_QUEUE = PREFIX + "compile:queue"
GEN_GROUP = "replicas"
ANNOUNCE_MAXLEN = 1000
RESPONSE_TTL_S = 600
CANCEL_TTL_S = 600


def gen_queue(pool: str) -> str:
    return f"{PREFIX}gen:{pool}"


def response_stream(request_id: str) -> str:
    return f"{PREFIX}resp:{request_id}"


def cancel_flag(request_id: str) -> str:
    return f"{PREFIX}cancel:{request_id}"


def request_claim(request_id: str) -> str:
    return f"{PREFIX}rid:{request_id}"


def stream_owner(request_id: str) -> str:
    return f"{PREFIX}owner:{request_id}"


def job(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def job_events(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:events"


def job_cancel(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}:cancel"
