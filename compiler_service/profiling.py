"""Operator profile and fusion report of a build, and ONNX Runtime's offline-optimized graph.

The profile runs ONNX Runtime's own profiler (through onnxruntime-genai, the serving runtime)
over one prefill and a number of decode steps, and summarizes the trace: kernel time per op
type, split into prefill and decode, the share spent in attention, the fused kernels present,
and warnings for attention or normalization left unfused (slow paths).
"""

from __future__ import annotations

import gc
import gzip
import json
import shutil
import statistics
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

FUSED_OPS = ("GroupQueryAttention", "RotaryEmbedding", "SkipSimplifiedLayerNormalization",
             "SimplifiedLayerNormalization", "MatMulNBits", "QuickGelu")
# ops whose presence in the graph means a slow, unfused path
UNFUSED_ATTENTION = ("Softmax", "MultiHeadAttention", "Attention")
UNFUSED_NORM = ("ReduceMean", "Pow", "Sqrt", "LayerNormalization")
TRACE_FILE = "profile/ort_trace.json.gz"


def _run_profiled(build_dir: Path, trace_dir: Path, prompt_ids: list[int], decode_steps: int) -> Path:
    import onnxruntime_genai as og

    trace_dir.mkdir(parents=True, exist_ok=True)  # ORT writes nothing if the directory is missing
    prefix = trace_dir / "ort"
    config = og.Config(str(build_dir))
    config.clear_providers()
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"enable_profiling": str(prefix)}}}}))
    model = og.Model(config)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + decode_steps + 2, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.asarray(prompt_ids, dtype=np.int32))  # the prefill run
    for _ in range(decode_steps + 1):  # the first call samples the prefill's logits; each later one decodes
        gen.generate_next_token()
    del gen, params, model
    gc.collect()  # the trace is written when the session goes away
    traces = sorted(trace_dir.glob("ort_*.json"))
    if not traces:
        raise RuntimeError("ONNX Runtime wrote no profile trace")
    return traces[-1]


def summarize(trace: list[dict], graph_ops: dict[str, int]) -> dict:
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    prefill = runs[0] if runs else (0, -1)
    per_op: dict[str, Counter] = defaultdict(Counter)
    for e in trace:
        if e.get("cat") != "Node" or not str(e.get("name", "")).endswith("_kernel_time"):
            continue
        phase = "prefill_us" if prefill[0] <= e["ts"] <= prefill[1] else "decode_us"
        op = e.get("args", {}).get("op_name", "?")
        per_op[op][phase] += e["dur"]
        per_op[op]["us"] += e["dur"]
        per_op[op]["calls"] += 1
    total = sum(c["us"] for c in per_op.values()) or 1
    attention = sum(per_op[op]["us"] for op in ("GroupQueryAttention", *UNFUSED_ATTENTION) if op in per_op)
    warnings = []
    if not graph_ops.get("GroupQueryAttention") or any(graph_ops.get(op) for op in UNFUSED_ATTENTION):
        warnings.append("attention is not (only) the fused GroupQueryAttention kernel: "
                        + ", ".join(f"{op} x{graph_ops[op]}" for op in UNFUSED_ATTENTION if graph_ops.get(op)))
    if any(graph_ops.get(op) for op in UNFUSED_NORM):
        warnings.append("normalization left unfused: "
                        + ", ".join(f"{op} x{graph_ops[op]}" for op in UNFUSED_NORM if graph_ops.get(op)))
    decode_runs = [b - a for a, b in runs[1:]]
    return {
        "model_runs": len(runs),
        "prefill_ms": round((prefill[1] - prefill[0]) / 1000, 3) if runs else None,
        "decode_step_ms_median": round(statistics.median(decode_runs) / 1000, 3) if decode_runs else None,
        "per_op": {op: {k: c[k] for k in ("us", "prefill_us", "decode_us", "calls")} | {"share": round(c["us"] / total, 4)}
                   for op, c in sorted(per_op.items(), key=lambda kv: -kv[1]["us"])},
        "attention_share": round(attention / total, 4),
        "fused_ops": [op for op in FUSED_OPS if graph_ops.get(op)],
        "rotary": "fused into GroupQueryAttention" if graph_ops.get("GroupQueryAttention") and not graph_ops.get("RotaryEmbedding")
        else ("RotaryEmbedding kernel" if graph_ops.get("RotaryEmbedding") else "none"),
        "warnings": warnings,
    }


def profile_build(build_dir: Path, work_dir: Path, graph_ops: dict[str, int], vocab_size: int,
                  prompt_len: int = 64, decode_steps: int = 16) -> dict:
    """Profile, store the gzipped trace in the build (TRACE_FILE) and return the summary."""
    rng = np.random.default_rng(0)
    prompt = [1, *rng.integers(3, max(4, vocab_size - 1), prompt_len - 1).tolist()]
    trace_path = _run_profiled(build_dir, work_dir / "profile", prompt, decode_steps)
    trace = json.loads(trace_path.read_text())
    target = build_dir / TRACE_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(target, "wt") as f:
        json.dump(trace, f)
    summary = summarize(trace, graph_ops)
    summary.update(prompt_tokens=prompt_len, decode_steps=decode_steps, trace=TRACE_FILE)
    return summary


def _load_seconds(build_dir: Path, repeats: int = 3) -> float:
    import onnxruntime_genai as og

    times = []
    for _ in range(repeats):
        config = og.Config(str(build_dir))
        config.clear_providers()
        t0 = time.perf_counter()
        model = og.Model(config)
        times.append(time.perf_counter() - t0)
        del model
        gc.collect()
    return statistics.median(times)


def offline_optimize(build_dir: Path, work_dir: Path, min_gain: float = 0.10) -> dict:
    """Let ONNX Runtime optimize the graph offline (EXTENDED: portable across machines); keep
    the optimized graph in the build when it loads at least `min_gain` faster. CPU builds only."""
    import onnxruntime as ort

    out = work_dir / "optimized"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(build_dir, out, ignore=shutil.ignore_patterns("model.onnx", "model.onnx.data", "profile"))
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(out / "model.onnx")
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", "model.onnx.data")
    so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
    ort.InferenceSession(str(build_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
    original, optimized = _load_seconds(build_dir), _load_seconds(out)
    shipped = optimized < original * (1 - min_gain)
    if shipped:
        for name in ("model.onnx", "model.onnx.data"):
            shutil.move(str(out / name), str(build_dir / name))
    shutil.rmtree(out, ignore_errors=True)
    return {"load_s_original": round(original, 4), "load_s_optimized": round(optimized, 4),
            "shipped": "optimized (ORT_ENABLE_EXTENDED)" if shipped else "original (the optimized graph loaded no faster)"}
