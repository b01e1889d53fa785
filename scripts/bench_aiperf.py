"""NVIDIA's aiperf (a load generator no one here wrote) against the gateway's OpenAI-compatible HTTP
front, offline with the checkpoint's own tokenizer, beside the same load sent by our gRPC client.

aiperf is not a project dependency (it pulls in pandas, datasets, dash, ...): install it in its own
environment and pass its executable:

    python3 -m venv /tmp/aiperf && /tmp/aiperf/bin/pip install aiperf
    .venv/bin/python scripts/bench_aiperf.py --aiperf /tmp/aiperf/bin/aiperf [--concurrency 4 --requests 40]

Prints a markdown table: aiperf's figures over HTTP, then ours over gRPC for the same prompt
length, completion length and concurrency.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def run_aiperf(aiperf: str, port: int, model_dir: str, args, out: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    # a local tokenizer directory: aiperf loads it without the hub (its offline mode wants a hub cache)
    cmd = [aiperf, "profile", "--model", "bench", "--url", f"http://127.0.0.1:{port}", "--endpoint-type",
           "completions", "--streaming", "--tokenizer", model_dir,
           "--synthetic-input-tokens-mean", str(args.isl), "--synthetic-input-tokens-stddev", "0",
           "--output-tokens-mean", str(args.osl), "--output-tokens-stddev", "0",
           "--extra-inputs", "temperature:0",
           "--concurrency", str(args.concurrency), "--request-count", str(args.requests),
           "--warmup-request-count", str(args.concurrency), "--artifact-dir", str(out), "--no-auto-plot",
           "--ui-type", "simple"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"aiperf failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "profile_export_aiperf.json").read_text())


def run_grpc(address: str, model_dir: str, args) -> dict:
    """The same load through GatewayClient: `concurrency` threads, `requests` streams in all."""
    from transformers import AutoTokenizer

    from llamaship.client import GatewayClient

    tok = AutoTokenizer.from_pretrained(model_dir)
    words = ("the ship sails over the sea and the llama looks at the stars " * 64).split()
    prompt = " ".join(words[: args.isl])
    while len(tok(prompt)["input_ids"]) > args.isl and " " in prompt:
        prompt = prompt.rsplit(" ", 1)[0]
    results: list[tuple[float, float, int]] = []
    lock = threading.Lock()
    left = [args.requests]

    def worker() -> None:
        with GatewayClient(address) as client:
            while True:
                with lock:
                    if left[0] == 0:
                        return
                    left[0] -= 1
                out = client.generate("bench", prompt, args.osl)
                with lock:
                    results.append((out.time_to_first_token_s, out.total_s, len(out.token_ids)))

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    ttft = [r[0] * 1000 for r in results]
    itl = [(r[1] - r[0]) * 1000 / (r[2] - 1) for r in results if r[2] > 1]
    return {"ttft_p50": statistics.median(ttft), "ttft_p90": statistics.quantiles(ttft, n=10)[-1],
            "itl": statistics.mean(itl), "tok_s": sum(r[2] for r in results) / wall,
            "req_s": len(results) / wall}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--aiperf", default=shutil.which("aiperf") or "", help="the aiperf executable")
    ap.add_argument("--model-dir", default="", help="checkpoint (default: the demo model)")
    ap.add_argument("--recipe", default="fp32")
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--isl", type=int, default=64, help="prompt tokens")
    ap.add_argument("--osl", type=int, default=128, help="completion tokens")
    args = ap.parse_args()
    if not args.aiperf:
        raise SystemExit("aiperf not found: pass --aiperf (see this script's docstring)")
    from llamaship.client import GatewayClient
    from llamaship.demo_model import DEFAULT_DIR, make_model
    from llamaship.stack import Stack, StackConfig, free_port

    model_dir = str(Path(args.model_dir or make_model(DEFAULT_DIR)).resolve())
    tmp = Path(tempfile.mkdtemp(prefix="bench-aiperf-"))
    port = free_port()
    with Stack(StackConfig(store=tmp / "store", log_dir=tmp / "logs", env={"LLAMASHIP_HTTP_PORT": str(port)})) as stack:
        with GatewayClient(stack.gateway_address) as client:
            assert client.compile(model_dir, "bench", args.recipe).build_id
        a = run_aiperf(args.aiperf, port, model_dir, args, tmp / "aiperf")
        g = run_grpc(stack.gateway_address, model_dir, args)
    print(f"{args.requests} streamed requests, {args.isl} prompt tokens, {args.osl} completion tokens, "
          f"concurrency {args.concurrency}, model {Path(model_dir).name} {args.recipe} (aiperf {a['aiperf_version']})\n")
    print("| load generator | front | TTFT p50 (ms) | TTFT p90 (ms) | inter-token (ms) | output tok/s | requests/s |")
    print("|---|---|---|---|---|---|---|")
    print(f"| aiperf | HTTP | {a['time_to_first_token']['p50']:.1f} | {a['time_to_first_token']['p90']:.1f} | "
          f"{a['inter_token_latency']['avg']:.2f} | {a['output_token_throughput']['avg']:.0f} | "
          f"{a['request_throughput']['avg']:.2f} |")
    print(f"| GatewayClient | gRPC | {g['ttft_p50']:.1f} | {g['ttft_p90']:.1f} | {g['itl']:.2f} | {g['tok_s']:.0f} | "
          f"{g['req_s']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
