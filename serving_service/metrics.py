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
