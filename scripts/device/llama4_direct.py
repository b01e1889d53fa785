"""Llama 4 builds for the cuda pool, run by ONNX Runtime directly on the GPU, against transformers.

python3 .gpu/bin/llama4_direct.py --out llama4_direct.json [--device cpu]

For each tiny config (every MoE feature of the issue's test list), builds fp16 and int4 with the
Llama 4 graph builder (pool cuda), runs a right-padded batch of prompts of different lengths
(prefill, then greedy decode steps fed with the reference's tokens) through ONNX Runtime's CUDA
provider with the KV buffers shared between past and present as onnxruntime-genai runs it, and compares with transformers on the GPU in float32 and float16 (for int4: with the
build's own dequantized weights). It also says whether every node ran on CUDA (a session with the
CPU fallback disabled; ORT places shape arithmetic on the CPU on purpose, so this is information). Exit 0 when every config's greedy tokens agree with the closest reference.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

W64 = {"intermediate_size": 64}  # CUDA's QMoE tile: narrower experts would stay float16 in an int4 build
CONFIGS = {
    "moe-every-layer": {**W64, "interleave_moe_layer_step": 1},
    "moe-alternate-layers": {**W64, "interleave_moe_layer_step": 2},
    "moe-explicit-list+top2": {**W64, "moe_layers": [0, 3], "num_experts_per_tok": 2},
    "nope-every-2nd+no-qk-norm": {**W64, "no_rope_layer_interval": 2, "use_qk_norm": False},
    "no-temperature-tuning": {**W64, "attn_temperature_tuning": False},
    # the chunk (8192) holds the whole context (128): no attention_bias in the graph
    "chunk-beyond-context": {**W64, "attention_chunk_size": 8192},
    "chunk-beyond-context+no-qk-norm": {**W64, "attention_chunk_size": 8192, "use_qk_norm": False},
}
MAX_LEN = 64  # the shared KV buffer's length, as onnxruntime-genai allocates it
LENGTHS = (40, 23, 9)  # longer than the chunk (8) and the temperature floor (4)
DECODE = 8
TIE = 0.05  # logits of about ±5: float16 noise; a reference top-2 margin below this is a near-tie


def reference(model, prompts: list[list[int]], device: str, dtype) -> tuple[list, list]:
    """(per prompt: [prefill logits, decode-step logits...], per prompt: greedy tokens) of `model`."""
    import inspect

    import torch

    m = model.to(device=device, dtype=dtype)
    kw = "cache" if "cache" in inspect.signature(m.forward).parameters else "past_key_values"  # transformers 5.2x: cache
    logits_all, tokens_all = [], []
    with torch.no_grad():
        for p in prompts:
            out = m(input_ids=torch.tensor([p], device=device), use_cache=True)
            rows, cache, tokens = [out.logits[0].float().cpu().numpy()], out[kw], []
            for _ in range(DECODE):
                tokens.append(int(out.logits[0, -1].argmax()))
                out = m(input_ids=torch.tensor([[tokens[-1]]], device=device), use_cache=True, **{kw: cache})
                cache = out[kw]
                rows.append(out.logits[0, -1].float().cpu().numpy())
            logits_all.append(rows)
            tokens_all.append(tokens)
    return logits_all, tokens_all


def shared_buffer_steps(build: Path, prompts: list[list[int]], tokens: list[list[int]], layers: int, kv_heads: int,
                        head_dim: int, device: str) -> list[list]:
    """The build's logits as onnxruntime-genai drives it (past_present_share_buffer): one KV buffer
    per layer of [B, H, MAX_LEN, D] bound as both past and present (IO binding), a right-padded
    prefill, then decode steps fed with `tokens`, the attention mask growing by one column."""
    import numpy as np
    import onnxruntime as ort

    provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
    session = ort.InferenceSession(str(build / "model.onnx"), ort.SessionOptions(), providers=[provider])
    from tests.llama4_parity import kv_dtype, right_padded

    kv_type = kv_dtype(session)
    ids, mask = right_padded(prompts)
    batch = len(prompts)
    buffers = {(i, kind): ort.OrtValue.ortvalue_from_numpy(np.zeros((batch, kv_heads, MAX_LEN, head_dim), kv_type),
                                                           device, 0)
               for i in range(layers) for kind in ("key", "value")}
    results: list[list] = [[] for _ in prompts]
    for step in range(len(tokens[0]) + 1):
        io = session.io_binding()
        io.bind_cpu_input("input_ids", ids)
        io.bind_cpu_input("attention_mask", mask)
        for (i, kind), value in buffers.items():
            io.bind_ortvalue_input(f"past_key_values.{i}.{kind}", value)
            io.bind_ortvalue_output(f"present.{i}.{kind}", value)
        io.bind_output("logits", "cpu")
        session.run_with_iobinding(io)
        logits = io.get_outputs()[-1].numpy()  # outputs come in binding order: logits was bound last
        for b, p in enumerate(prompts):
            results[b].append(logits[b, : len(p)] if step == 0 else logits[b, -1])
        if step == len(tokens[0]):
            break
        ids = np.array([[t[step]] for t in tokens], dtype=np.int64)
        mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
    return results


def all_on(build: Path, provider: str) -> str:
    """'' if a session with the CPU fallback disabled loads (every node on `provider`), else why not."""
    import onnxruntime as ort

    if provider == "CPUExecutionProvider":
        return ""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        ort.InferenceSession(str(build / "model.onnx"), so, providers=[provider])
        return ""
    except Exception as exc:  # noqa: BLE001 - reported
        return f"{type(exc).__name__}: {str(exc)[:300]}"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda", help="cpu: a rehearsal without a GPU")
    args = ap.parse_args()

    import copy

    import numpy as np
    import torch

    from compiler_service.llama4.build import build_llama4
    from compiler_service.llama4.linear import precision_named
    from llamaship.llama4_model import demo_tokenizer_dir
    from tests.llama4_parity import fake_quantize_model, make_checkpoint

    provider = "CUDAExecutionProvider" if args.device == "cuda" else "CPUExecutionProvider"
    report: dict = {"device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu", "configs": {}}
    ok_all = True
    rng = np.random.default_rng(0)
    prompts = [[1] + [int(t) for t in rng.integers(4, 2048, n - 1)] for n in LENGTHS]
    with tempfile.TemporaryDirectory() as tmp:
        only = [c for c in os.environ.get("LLSHIP_L4_CONFIGS", "").split(",") if c]
        for name, overrides in CONFIGS.items():
            if only and name not in only:
                continue
            entry: dict = {}
            report["configs"][name] = entry
            try:
                model = make_checkpoint(Path(tmp) / name, demo_tokenizer_dir(), **overrides)
                cfg = model.config
                for precision in ("fp16", "int4"):
                    t0 = time.perf_counter()
                    ref_model = copy.deepcopy(model).float()
                    if precision != "fp16":
                        fake_quantize_model(ref_model, precision_named(precision).bits)
                    refs = {f"torch-{args.device}-{d}": reference(copy.deepcopy(ref_model), prompts, args.device,
                                                                   getattr(torch, d))
                            for d in ("float32", "float16")}
                    build = Path(tmp) / f"{name}-{precision}"
                    summary = build_llama4(Path(tmp) / name, build, precision=precision, pool="cuda",
                                           context_length=128)
                    tokens32 = refs[f"torch-{args.device}-float32"][1]
                    got = shared_buffer_steps(build, prompts, tokens32, cfg.num_hidden_layers,
                                              cfg.num_key_value_heads, cfg.head_dim, args.device)
                    res: dict = {"ops": summary["ops"], "features": summary["features"],
                                 "all_nodes_on_provider": all_on(build, provider) or "yes"}
                    for key, (logits, tokens) in refs.items():
                        diffs = [max(float(np.abs(a - b).max()) for a, b in zip(r, g)) for r, g in zip(logits, got)]
                        # greedy agreement, teacher-forced on the float32 reference's tokens: the
                        # build's argmax is the reference's, or within TIE of its top logit (a near-tie)
                        agree, ties = [], []
                        for g, r in zip(got, logits):
                            steps = [(g[0][-1], r[0][-1])] + [(g[s], r[s]) for s in range(1, DECODE)]
                            same = [int(a.argmax()) == int(b.argmax()) for a, b in steps]
                            near = [x or float(b.max() - b[int(a.argmax())]) <= TIE for x, (a, b) in zip(same, steps)]
                            agree.append(sum(same))
                            ties.append(sum(near) - sum(same))
                        res[key] = {"max_logit_diff": [round(d, 4) for d in diffs], "greedy_agree_of": DECODE,
                                    "greedy_agree": agree, "near_ties": ties, "tokens_equal_fp32_ref": tokens == tokens32,
                                    "ok": all(a + t == DECODE for a, t in zip(agree, ties))}
                    res["ok"] = any(v["ok"] for k, v in res.items() if k.startswith("torch-"))
                    res["seconds"] = round(time.perf_counter() - t0, 1)
                    entry[precision] = res
                    ok_all &= res["ok"]
                    print(f"{name:<28} {precision:<5} ok={res['ok']} all-on-{args.device}={res['all_nodes_on_provider']} "
                          + " ".join(f"{k}: diff {v['max_logit_diff']} agree {v['greedy_agree']}/{DECODE} near-ties {v['near_ties']}"
                                     for k, v in res.items() if k.startswith("torch-")), flush=True)
            except Exception as exc:  # noqa: BLE001 - reported, next config goes on
                import traceback

                entry["error"] = f"{type(exc).__name__}: {exc}"
                traceback.print_exc()
                ok_all = False
    Path(args.out).write_text(json.dumps(report, indent=1))
    return 0 if ok_all else 1


if __name__ == "__main__":
    sys.exit(main())
