"""Prometheus metrics of a serving replica."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("llamaship_serving_requests_total", "Generation requests finished", ["pool", "outcome"])
TOKENS = Counter("llamaship_serving_tokens_total", "Completion tokens produced", ["pool"])
ACTIVE = Gauge("llamaship_serving_active_sequences", "Sequences decoding now", ["pool"])
TTFT = Histogram("llamaship_serving_time_to_first_token_seconds", "Prompt to first token, on the replica", ["pool"],
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
QUEUE_WAIT = Histogram("llamaship_serving_queue_wait_seconds", "Time a request waited in the pool queue", ["pool"],
                       buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30))
BUILD_LOAD = Histogram("llamaship_serving_build_load_seconds", "Verify + load + warm time of a build", ["pool"],
                       buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120))
FAILOVERS = Counter("llamaship_serving_failovers_total", "Requests continued after their replica stopped", ["pool"])
ADMISSION_WAITS = Counter("llamaship_serving_admission_waits_total",
                          "Times the next queued request had to wait because the KV budget was taken", ["pool"])
PREFIX_ROUTED = Counter("llamaship_serving_prefix_routed_picks_total",
                        "Requests taken from the queue, by the gateway's prefix routing: preferred here, preferred "
                        "for another replica (taken after its grace, or that replica was full or gone), or none",
                        ["pool", "preferred"])
KV_RESERVED = Gauge("llamaship_serving_kv_reserved_bytes", "KV-cache bytes reserved by running requests", ["pool"])
BATCH_ROWS = Histogram("llamaship_serving_batch_rows", "Sequences that produced a token in one decode step of a cohort",
                       ["pool"], buckets=(1, 2, 4, 8, 16, 32, 64))
PREFIX_LOOKUPS = Counter("llamaship_serving_prefix_cache_lookups_total",
                        "Prompts looked up in the prefix cache, by result (hit: at least one block)", ["pool", "result"])
PREFIX_SAVED = Counter("llamaship_serving_prefix_cache_saved_prefill_tokens_total",
                       "Prompt tokens whose KV came from the prefix cache instead of prefill", ["pool"])
PREFIX_EVICTIONS = Counter("llamaship_serving_prefix_cache_evictions_total", "Prefix cache blocks evicted (LRU)", ["pool"])
PREFIX_BLOCKS = Gauge("llamaship_serving_prefix_cache_blocks", "Blocks in a build's prefix cache", ["pool", "build"])
PREFIX_BYTES = Gauge("llamaship_serving_prefix_cache_bytes", "KV bytes in a build's prefix cache", ["pool", "build"])


def prefix_cache(pool: str, build: str, before: dict, now: dict) -> None:
    """A decode worker's prefix cache totals went from `before` to `now`."""
    grew = lambda k: max(0, now.get(k, 0) - before.get(k, 0))  # noqa: E731
    PREFIX_LOOKUPS.labels(pool, "hit").inc(grew("hits"))
    PREFIX_LOOKUPS.labels(pool, "miss").inc(grew("misses"))
    PREFIX_SAVED.labels(pool).inc(grew("saved_tokens"))
    PREFIX_EVICTIONS.labels(pool).inc(grew("evictions"))
    PREFIX_BLOCKS.labels(pool, build).set(now.get("blocks", 0))
    PREFIX_BYTES.labels(pool, build).set(now.get("bytes", 0))


def forget_prefix_cache(pool: str, build: str) -> None:
    for gauge in (PREFIX_BLOCKS, PREFIX_BYTES):
        try:
            gauge.remove(pool, build)
        except KeyError:
            pass
