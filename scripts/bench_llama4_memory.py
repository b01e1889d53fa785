"""Bounded memory of the Llama 4 compile (issue 10, item 4), measured from outside.

Generates a Llama 4 checkpoint of about --gb GB in bf16 (random weights, ~5 GB shards named and
indexed as published checkpoints are, written slice by slice: make_llama4(streamed=True)), builds it at --precision with
compiler_service.llama4.build.build_llama4 in a child process (the compile's memory-heavy step),
samples the RSS of that child and its descendants every 50 ms from this process, and compares the
peak with the build's and the checkpoint's size. Also records the child's own VmHWM (kernel peak).

    python scripts/bench_llama4_memory.py --gb 8 --precision int4 --out bench/results

Writes <out>/<date>-llama4-memory.{json,md}. The checkpoint and the build are deleted afterwards
unless --keep.

With --stack it then compiles the same checkpoint through a real stack (`llamaship compile`'s
path: validate, hash, build, verify with the smoke test, profile, the quality gate's layer-at-a-time
PyTorch reference, publish) and reports the compile job's peak RSS as the manifest records it (the
compiler service and its children, sampled during the job), the idle service's RSS before it,
and both against the build's size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
from pathlib import Path
from compiler_service.llama4.build import build_llama4
t0 = time.perf_counter()
build_llama4(Path(sys.argv[1]), Path(sys.argv[2]), precision=sys.argv[3], pool="cpu", context_length=int(sys.argv[4]))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"build_s": time.perf_counter() - t0, "vmhwm_mb": hwm * 1024 / 1e6}))
"""


def spec_for_gb(gb: float):
    """Scout's proportions scaled down: 16 experts, top-1, hidden 2048, expert width 2048,
    MoE on every layer; the layer count sets the size (about 0.454 GB of bf16 per layer)."""
    from llamaship.llama4_model import Llama4Spec

    import math

    per_layer = 2 * (2 * 2048 * 2048 + 2 * 512 * 2048 + 17 * 3 * 2048 * 2048 + 16 * 2048)
    layers = max(1, math.ceil(gb * 1e9 / per_layer))
    return Llama4Spec(hidden_size=2048, num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=4,
                      head_dim=128, intermediate_size=2048, intermediate_size_mlp=4096, num_experts=16, top_k=1,
                      init_std=0.02, dtype="bfloat16", max_shard_size="5GB", streamed=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gb", type=float, default=8.0, help="checkpoint size to generate (bf16)")
    ap.add_argument("--precision", default="int4")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--work", default=str(ROOT / ".llamaship" / "bench" / "memory"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--stack", action="store_true", help="also compile it through a real stack")
    args = ap.parse_args()

    from llamaship.bench.measure import TreeRssSampler
    from llamaship.bench.models import checkpoint_bytes
    from llamaship.llama4_model import make_llama4

    work = Path(args.work).resolve()
    ckpt, build = work / f"llama4-{args.gb:g}gb", work / f"build-{args.precision}"
    spec = spec_for_gb(args.gb)
    t0 = time.perf_counter()
    make_llama4(ckpt, spec)
    gen_s = time.perf_counter() - t0
    ckpt_bytes = checkpoint_bytes(ckpt)
    shards = sorted(p.name for p in ckpt.glob("*.safetensors"))
    print(f"checkpoint {ckpt_bytes / 1e9:.2f} GB in {len(shards)} shards ({gen_s:.0f} s)", flush=True)

    shutil.rmtree(build, ignore_errors=True)
    t0 = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(ckpt), str(build), args.precision, str(args.context)],
                             cwd=ROOT, stdout=subprocess.PIPE, text=True)
    with TreeRssSampler(child.pid) as rss:
        out, _ = child.communicate()
    wall_s = time.perf_counter() - t0
    if child.returncode:
        print(f"build failed (exit {child.returncode})", file=sys.stderr)
        return 1
    inner = json.loads(out.strip().splitlines()[-1])
    build_bytes = sum(p.stat().st_size for p in build.rglob("*") if p.is_file())
    peak_mb = max(rss.peak, inner["vmhwm_mb"])
    result = {
        "date": dt.datetime.now().strftime("%Y-%m-%dT%H%M%S"), "host": socket.gethostname(),
        "cpu_count": os.cpu_count(), "precision": args.precision, "context_length": args.context,
        "spec": {k: v for k, v in vars(spec).items()}, "shards": shards,
        "checkpoint_bytes": ckpt_bytes, "build_bytes": build_bytes,
        "generate_s": gen_s, "build_wall_s": wall_s, "build_s": inner["build_s"],
        "peak_rss_mb_sampled": rss.peak, "rss_samples": rss.samples, "child_vmhwm_mb": inner["vmhwm_mb"],
        "peak_rss_mb": peak_mb,
        "peak_vs_build": peak_mb * 1e6 / build_bytes, "peak_vs_checkpoint": peak_mb * 1e6 / ckpt_bytes,
        "target": "peak RSS ≤ 1.5 × build size", "met": peak_mb * 1e6 <= 1.5 * build_bytes,
    }
    if args.stack:
        result["stack"] = compile_through_stack(ckpt, args.precision, args.context, work, build_bytes)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = out_dir / f"{result['date']}-{result['host']}-llama4-memory"
    base.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = markdown(result)
    base.with_suffix(".md").write_text(md)
    print(md)
    if not args.keep:
        shutil.rmtree(ckpt, ignore_errors=True)
        shutil.rmtree(build, ignore_errors=True)
    return 0


def compile_through_stack(ckpt: Path, precision: str, context: int, work: Path, build_bytes: int) -> dict:
    """Compile `ckpt` through a real stack; the manifest's compile_peak_rss_bytes against the build."""
    import tempfile

    from llamaship.bench.measure import TreeRssSampler
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig
    from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2
    from shared.store import BuildStore

    store_dir = Path(tempfile.mkdtemp(prefix="store-", dir=work))
    try:
        with Stack(StackConfig(store=store_dir, log_dir=work / "logs")) as stack:
            compiler = stack.procs["compiler"].popen.pid
            t0 = time.perf_counter()
            with TreeRssSampler(compiler) as rss, GatewayClient(stack.gateway_address) as client:
                job = client.compile(str(ckpt), "llama4-memory", precision, "cpu", max_sequence_length=context,
                                     quality=compiler_pb2.QualityGate(force_publish=True), wait_served=False)
            wall = time.perf_counter() - t0
            idle_mb = rss.start  # the service before the job
            if not job.build_id:
                return {"error": job.message}
            manifest = BuildStore(store_dir).manifest(job.build_id)
            peak = manifest.recipe_details.get("compile_peak_rss_bytes", 0) / 1e6
            return {"compile_s": wall, "idle_service_mb": idle_mb, "manifest_peak_rss_mb": peak,
                    "sampled_peak_rss_mb": rss.peak, "quality_passed": manifest.quality.get("passed"),
                    "peak_vs_build": peak * 1e6 / build_bytes,
                    "peak_above_idle_vs_build": (peak - idle_mb) * 1e6 / build_bytes,
                    "met": peak * 1e6 <= 1.5 * build_bytes}
    finally:
        shutil.rmtree(store_dir, ignore_errors=True)


def markdown(r: dict) -> str:
    s = r["spec"]
    st = r.get("stack")
    stack_lines = [] if not st else ([f"Through a real stack: {st['error']}", ""] if "error" in st else [
        "Through a real stack (`llamaship compile`'s whole job: build, verify, profile, the layer-at-a-time "
        "PyTorch gate, publish), the compile job's peak RSS as its manifest records it:", "",
        "| compile s | idle service MB | job peak RSS MB (manifest / sampled) | peak ÷ build | "
        "(peak − idle) ÷ build | target ≤ 1.5 × build |", "|---|---|---|---|---|---|",
        f"| {st['compile_s']:.0f} | {st['idle_service_mb']:.0f} | {st['manifest_peak_rss_mb']:.0f} / "
        f"{st['sampled_peak_rss_mb']:.0f} | {st['peak_vs_build']:.2f} | {st['peak_above_idle_vs_build']:.2f} | "
        f"{'met' if st['met'] else 'NOT met'} |", ""])
    return "\n".join(stack_lines + [
        f"# Llama 4 compile memory — {r['date']} on {r['host']}", "",
        f"Generated Llama4ForCausalLM, bf16, random weights: hidden {s['hidden_size']}, {s['num_hidden_layers']} layers, "
        f"{s['num_experts']} experts top-{s['top_k']} of width {s['intermediate_size']}, MoE on every layer; "
        f"{len(r['shards'])} shards ({', '.join(r['shards'])}). Built `{r['precision']}` by "
        f"`compiler_service.llama4.build.build_llama4` in a child process ({r['cpu_count']} cores); its RSS "
        f"(with any descendants) sampled every 50 ms from outside ({r['rss_samples']} samples), and its VmHWM.", "",
        "| checkpoint GB | build GB | build s | peak RSS MB (sampled / VmHWM) | peak ÷ build | peak ÷ checkpoint | "
        "target ≤ 1.5 × build |",
        "|---|---|---|---|---|---|---|",
        f"| {r['checkpoint_bytes'] / 1e9:.2f} | {r['build_bytes'] / 1e9:.2f} | {r['build_s']:.0f} | "
        f"{r['peak_rss_mb_sampled']:.0f} / {r['child_vmhwm_mb']:.0f} | {r['peak_vs_build']:.2f} | "
        f"{r['peak_vs_checkpoint']:.2f} | {'met' if r['met'] else 'NOT met'} |", ""])


if __name__ == "__main__":
    raise SystemExit(main())
