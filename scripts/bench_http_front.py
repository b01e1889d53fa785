"""What the gateway's OpenAI-compatible HTTP front adds over gRPC: time to first token and decode
tok/s of the same streamed greedy requests, sent one at a time, alternating between the fronts
(and, for reference, through the openai SDK), on a stack of real processes with the demo model.

    .venv/bin/python scripts/bench_http_front.py [--requests 30] [--max-tokens 128] [--model-dir DIR]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPT = "def main(argv):\n    "


def grpc_once(client, model: str, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    ttft, n = 0.0, 0
    for chunk in client.stream(model, PROMPT, max_tokens):
        if chunk.token_ids and not n:
            ttft = time.perf_counter() - t0
        n += len(chunk.token_ids)
    return ttft, time.perf_counter() - t0, n


def http_once(host: str, port: int, model: str, max_tokens: int) -> tuple[float, float, int]:
    conn = http.client.HTTPConnection(host, port, timeout=120)
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    ttft, n = 0.0, 0
    for line in resp:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if event["choices"] and event["choices"][0]["text"] and not ttft:
            ttft = time.perf_counter() - t0
        if event.get("usage"):
            n = event["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    conn.close()
    return ttft, total, n


def sdk_once(client, model: str, max_tokens: int) -> tuple[float, float, int]:
    t0 = time.perf_counter()
    ttft, n = 0.0, 0
    for chunk in client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                           stream=True, stream_options={"include_usage": True}):
        if chunk.choices and chunk.choices[0].text and not ttft:
            ttft = time.perf_counter() - t0
        if chunk.usage:
            n = chunk.usage.completion_tokens
    return ttft, time.perf_counter() - t0, n


def summary(runs: list[tuple[float, float, int]]) -> tuple[float, float, float]:
    ttft = [r[0] * 1000 for r in runs]
    tps = [(r[2] - 1) / (r[1] - r[0]) for r in runs if r[1] > r[0] and r[2] > 1]
    return statistics.median(ttft), statistics.quantiles(ttft, n=10)[-1], statistics.median(tps)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=30)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--model-dir", default="")
    ap.add_argument("--recipe", default="fp32")
    args = ap.parse_args()
    import openai

    from llamaship.client import GatewayClient
    from llamaship.demo_model import DEFAULT_DIR, make_model
    from llamaship.stack import Stack, StackConfig, free_port

    model_dir = args.model_dir or str(make_model(DEFAULT_DIR))
    tmp = Path(tempfile.mkdtemp(prefix="bench-http-"))
    port = free_port()
    with Stack(StackConfig(store=tmp / "store", log_dir=tmp / "logs", env={"LLAMASHIP_HTTP_PORT": str(port)})) as stack:
        client = GatewayClient(stack.gateway_address)
        job = client.compile(model_dir, "bench", args.recipe)
        assert job.build_id, job.message
        sdk = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        runs: dict[str, list] = {"gRPC (GatewayClient)": [], "HTTP SSE (raw)": [], "HTTP SSE (openai SDK)": []}
        for _ in range(3):  # warm-up
            grpc_once(client, "bench", args.max_tokens)
            http_once("127.0.0.1", port, "bench", args.max_tokens)
        for _ in range(args.requests):
            runs["gRPC (GatewayClient)"].append(grpc_once(client, "bench", args.max_tokens))
            runs["HTTP SSE (raw)"].append(http_once("127.0.0.1", port, "bench", args.max_tokens))
            runs["HTTP SSE (openai SDK)"].append(sdk_once(sdk, "bench", args.max_tokens))
        client.close()
    base = summary(runs["gRPC (GatewayClient)"])
    print(f"{args.requests} sequential streamed greedy requests of {args.max_tokens} tokens each, per front "
          f"(model {Path(model_dir).name}, {args.recipe})\n")
    print("| front | TTFT median (ms) | TTFT p90 (ms) | decode tok/s median | TTFT added vs gRPC (ms) |")
    print("|---|---|---|---|---|")
    for name, r in runs.items():
        s = summary(r)
        print(f"| {name} | {s[0]:.1f} | {s[1]:.1f} | {s[2]:.0f} | {s[0] - base[0]:+.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
