"""Trickle workload through the decode worker: N greedy requests, each arriving one decode step
after the last, with the iteration engine and with onnxruntime-genai cohorts.

    .venv/bin/python scripts/bench_iteration.py BUILD_DIR [--requests 16] [--new-tokens 128]

BUILD_DIR is a build (genai_config.json, model.onnx), e.g. the demo model's int8 build. One
decode step is measured first (one request alone, its tokens over its time); then request i is
submitted at i steps. Reports aggregate tok/s (all tokens / first submit to last token), time to
first token p50/p99 and whether every engine produced the same tokens; --static adds the ceiling,
every request in one static batch run directly with onnxruntime-genai.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from serving_service.decode_worker import DecodeWorker  # noqa: E402


async def _one(worker: DecodeWorker, rid: str, prompt: list[int], new: int, t0: float) -> tuple[list[int], float, float]:
    queue = worker.submit(rid, prompt, {"max_length": len(prompt) + new, "do_sample": False}, len(prompt) + new)
    tokens: list[int] = []
    first = 0.0
    while True:
        kind, value = await queue.get()
        if kind == "error":
            raise value
        if kind == "done":
            break
        if not tokens:
            first = time.perf_counter() - t0
        tokens.append(value)
    worker.release(rid, finished=True)
    return tokens, first, time.perf_counter()


async def run_engine(build: str, engine: str, prompts: list[list[int]], new: int, threads: int, rows: int) -> dict:
    worker = await DecodeWorker.start(f"bench-{engine}", build, None, threads, rows, engine=engine)
    try:
        t = time.perf_counter()
        alone, _, end = await _one(worker, "alone", prompts[0], new, t)
        step_s = (end - t) / max(1, len(alone))
        tasks = []
        t0 = time.perf_counter()
        for i, prompt in enumerate(prompts):
            submit_at = t0 + i * step_s
            await asyncio.sleep(max(0.0, submit_at - time.perf_counter()))
            tasks.append(asyncio.create_task(_one(worker, f"r{i}", prompt, new, time.perf_counter())))
        results = await asyncio.gather(*tasks)
        wall = max(r[2] for r in results) - t0
        total = sum(len(r[0]) for r in results)
        ttft = np.array([r[1] for r in results]) * 1000
        return {"engine": engine, "c1_tok_s": round(1 / step_s, 1), "aggregate_tok_s": round(total / wall, 1),
                "tokens": total, "wall_s": round(wall, 3), "ttft_p50_ms": round(float(np.percentile(ttft, 50)), 1),
                "ttft_p99_ms": round(float(np.percentile(ttft, 99)), 1),
                "batch_rows": dict(sorted(worker.step_rows.items())), "_tokens": [r[0] for r in results]}
    finally:
        worker.close()


def static_batch(build: str, prompts: list[list[int]], new: int, threads: int) -> dict:
    """The ceiling: every request in one static onnxruntime-genai batch, run directly."""
    import onnxruntime_genai as og

    from serving_service.decode_worker import usable_cores

    config = og.Config(build)
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {
        "intra_op_num_threads": threads or usable_cores()}}}}))
    model = og.Model(config)
    width = max(len(p) for p in prompts)
    batch = np.asarray([p + [0] * (width - len(p)) for p in prompts], dtype=np.int32)
    best = 0.0
    for _ in range(2):  # the first run warms
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=width + new, do_sample=False, batch_size=len(prompts))
        gen = og.Generator(model, params)
        t0 = time.perf_counter()
        gen.append_tokens(batch)
        for _ in range(new):
            gen.generate_next_token()
        best = max(best, len(prompts) * new / (time.perf_counter() - t0))
    return {"engine": f"static-{len(prompts)}-rows (genai, direct)", "aggregate_tok_s": round(best, 1)}


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("build")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--engines", default="iteration,genai")
    ap.add_argument("--static", action="store_true", help="also run every request as one static batch, directly")
    args = ap.parse_args()
    vocab = json.loads((Path(args.build) / "genai_config.json").read_text())["model"]["vocab_size"]
    rng = np.random.default_rng(0)
    prompts = [[1] + [int(t) for t in rng.integers(3, vocab, args.prompt_tokens - 1)] for _ in range(args.requests)]
    results = [await run_engine(args.build, e, prompts, args.new_tokens, args.threads, args.requests)
               for e in args.engines.split(",")]
    same = all(r["_tokens"] == results[0]["_tokens"] for r in results)
    for r in results:
        r.pop("_tokens")
        print(json.dumps(r))
    print(json.dumps({"same_tokens": same}))
    if args.static:
        print(json.dumps(static_batch(args.build, prompts, args.new_tokens, args.threads)))


if __name__ == "__main__":
    asyncio.run(main())
