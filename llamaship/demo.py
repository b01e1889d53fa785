"""`make demo`: up → make-model → compile → generate through the gateway, then stop the stack.

Also times the same build called directly with onnxruntime-genai, so the gateway's overhead is
visible in every run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path


def direct_timing(build_dir: Path, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(time to first token s, decode tokens/s, tokens) calling the build with onnxruntime-genai."""
    import onnxruntime_genai as og

    from serving_service.text import PromptTokenizer

    model = og.Model(str(build_dir))
    ids = PromptTokenizer(build_dir).encode(prompt)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + max_tokens, do_sample=False)
    gen = og.Generator(model, params)
    t0 = time.perf_counter()
    gen.append_tokens(ids)
    gen.generate_next_token()
    ttft = time.perf_counter() - t0
    n = 1
    while not gen.is_done():
        gen.generate_next_token()
        n += 1
    total = time.perf_counter() - t0
    return ttft, (n - 1) / (total - ttft) if n > 1 else 0.0, n


def run_demo(workdir: Path, recipe: str, prompt: str, max_tokens: int) -> int:
    from llamaship.client import GatewayClient
    from llamaship.demo_model import DEFAULT_DIR, make_model
    from llamaship.stack import Stack, StackConfig
    from shared.store import BuildStore

    workdir = workdir.resolve()
    model_dir = DEFAULT_DIR
    print(f"[1/4] demo model in {model_dir} (trained once, then cached)", flush=True)
    t0 = time.time()
    make_model(model_dir, progress=lambda s, n, loss: print(f"      step {s}/{n} loss {loss:.3f}", flush=True) if s % 50 == 0 else None)
    print(f"      ready in {time.time() - t0:.0f}s", flush=True)

    print("[2/4] starting the stack (embedded Redis, compiler, cpu replica, gateway)", flush=True)
    cfg = StackConfig(store=workdir / "store", log_dir=workdir / "logs")
    with Stack(cfg) as stack:
        for name, proc in stack.procs.items():
            print(f"      {name:<16} {proc.address}", flush=True)
        with GatewayClient(stack.gateway_address) as client:
            print(f"[3/4] compiling {model_dir.name} with recipe {recipe}", flush=True)
            last = [""]

            def on_update(job) -> None:
                line = f"      {job.stage:<9} {job.progress * 100:5.1f}%  {job.message}"
                if line != last[0]:
                    print(line, flush=True)
                    last[0] = line

            t0 = time.time()
            job = client.compile(str(model_dir), "demo", recipe, on_update=on_update)
            if not job.build_id:
                print(f"llamaship demo: compile failed: {job.message}", file=sys.stderr)
                return 1
            print(f"      build {job.build_id} served after {time.time() - t0:.1f}s", flush=True)

            print(f"[4/4] generate through the gateway (sampled: temperature 0.7, top_k 40, seed 7; "
                  f"{max_tokens} tokens):", flush=True)
            print("-" * 72)
            sys.stdout.write(prompt)
            out = client.generate("demo", prompt, max_tokens, on_text=lambda t: (sys.stdout.write(t), sys.stdout.flush()),
                                  temperature=0.7, top_k=40, seed=7)
            print("\n" + "-" * 72)
            runs = [client.generate("demo", prompt, max_tokens) for _ in range(3)]
            best = min(runs, key=lambda c: c.time_to_first_token_s)
            gw_tps = max(c.decode_tokens_per_s for c in runs)
            store = BuildStore(cfg.store)
            direct = [direct_timing(store.path(job.build_id), prompt, max_tokens) for _ in range(3)]
            d_ttft = min(d[0] for d in direct)
            d_tps = max(d[1] for d in direct)
            print(f"finish: {out.finish_reason}, {out.completion_tokens} tokens, build {out.build_id}")
            print("timings below: greedy decoding, same prompt and max tokens")
            print(f"through the gateway     : time to first token {best.time_to_first_token_s * 1000:7.1f} ms, "
                  f"decode {gw_tps:7.1f} tokens/s (best of 3)")
            print(f"direct onnxruntime-genai: time to first token {d_ttft * 1000:7.1f} ms, "
                  f"decode {d_tps:7.1f} tokens/s (best of 3)")
    print("stack stopped.")
    return 0
