"""Where each millisecond goes between the decode loop and the gRPC caller, for one stream at c=1
(and c=4 for the thread choice), through a real stack (real Redis, real processes, as `llamaship
up` starts them).

Measured, on the same machine in one run:
- direct: the build decoded in this process with onnxruntime-genai (per-token time, TTFT);
- the stack at c=1: TTFT and decode tok/s seen by a gRPC client, the relay latency of every
  chunk (client arrival time minus the chunk's Redis entry id, which is Redis's clock on this same
  host: replica write -> gateway read -> gRPC -> client), tokens per chunk, and CPU ms per token
  of every process (gateway, replica, its decode worker, Redis, the client);
- the pieces in isolation: detokenizing one token, one chunk write (the replica's Lua script),
  one blocking XREAD woken by a write (the gateway's read), an empty pipe hop.

Usage: python scripts/profile_relay.py [--threads 0,1,2] [--tokens 256] [--reps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llamaship.bench import measure as m  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def main(argv):\n    "


def p50(xs):
    return statistics.median(xs) if xs else float("nan")


def direct(build_dir: Path, prompt_ids: list[int], n: int, reps: int, threads: int) -> dict:
    d = m.DirectOG(build_dir, threads)
    d.run(prompt_ids, 8)
    runs = [d.run(prompt_ids, n) for _ in range(reps)]
    return {"ttft_ms": p50([r.ttft_s * 1e3 for r in runs]), "tok_s": p50([r.decode_tps for r in runs]),
            "ms_per_token": 1e3 / p50([r.decode_tps for r in runs])}


def detok_cost(build_dir: Path, prompt_ids: list[int], ids: list[int]) -> float:
    from serving_service.text import IncrementalDetokenizer, PromptTokenizer, StopMatcher

    tok = PromptTokenizer(build_dir)
    best = float("inf")
    for _ in range(5):
        detok, stops = IncrementalDetokenizer(tok, prompt_ids), StopMatcher([])
        t0 = time.perf_counter()
        for i in ids:
            stops.push(detok.push(i))
        best = min(best, (time.perf_counter() - t0) / len(ids))
    return best * 1e3


async def redis_costs(url: str, n: int = 500) -> dict:
    import redis.asyncio as aioredis

    from shared.generation import Chunk
    from shared.request_protocol import Requests

    r = aioredis.Redis.from_url(url, decode_responses=True)
    r2 = aioredis.Redis.from_url(url, decode_responses=True)
    req = Requests(r)
    sid = "profile:relay"
    await req.take_ownership(sid, "me")
    await req.renew_relay(sid, 60)
    chunk = Chunk("tokens", text=" hello", token_ids=[1234], build_id="0541982659c1b8ba3785")
    await req.write(sid, "me", chunk)
    t0 = time.perf_counter()
    for _ in range(n):
        await req.write(sid, "me", chunk)
    write_ms = (time.perf_counter() - t0) / n * 1e3
    t0 = time.perf_counter()
    for _ in range(n):
        await r.ping()
    ping_ms = (time.perf_counter() - t0) / n * 1e3
    # a blocked XREAD on another connection, woken by one write: write -> reader has the chunk
    reader2 = Requests(r2)
    wake = []
    last = "$"
    for _ in range(100):
        last_id = (await r.xrevrange(f"ls:{{req:{sid}}}:resp", count=1))[0][0]
        task = asyncio.create_task(reader2.read(sid, last_id, block_ms=1000))
        await asyncio.sleep(0.002)
        t0 = time.perf_counter()
        await req.write(sid, "me", chunk)
        await task
        wake.append((time.perf_counter() - t0) * 1e3)
    del last
    await req.relay_ended(sid)
    await r.aclose()
    await r2.aclose()
    return {"write_chunk_ms": write_ms, "ping_ms": ping_ms, "write_to_read_ms": p50(wake)}


def stack_c1(client, model: str, n: int, reps: int) -> dict:
    ttft, tps, lat, first_lat, per_chunk, queue, prefill = [], [], [], [], [], [], []
    for _ in range(reps):
        chunks = []
        t0 = time.perf_counter()
        call = client.stream(model, PROMPT, n)
        for c in call:
            now = time.perf_counter()
            if c.token_ids:
                # the cursor is the Redis entry id: Redis's clock (ms) when the replica wrote it
                # (ms resolution: 0.5 ms is its mean truncation)
                (lat if chunks else first_lat).append(time.time() * 1e3 - int(c.cursor.split("-")[0]) - 0.5)
                chunks.append((now - t0, len(c.token_ids)))
        trailers = dict(call.trailing_metadata())
        queue.append(float(trailers["x-llamaship-queue-ms"]))
        prefill.append(float(trailers["x-llamaship-prefill-ms"]))
        run = m.Run.from_chunks(chunks)
        ttft.append(run.ttft_s * 1e3)
        tps.append(run.decode_tps)
        per_chunk.append(sum(k for _, k in chunks) / len(chunks))
    return {"ttft_ms": p50(ttft), "ttft_ms_all": ttft, "tok_s": p50(tps), "relay_latency_ms": p50(lat),
            "first_chunk_relay_ms": p50(first_lat), "replica_queue_ms": p50(queue),
            "replica_prefill_ms": p50(prefill), "tokens_per_chunk": p50(per_chunk)}


def pids_of(stack) -> dict[str, int]:
    out = {name: p.popen.pid for name, p in stack.procs.items() if name != "compiler"}
    out["client (bench)"] = os.getpid()  # its own CPU only (m.cpu_seconds)
    return out


def serving_split(stack) -> dict[str, float]:
    """CPU seconds of each replica process and, separately, its decode worker children."""
    import psutil

    out = {}
    for name, p in stack.procs.items():
        if not name.startswith("serving"):
            continue
        proc = psutil.Process(p.popen.pid)
        t = proc.cpu_times()
        out[name + " (event loop)"] = t.user + t.system
        out[name + " (decode worker)"] = sum(sum(c.cpu_times()[:2]) for c in proc.children(recursive=True))
    return out


def cpu_profile(stack, client, model: str, n: int, reps: int) -> dict:
    pids = pids_of(stack)
    pids.pop("serving-cpu-0", None)
    before = {**m.cpu_seconds(pids), **serving_split(stack)}
    tokens = 0
    for _ in range(reps):
        tokens += client.generate(model, PROMPT, n).completion_tokens
    after = {**m.cpu_seconds(pids), **serving_split(stack)}
    return {k: (after[k] - before[k]) * 1e3 / tokens for k in before}


def run_threads(threads: int, demo_model: Path, n: int, reps: int) -> dict:
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig
    from serving_service.text import PromptTokenizer
    from shared.store import BuildStore

    base = Path(tempfile.mkdtemp(prefix="llamaship-profile-"))
    env = {"LLAMASHIP_THREADS": str(threads)} if threads >= 0 else {}
    cfg = StackConfig(store=base / "store", log_dir=base / "logs", env=env)
    out: dict = {"threads": threads if threads >= 0 else "default"}
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        build_id = client.compile(str(demo_model), "demo", "fp32").build_id
        build_dir = BuildStore(base / "store").path(build_id)
        tok = PromptTokenizer(build_dir)
        prompt_ids = tok.encode(PROMPT)
        client.generate("demo", PROMPT, 8)  # warm
        out["stack_c1"] = stack_c1(client, "demo", n, reps)
        out["cpu_ms_per_token"] = cpu_profile(stack, client, "demo", n, reps)
        out["stack_c4"] = m.concurrent_tps(lambda: GatewayClient(stack.gateway_address), "demo", PROMPT, n, 4, rounds=2)
        out["redis"] = asyncio.run(redis_costs(stack.redis_url))
        gen = client.generate("demo", PROMPT, n)
        out["detok_ms_per_token"] = detok_cost(build_dir, prompt_ids, list(gen.token_ids))
        direct_threads = threads if threads > 0 else (os.cpu_count() or 1)
        out["direct"] = direct(build_dir, prompt_ids, n, reps, direct_threads)
        out["direct"]["threads"] = direct_threads
        out["stack_vs_direct"] = out["stack_c1"]["tok_s"] / out["direct"]["tok_s"]
        out["ttft_added_ms"] = out["stack_c1"]["ttft_ms"] - out["direct"]["ttft_ms"]
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="0", help="comma-separated LLAMASHIP_THREADS values (-1: unset)")
    ap.add_argument("--tokens", type=int, default=256)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json", default="")
    ap.add_argument("--demo-model", default=str(ROOT / ".llamaship/demo/demo-model"))
    args = ap.parse_args()
    results = [run_threads(int(t), Path(args.demo_model), args.tokens, args.reps) for t in args.threads.split(",")]
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
