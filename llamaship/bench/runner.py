"""`llamaship bench`: every contender on the same machine in one run; the stack as a user starts it."""

from __future__ import annotations

import datetime as dt
import gc
import json
import os
import platform
import shutil
import socket
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from tqdm import tqdm

from llamaship.bench import measure as m
from llamaship.bench import serving as bs
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2
from llamaship.bench import models as bm
from llamaship.bench.models import bench_checkpoint

ROOT = Path(__file__).resolve().parents[2]
CPU_RECIPES = ("fp32", "int8", "hybrid-int8", "hybrid-int4", "int4", "auto")
CUDA_RECIPES = ("fp16", "int4")


class Plan:
    def __init__(self, quick: bool, large: bool, recipes: list[str] | None, device: str,
                 models: list[str] | None = None):
        self.quick = quick
        self.device = device
        self.models = bm.resolve_models(models, quick, large)
        self.recipes = list(recipes or (CUDA_RECIPES if device == "cuda" else CPU_RECIPES))
        self.short_tokens = 16
        self.long_tokens = 256 if quick else 512
        self.new_tokens = 32 if quick else 128
        self.reps_short = 3 if quick else 10
        self.reps_long = 2 if quick else 5
        self.concurrency = (1, 4, 16)
        self.conc_tokens = 16 if quick else 64
        self.torch_reps = 2 if quick else 3
        # serving workloads (llamaship.bench.serving)
        self.serving_requests = 16 if quick else 48
        self.serving_prompt_tokens = 32
        self.serving_new_tokens = 16 if quick else 64
        self.prefix_tokens = 512
        self.prefix_turns = 4 if quick else 8

    def recipes_for(self, model: str) -> list[str]:
        """Llama 4 builds have no hybrid-int8 (and on cpu no fp16): the plan's recipes that Llama 4 has."""
        if not bm.is_llama4(model):
            return self.recipes
        known = bm.LLAMA4_CPU_RECIPES if self.device == "cpu" else CUDA_RECIPES
        return [r for r in self.recipes if r in known]


def prompt_text(tokenizer, n_tokens: int) -> str:
    """Source text whose encoding (BOS included) is about n_tokens long."""
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    ids = tokenizer.tokenizer.encode(text, add_special_tokens=False).ids[: n_tokens - 1]
    return tokenizer.decode(ids)


def run_bench(plan: Plan, out_dir: Path, cache: Path, threads: int) -> dict:
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig
    from serving_service.text import PromptTokenizer
    from shared.store import BuildStore

    stamp = dt.datetime.now().strftime("%Y-%m-%dT%H%M%S")
    report: dict = {
        "meta": {
            "date": stamp, "host": socket.gethostname(), "platform": platform.platform(),
            "cpu_count": os.cpu_count(), "threads": threads, "device": plan.device, "quick": plan.quick,
            "python": sys.version.split()[0], "versions": _versions(),
            "weights_note": "llama-* checkpoints have random weights (decode speed does not depend on values); "
                            "demo is the trained demo model",
            "plan": {k: v for k, v in vars(plan).items()},
        },
        "models": {},
    }
    steps = sum(len(plan.recipes_for(n)) + 2 for n in plan.models) + 1
    bar = tqdm(total=steps, desc="bench", unit="step")
    bar.set_postfix_str("memory bandwidth")
    bandwidth = [m.memory_bandwidth_gbs(threads, device=plan.device)]
    bar.update(1)

    # A fresh store each run, so that compile times are real builds, not re-publications.
    store_dir = Path(tempfile.mkdtemp(prefix="store-", dir=cache))
    # the stack runs as a user starts it: its own thread default (one per core), no tuning flags
    cfg = StackConfig(store=store_dir, log_dir=out_dir / "logs", slots=16,
                      pool=plan.device)
    with Stack(cfg) as stack:
        client = GatewayClient(stack.gateway_address)
        store = BuildStore(cfg.store)
        for model_name in plan.models:
            bar.set_postfix_str(f"{model_name}: checkpoint")
            ckpt = bench_checkpoint(model_name, cache / "checkpoints")
            tok = PromptTokenizer(ckpt)
            prompts = {"short": prompt_text(tok, plan.short_tokens), "long": prompt_text(tok, plan.long_tokens)}
            entry: dict = {"checkpoint": str(ckpt), "prompt_tokens": {k: len(tok.encode(v)) for k, v in prompts.items()},
                           "pytorch": {}, "recipes": {}, "checkpoint_bytes": bm.checkpoint_bytes(ckpt)}
            llama4 = bm.is_llama4(model_name)
            if llama4:
                config = json.loads((ckpt / "config.json").read_text())
                fp32 = bm.llama4_active_bytes(config, {}, dtype_bytes=4)
                entry["llama4"] = {"spec": {k: v for k, v in vars(bm.llama4_spec(model_name)).items()},
                                   "active_params": fp32["active_params"], "total_params": fp32["total_params"]}
            report["models"][model_name] = entry
            bar.update(1)

            bar.set_postfix_str(f"{model_name}: PyTorch eager")
            if llama4:  # transformers' Llama4ForCausalLM, float32 (the quality gate's reference model)
                dtypes = ["float32"]
            elif plan.device == "cuda":
                dtypes = ["float32", "float16"]
            else:
                dtypes = ["float32"] + (["bfloat16"] if m.bf16_supported() else [])
            for dtype in dtypes:
                eager = m.TorchEager(ckpt, dtype, threads, device=plan.device, llama4=llama4)
                ids = {k: tok.encode(v) for k, v in prompts.items()}
                eager.run(ids["short"], 4)
                runs = {k: [eager.run(ids[k], plan.new_tokens) for _ in range(plan.torch_reps)] for k in ids}
                entry["pytorch"][dtype] = {
                    "short": m.summarize(runs["short"]), "long": m.summarize(runs["long"]),
                    "bytes_per_token": m.torch_weight_bytes(ckpt, 4 if dtype == "float32" else 2),
                    "device": plan.device,
                    **({"bytes_per_token": fp32["active_bytes"], "dense_bytes_per_token": fp32["dense_bytes"]}
                       if llama4 else {}),
                    "raw": {k: [m.as_dict(r) for r in v] for k, v in runs.items()},
                }
                del eager
                gc.collect()
            bar.update(1)

            for recipe in plan.recipes_for(model_name):
                bar.set_postfix_str(f"{model_name}: {recipe}")
                name = f"bench-{model_name}-{recipe}".replace(".", "-")
                t0 = time.perf_counter()
                # the compiler's processes (service + build children), sampled from outside during the compile
                with m.TreeRssSampler(stack.procs["compiler"].popen.pid) as compiler_rss:
                    # forced: a build that misses its quality gate is still measured (the report says it failed)
                    job = client.compile(str(ckpt), name, recipe, plan.device,
                                         quality=compiler_pb2.QualityGate(force_publish=True))
                compile_s = time.perf_counter() - t0
                if not job.build_id:
                    entry["recipes"][recipe] = {"error": job.message}
                    bar.update(1)
                    continue
                build_dir = store.path(job.build_id)
                manifest = store.manifest(job.build_id)
                entry["recipes"][recipe] = _measure_recipe(plan, client, stack, name, build_dir, tok, prompts, threads)
                entry["recipes"][recipe].update({
                    "build_id": job.build_id, "compile_s": compile_s, "reused_build": job.reused,
                    "build_bytes": manifest.total_bytes, **m.onnx_weight_bytes(build_dir),
                    "quality": manifest.quality, "auto": manifest.recipe_details.get("auto"),
                    "profile": (manifest.profile or {}).get("summary"),
                    "compile_rss_mb": compiler_rss.result(),
                })
                if llama4:
                    precision = manifest.recipe_details.get("builder_precision") or recipe
                    active = bm.llama4_active_bytes(config, bm.llama4_bits(precision))
                    entry["recipes"][recipe].update({
                        "builder_precision": precision, "active_bytes_per_token": active["active_bytes"],
                        "dense_bytes_per_token": active["dense_bytes"], "active_bytes_parts": active["parts"]})
                bar.update(1)
        report["peak_rss_mb"] = {n: m.peak_rss_mb(p.popen.pid, with_children=True) for n, p in stack.procs.items()}
        # measured at the start and the end (a shared machine's bandwidth varies); the best is the limit
        bandwidth.append(m.memory_bandwidth_gbs(threads, device=plan.device))
        report["bandwidth_samples_gbs"] = bandwidth
        report["bandwidth_gbs"] = max(bandwidth)
        report["peak_rss_mb"]["bench (PyTorch + direct ORT)"] = m.peak_rss_mb(os.getpid())
        client.close()
    shutil.rmtree(store_dir, ignore_errors=True)
    bar.close()
    return report


def _measure_recipe(plan: Plan, client, stack, name: str, build_dir: Path, tok, prompts: dict, threads: int) -> dict:
    from llamaship.client import GatewayClient

    direct = m.DirectOG(build_dir, threads)
    ids = {k: tok.encode(v) for k, v in prompts.items()}
    direct.run(ids["short"], 4)
    cpu0 = m.cpu_seconds({"bench (direct ORT)": os.getpid()})
    d_short = [direct.run(ids["short"], plan.new_tokens) for _ in range(plan.reps_short)]
    direct_cpu = m.cpu_ms_per_token(cpu0, m.cpu_seconds({"bench (direct ORT)": os.getpid()}), d_short)
    d_runs = {"short": d_short, "long": [direct.run(ids["long"], plan.new_tokens) for _ in range(plan.reps_long)]}
    pad_to = plan.long_tokens
    padded_ids = [0] * (pad_to - len(ids["short"])) + ids["short"]
    p_runs = [direct.run(padded_ids, plan.new_tokens) for _ in range(plan.reps_long)]
    del direct
    gc.collect()

    m.stack_run(client, name, prompts["short"], 4)
    pids = {n: p.popen.pid for n, p in stack.procs.items()}
    pids["client (bench)"] = os.getpid()
    cpu0 = m.cpu_seconds(pids)
    s_short = [m.stack_run(client, name, prompts["short"], plan.new_tokens) for _ in range(plan.reps_short)]
    stack_cpu = m.cpu_ms_per_token(cpu0, m.cpu_seconds(pids), s_short)
    s_runs = {"short": s_short,
              "long": [m.stack_run(client, name, prompts["long"], plan.new_tokens) for _ in range(plan.reps_long)]}
    conc = [m.concurrent_tps(lambda: GatewayClient(stack.gateway_address), name, prompts["short"], plan.conc_tokens, c)
            for c in plan.concurrency]
    serving = bs.measure(plan, lambda: GatewayClient(stack.gateway_address), name, build_dir, tok, threads)
    return {
        "serving": serving,
        "direct": {k: m.summarize(v) for k, v in d_runs.items()},
        "direct_padded": {"pad_to": pad_to, **m.summarize(p_runs)},
        "stack": {k: m.summarize(v) for k, v in s_runs.items()},
        "concurrency": conc,
        "cpu_ms_per_token": {"direct": direct_cpu, "stack": stack_cpu},
        "raw": {
            "direct": {k: [m.as_dict(r) for r in v] for k, v in d_runs.items()},
            "direct_padded": [m.as_dict(r) for r in p_runs],
            "stack": {k: [m.as_dict(r) for r in v] for k, v in s_runs.items()},
        },
    }


def _versions() -> dict:
    from shared.service import package_versions

    return package_versions(("onnxruntime-genai", "onnxruntime", "torch", "transformers", "grpcio", "redis"))


def main(args) -> int:
    from llamaship.bench import report as rep

    if args.device == "cuda":
        import onnxruntime_genai as og

        if not og.is_cuda_available():
            print("llamaship bench: --device cuda needs onnxruntime-genai-cuda and a GPU "
                  "(pip install -e '.[cuda]')", file=sys.stderr)
            return 1
    try:
        plan = Plan(args.quick, args.large, args.recipes, args.device, getattr(args, "models", None))
    except ValueError as exc:
        print(f"llamaship bench: {exc}", file=sys.stderr)
        return 2
    out_dir = Path(args.out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    report = run_bench(plan, out_dir, cache, args.threads or m.threads_default())
    rep.evaluate(report)
    base = out_dir / f"{report['meta']['date']}-{report['meta']['host']}"
    charts = rep.charts(report, base)
    report["charts"] = [str(c.relative_to(out_dir)) for c in charts]
    base.with_suffix(".json").write_text(json.dumps(report, indent=1, default=float))
    markdown = rep.markdown(report, chart_prefix=base.name + "/")
    base.with_suffix(".md").write_text(markdown)
    if args.update_readme:
        rep.update_readme(ROOT / "README.md", report, charts, ROOT / "bench" / "latest")
    print(markdown)
    print(f"\nreport: {base.with_suffix('.md')}\nraw samples: {base.with_suffix('.json')}")
    return 0
