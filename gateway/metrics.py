"""Prometheus metrics of the gateway."""

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("llamaship_gateway_requests_total", "Generation requests enqueued", ["pool", "priority"])
TOKENS = Counter("llamaship_gateway_tokens_total", "Completion tokens relayed", ["pool"])
TTFT = Histogram("llamaship_gateway_time_to_first_token_seconds", "Enqueue to first chunk relayed", ["pool"],
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
INTER_TOKEN = Histogram("llamaship_gateway_inter_token_seconds", "Time between relayed chunks, per token", ["pool"],
                        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1))
PREFIX_ROUTED = Counter("llamaship_gateway_prefix_routed_total",
                        "Requests enqueued with a preferred replica for their prompt's prefix", ["pool"])
REJECTS = Counter("llamaship_gateway_rejects_total", "Generate calls refused, by status", ["code"])
QUEUE_DEPTH = Gauge("llamaship_gateway_queue_depth", "Requests in a pool's queue (waiting or running), as last seen",
                    ["pool", "priority"])
