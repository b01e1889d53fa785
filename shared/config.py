"""Every Llamaship setting, declared once: name, type, default, help.

Each service picks the settings it uses. A setting `foo_bar` is read, last one winning, from its
default, the environment variable `LLAMASHIP_FOO_BAR`, and the command-line flag `--foo-bar`
(services whose port differs share the flag `--port`, with per-service env vars). Values are
validated at start-up; a bad one stops the service with a message naming the flag and env var.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any, Callable, Sequence
from urllib.parse import urlparse


class ConfigError(ValueError):
    """A setting has a value the service cannot start with."""


def _port(value: int) -> None:
    if not 0 <= value <= 65535:
        raise ValueError("must be a TCP port in 0..65535 (0 = pick a free one / disabled)")


def _positive(value: int | float) -> None:
    if value <= 0:
        raise ValueError("must be > 0")


def _non_negative(value: int | float) -> None:
    if value < 0:
        raise ValueError("must be >= 0")


def _redis_url(value: str) -> None:
    if value and urlparse(value).scheme not in ("redis", "rediss", "unix"):
        raise ValueError("must be a redis://, rediss:// or unix:// URL")


def _host_ports(value: str) -> None:
    from shared.redis_conn import host_ports

    host_ports(value)


def _store(value: str) -> None:
    if value.startswith("s3://"):
        from shared.store_s3 import S3Location

        S3Location.parse(value)
    elif "://" in value:
        raise ValueError("must be a directory or an s3://bucket/prefix URL")


def _pool(value: str) -> None:
    from shared.pools import POOLS

    if value not in POOLS:
        raise ValueError(f"must be one of {', '.join(POOLS)}")


def _serving_engine(value: str) -> None:
    if value not in ("auto", "iteration", "genai"):
        raise ValueError("must be auto, iteration or genai")


def _log_level(value: str) -> None:
    if value.upper() not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError("must be DEBUG, INFO, WARNING or ERROR")


@dataclass(frozen=True)
class Setting:
    name: str
    type: type
    default: Any
    help: str
    flag: str | None = None
    check: Callable[[Any], None] | None = None

    @property
    def env(self) -> str:
        return "LLAMASHIP_" + self.name.upper()

    @property
    def cli_flag(self) -> str:
        return self.flag or "--" + self.name.replace("_", "-")


_DECLARED = [
    # Shared by every service
    Setting("redis_url", str, "redis://127.0.0.1:6379/0", "Redis server holding queues, jobs and aliases (single-server mode; rediss:// for TLS).", check=_redis_url),
    Setting("redis_cluster_nodes", str, "", "Redis Cluster mode: comma-separated host:port of some cluster nodes (the rest are discovered); replaces --redis-url.", check=_host_ports),
    Setting("redis_sentinels", str, "", "Sentinel mode: comma-separated host:port of the sentinels that know the primary (with --redis-sentinel-master); replaces --redis-url.", check=_host_ports),
    Setting("redis_sentinel_master", str, "", "Sentinel mode: the name the sentinels monitor the primary under."),
    Setting("redis_username", str, "", "Redis ACL user (empty: the default user, or the URL's)."),
    Setting("redis_password", str, "", "Redis ACL password (prefer the env var to the flag; empty: the URL's, or none)."),
    Setting("redis_tls", bool, False, "TLS to Redis in cluster and sentinel modes (a rediss:// URL turns it on in single-server mode)."),
    Setting("redis_tls_ca_file", str, "", "PEM CA bundle that signs the Redis servers' certificates (empty: the system's)."),
    Setting("redis_tls_cert_file", str, "", "PEM client certificate for Redis servers that require one (tls-auth-clients)."),
    Setting("redis_tls_key_file", str, "", "PEM private key of --redis-tls-cert-file."),
    Setting("redis_wait_replicas", int, 0, "An enqueue is acknowledged only once this many Redis replicas hold it (WAIT); if fewer do within --redis-wait-timeout-ms it is withdrawn and the client told to retry. 0: acknowledge once the primary has it.", check=_non_negative),
    Setting("redis_wait_timeout_ms", int, 1000, "Milliseconds an enqueue waits for --redis-wait-replicas.", check=_positive),
    Setting("store", str, "./llamaship-store", "Shared build store (compiler writes, serving reads): a directory, or s3://bucket/prefix (S3-compatible object storage configured by the standard AWS_* environment).", check=_store),
    Setting("store_cache_dir", str, "", "With an s3:// store: local directory for its cache of fetched builds and the compiler's scratch (default ~/.cache/llamaship/s3/<bucket>/<prefix>)."),
    Setting("store_cache_gib", float, 50.0, "With an s3:// store: GiB of fetched builds kept locally; least recently used builds are evicted first, never one in use.", check=_positive),
    Setting("store_multipart_mb", int, 64, "With an s3:// store: files from this size (MiB) on are uploaded in parts of this size.", check=_positive),
    Setting("store_lease_s", float, 60.0, "With an s3:// store: a fetch's or publish's lease (which keeps gc off its build) expires unless renewed within this many seconds.", check=_positive),
    Setting("internal_tls_ca", str, "", "PEM CA that signs every service's internal certificate: with it (and --internal-tls-cert/--internal-tls-key) services speak mTLS to each other; empty = plaintext (keep services on loopback or a private network)."),
    Setting("internal_tls_cert", str, "", "PEM certificate (chain) this service presents to the others, signed by --internal-tls-ca."),
    Setting("internal_tls_key", str, "", "PEM private key of --internal-tls-cert."),
    Setting("internal_tls_server_name", str, "", "Name the peers' certificates must carry (SAN) when this service calls them; empty = the host of the address called."),
    Setting("host", str, "127.0.0.1", "Address the gRPC server binds to."),
    Setting("log_level", str, "INFO", "Log level: DEBUG, INFO, WARNING, ERROR.", check=_log_level),
    Setting("metrics_port", int, 0, "Prometheus /metrics HTTP port; 0 disables it.", check=_port),
    # Gateway
    Setting("gateway_port", int, 50051, "Gateway gRPC port.", flag="--port", check=_port),
    Setting("http_port", int, 0, "Port of the gateway's OpenAI-compatible HTTP front (/v1/models, /v1/completions, /v1/chat/completions; same keys, queue and replicas as gRPC, TLS as --tls-cert-file); 0 = off.", check=_port),
    Setting("compiler_address", str, "127.0.0.1:50052", "Compiler gRPC address the gateway proxies compile jobs to."),
    Setting("queue_max_depth", int, 256, "Requests in a pool's queue (waiting or running) before Generate answers RESOURCE_EXHAUSTED.", check=_positive),
    Setting("tenant_max_requests", int, 0, "Requests one tenant may have in a pool's queue (waiting or running) before its Generate calls answer RESOURCE_EXHAUSTED; 0 = queue_max_depth.", check=_non_negative),
    Setting("queue_timeout_s", float, 120.0, "Seconds a request may wait for a replica to take it, or a taken request for its next chunk, before UNAVAILABLE.", check=_positive),
    Setting("redis_lost_wait_s", float, 30.0, "How long a replica whose Redis stops answering mid-request (a primary's failover) waits for it before leaving the request pending; once Redis answers, the request continues from what its stream holds.", check=_positive),
    Setting("replica_stale_s", float, 10.0, "A replica that has not renewed its liveness key for this long (the key's TTL, set by the replica) is treated as gone: its requests are taken over.", check=_positive),
    Setting("api_keys_file", str, "", "JSON file of hashed API keys per tenant (llamaship keys create); empty = no auth (keep the gateway on loopback)."),
    Setting("tls_cert_file", str, "", "PEM certificate chain: serve the gateway over TLS (with --tls-key-file)."),
    Setting("tls_key_file", str, "", "PEM private key of the gateway's TLS certificate."),
    Setting("relay_lease_s", float, 10.0, "A request no gateway relays for this long (its gateway died and no client resumed it) is stopped by its replica.", check=_positive),
    Setting("failover_timeout_s", float, 15.0, "Seconds a stream whose replica stopped waits for another replica to continue it before UNAVAILABLE.", check=_positive),
    Setting("prefix_route_chars", int, 512, "Prefix routing: a prompt (or chat) at least this many characters long is preferred for one live replica of its pool chosen by its first this-many characters (rendezvous hashing), so prompts that share a prefix meet that prefix's cached KV there; 0 = off.", check=_non_negative),
    # Compiler
    Setting("compiler_port", int, 50052, "Compiler gRPC port.", flag="--port", check=_port),
    Setting("work_dir", str, "", "Scratch directory for builds in progress (default: <store>/.work)."),
    Setting("job_lease_s", float, 30.0, "A running job whose worker stopped renewing its lease for this long is re-run.", check=_positive),
    Setting("max_attempts", int, 2, "Times a compile job is started before it is marked failed.", check=_positive),
    Setting("checkpoint_roots", str, "", "Comma-separated directories compile requests may read checkpoint_path from; a relative path resolves against them. Empty: any path the compiler can read (single-user setups only)."),
    Setting("upload_quota_gib", float, 200.0, "Declared bytes of one tenant's unfinished and kept uploads, in GiB, before CreateUpload answers RESOURCE_EXHAUSTED.", check=_positive),
    Setting("upload_max_active", int, 8, "Uploads one tenant may hold at once (unfinished or kept).", check=_positive),
    Setting("upload_expiry_s", float, 86400.0, "An upload is deleted this long after it was created (finished or not); compiles copy what they need first.", check=_positive),
    Setting("upload_min_free_gib", float, 1.0, "CreateUpload refuses an upload that would leave less than this much free disk in the store, in GiB.", check=_non_negative),
    Setting("job_poll_s", float, 0.5, "Seconds between a running compile job's checks for cancellation (and for its job having been taken over); every stage stops within about this long.", check=_positive),
    Setting("upload_sweep_s", float, 60.0, "Seconds between the compiler's sweeps that delete expired uploads.", check=_positive),
    # Serving
    Setting("serving_port", int, 50053, "Serving replica gRPC port.", flag="--port", check=_port),
    Setting("pool", str, "cpu", "Hardware pool this replica serves: cpu or cuda.", check=_pool),
    Setting("slots", int, 4, "Requests a replica runs at once; it takes work from the queue only when a slot is free.", check=_positive),
    Setting("kv_budget_mb", int, 0, "KV-cache memory a replica may commit to running requests; it takes a request only when the request's worst-case KV need fits. 0 = a quarter of the machine's memory.", check=_non_negative),
    Setting("threads", int, 0, "Intra-op threads per ONNX Runtime session; 0 = one per CPU this process may run on (its affinity mask, bounded by its cgroup's CPU quota as in a container), less one left to the relay from 4 CPUs on (ONNX Runtime's own default can be a single thread).", check=_non_negative),
    Setting("serving_engine", str, "auto", "Decode engine: iteration (sequences join and leave one running batch between any two decode steps; ONNX Runtime driven directly; a prefix cache), genai (onnxruntime-genai static-batch cohorts), or auto (iteration on the cpu pool, where it decodes a trickle of arrivals faster; genai on cuda, where it is not measured yet).", check=_serving_engine),
    Setting("prefix_cache_mb", int, 256, "Iteration engine: MiB of the KV budget that keep prompt prefixes' KV (64-token blocks, least recently used evicted first), so a prompt that starts like an earlier one skips that part of its prefill; at most a quarter of kv_budget_mb; 0 = off.", check=_non_negative),
    Setting("stream_interval_ms", float, 0.0, "Least time between two chunks of one stream; tokens decoded meanwhile share a chunk (the first token is never held). 0 sends each as soon as it exists.", check=_non_negative),
    Setting("replica_id", str, "", "Stable name of this replica (default: pool-host-pid)."),
    Setting("heartbeat_s", float, 2.0, "Seconds between a replica's heartbeats; replica_stale_s must be at least twice this.", check=_positive),
    Setting("tenant_fair_slots", bool, True, "While requests of more than one tenant wait, a replica gives each tenant at most its share of running slots (slots / tenants with work, at least one).", ),
    Setting("tenant_headroom_s", float, 300.0, "With tenant_fair_slots: while another tenant has sent this pool work within this many seconds, one tenant may not take a replica's last free slot (so a newcomer does not wait for a long request to end). 0 turns the headroom off.", check=_non_negative),
    Setting("advertise_address", str, "", "Address other services reach this replica at (default: host:port)."),
    Setting("prefix_grace_ms", float, 50.0, "Prefix routing: a request the gateway preferred for another replica that has free slots is left to it for this many milliseconds after its enqueue before this replica may take it; 0 = take it at once.", check=_non_negative),
]

SETTINGS: dict[str, Setting] = {s.name: s for s in _DECLARED}

STORE = ("store", "store_cache_dir", "store_cache_gib", "store_multipart_mb", "store_lease_s")
REDIS = ("redis_url", "redis_cluster_nodes", "redis_sentinels", "redis_sentinel_master", "redis_username",
         "redis_password", "redis_tls", "redis_tls_ca_file", "redis_tls_cert_file", "redis_tls_key_file",
         "redis_wait_replicas", "redis_wait_timeout_ms")
INTERNAL_TLS = ("internal_tls_ca", "internal_tls_cert", "internal_tls_key", "internal_tls_server_name")
COMMON = (*REDIS, *STORE, *INTERNAL_TLS, "host", "log_level", "metrics_port")
GATEWAY = (*COMMON, "gateway_port", "http_port", "compiler_address", "queue_max_depth", "tenant_max_requests", "queue_timeout_s",
           "failover_timeout_s", "relay_lease_s", "api_keys_file", "tls_cert_file", "tls_key_file", "prefix_route_chars")
COMPILER = (*COMMON, "compiler_port", "work_dir", "job_lease_s", "max_attempts", "checkpoint_roots",
            "upload_quota_gib", "upload_max_active", "upload_expiry_s", "upload_min_free_gib", "job_poll_s",
            "upload_sweep_s")
SERVING = (*COMMON, "serving_port", "pool", "slots", "kv_budget_mb", "threads", "serving_engine", "prefix_cache_mb", "stream_interval_ms", "replica_stale_s", "redis_lost_wait_s", "replica_id",
           "advertise_address", "heartbeat_s", "tenant_fair_slots", "tenant_headroom_s", "prefix_grace_ms")


def _stale_vs_heartbeat(values: dict[str, Any]) -> None:
    if values["replica_stale_s"] < 2 * values["heartbeat_s"]:
        raise ConfigError(f"--replica-stale-s ({values['replica_stale_s']}) must be at least twice --heartbeat-s "
                          f"({values['heartbeat_s']}): one late heartbeat must not make a live replica look gone")


def _redis_mode(values: dict[str, Any]) -> None:
    if values["redis_cluster_nodes"] and values["redis_sentinels"]:
        raise ConfigError("--redis-cluster-nodes and --redis-sentinels are two modes: give one")
    if bool(values["redis_sentinels"]) != bool(values["redis_sentinel_master"]):
        raise ConfigError("--redis-sentinels and --redis-sentinel-master go together")
    if bool(values["redis_tls_cert_file"]) != bool(values["redis_tls_key_file"]):
        raise ConfigError("--redis-tls-cert-file and --redis-tls-key-file go together")


def _internal_tls(values: dict[str, Any]) -> None:
    given = [n for n in INTERNAL_TLS[:3] if values[n]]
    if given and len(given) != 3:
        raise ConfigError("--internal-tls-ca, --internal-tls-cert and --internal-tls-key go together (missing: "
                          + ", ".join("--" + n.replace("_", "-") for n in INTERNAL_TLS[:3] if not values[n]) + ")")


# Checks across settings: (the settings they need, the check); run when a service uses all of them.
CROSS_CHECKS: list[tuple[tuple[str, ...], Callable[[dict[str, Any]], None]]] = [
    (("replica_stale_s", "heartbeat_s"), _stale_vs_heartbeat),
    (REDIS, _redis_mode),
    (INTERNAL_TLS, _internal_tls),
]


class Settings:
    """Typed, validated values of the settings one service uses (attribute per setting)."""

    def __init__(self, values: dict[str, Any]):
        self.__dict__.update(values)

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    def __repr__(self) -> str:
        shown = {k: "***" if "password" in k and v else v for k, v in self.__dict__.items()}
        return f"Settings({shown!r})"


def _convert(setting: Setting, raw: Any, source: str) -> Any:
    try:
        if setting.type is bool and isinstance(raw, str):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError("must be true or false")
        return setting.type(raw)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {raw!r} is not a valid {setting.type.__name__} ({exc})") from None


def add_arguments(parser: argparse.ArgumentParser, names: Sequence[str]) -> None:
    for name in names:
        s = SETTINGS[name]
        parser.add_argument(
            s.cli_flag,
            dest=name,
            default=None,
            metavar=s.type.__name__.upper(),
            help=f"{s.help} [env {s.env}; default {s.default!r}]",
        )


def resolve(names: Sequence[str], cli: argparse.Namespace | dict | None = None, env: dict | None = None) -> Settings:
    """Defaults < environment < command line; each value converted and checked."""
    env = os.environ if env is None else env
    given = vars(cli) if isinstance(cli, argparse.Namespace) else dict(cli or {})
    values: dict[str, Any] = {}
    for name in names:
        s = SETTINGS[name]
        value, source = s.default, "default"
        if s.env in env:
            value, source = _convert(s, env[s.env], f"environment variable {s.env}"), s.env
        if given.get(name) is not None:
            value, source = _convert(s, given[name], f"flag {s.cli_flag}"), s.cli_flag
        if s.check is not None:
            try:
                s.check(value)
            except ValueError as exc:
                raise ConfigError(f"{s.cli_flag} / {s.env} = {value!r} (from {source}): {exc}") from None
        values[name] = value
    for needed, check in CROSS_CHECKS:
        if all(n in values for n in needed):
            check(values)
    return Settings(values)


def parse_service_args(prog: str, description: str, names: Sequence[str], argv: Sequence[str] | None = None) -> Settings:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    add_arguments(parser, names)
    args = parser.parse_args(argv)
    try:
        return resolve(names, args)
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
