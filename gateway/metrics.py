"""Prometheus metrics of the gateway."""

from prometheus_client import Counter, Histogram

REQUESTS = Counter("llamaship_gateway_requests_total", "Generation requests enqueued", ["pool"])
TOKENS = Counter("llamaship_gateway_tokens_total", "Completion tokens relayed", ["pool"])
TTFT = Histogram("llamaship_gateway_time_to_first_token_seconds", "Enqueue to first chunk relayed", ["pool"],
                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
