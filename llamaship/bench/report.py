"""Derived figures (roofline, stack overhead, article claims, targets), Markdown and charts."""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

from llamaship.bench import serving_report

README_START, README_END = "<!-- bench:start -->", "<!-- bench:end -->"
ITL_FLOOR_MS = 0.01  # log-scale floor
MINUS = "\u2212"
STACK_ITL_NOTE = ("ITL of the Llamaship stack is measured per chunk on the client side (the stream carries no "
                  "per-token times): each chunk's gap since the previous chunk ÷ the tokens it brought.")

# The article's claims: (id, text, claimed figure as a fraction, how we measure it)
CLAIMS = [
    ("ort_vs_pytorch_throughput", "ONNX Runtime reaches 92% of PyTorch throughput", 0.92,
     "direct ORT fp32 decode tokens/s ÷ PyTorch eager fp32 decode tokens/s"),
    ("latency_variance_reduction", "60% lower latency variance", 0.60,
     "1 − var(inter-token latency, ORT fp32) ÷ var(inter-token latency, PyTorch fp32)"),
    ("hybrid_int8_latency_reduction", "25–35% lower latency from hybrid INT8", 0.30,
     "1 − inter-token p50 (hybrid-int8) ÷ inter-token p50 (fp32), direct ORT"),
    ("static_padding_cost", "20–30% padding cost for short prompts with static shapes", 0.25,
     "time to first token of the short prompt padded to the long length ÷ unpadded − 1"),
    ("fused_gqa_attention_speedup", "up to 40% faster attention with fused GQA", 0.40,
     "not measured: the builder always fuses GQA on CPU, so there is no unfused build to compare"),
]


def _safe_div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else float("nan")


def evaluate(report: dict) -> None:
    """Add roofline fractions, stack overhead, claims and targets to the report (in place)."""
    bw = report["bandwidth_gbs"] * 1e9
    for model in report["models"].values():
        for dtype, pt in model["pytorch"].items():
            pt["roofline_tps"] = _safe_div(bw, pt["bytes_per_token"])
            pt["roofline_fraction"] = _safe_div(pt["short"]["decode_tps"], pt["roofline_tps"])
        for r in model["recipes"].values():
            if "error" in r:
                continue
            # Llama 4: only the chosen experts are read per token (active bytes), not every initializer
            r["roofline_tps"] = _safe_div(bw, r.get("active_bytes_per_token", r["per_token_bytes"]))
            r["roofline_fraction"] = _safe_div(r["direct"]["short"]["decode_tps"], r["roofline_tps"])
            r["overhead"] = {
                "ttft_ms_added_p50": r["stack"]["short"]["ttft_ms_p50"] - r["direct"]["short"]["ttft_ms_p50"],
                "itl_ms_added_p50": r["stack"]["short"]["itl_ms_p50"] - r["direct"]["short"]["itl_ms_p50"],
                "decode_tps_ratio": _safe_div(r["stack"]["short"]["decode_tps"], r["direct"]["short"]["decode_tps"]),
            }
            serving_report.evaluate(r)
            c = {x["concurrency"]: x["aggregate_tps"] for x in r["concurrency"]}
            r["concurrency_scaling_16_vs_1"] = _safe_div(c.get(16, float("nan")), c.get(1, float("nan")))
    report["claims"] = _claims(report)
    report["targets"] = _targets(report)


def _first_model(report: dict) -> tuple[str, dict]:
    name = "llama-125m" if "llama-125m" in report["models"] else next(iter(report["models"]))
    return name, report["models"][name]


def _concurrency_table(model: dict) -> list[str]:
    """Whole stack under concurrent streams (continuous batching): aggregate tokens/s and time to first token."""
    rows = [(rc, r) for rc, r in model["recipes"].items() if "error" not in r and r.get("concurrency")]
    if not rows or "ttft_ms_p50" not in rows[0][1]["concurrency"][0]:
        return []
    levels = [c["concurrency"] for c in rows[0][1]["concurrency"]]
    out = ["", "Whole stack, concurrent streams (short prompt; every client starts at once):", "",
           "| recipe | " + " | ".join(f"c={n}: tok/s, TTFT p50/p99 ms" for n in levels) + " | errors |",
           "|---|" + "---|" * (len(levels) + 1)]
    for rc, r in rows:
        cells = [f"{_f(c['aggregate_tps'], 0)}, {_f(c['ttft_ms_p50'])}/{_f(c['ttft_ms_p99'])}" for c in r["concurrency"]]
        out.append(f"| {rc} | " + " | ".join(cells) + f" | {sum(len(c['errors']) for c in r['concurrency'])} |")
    return out


def _llama4_table(mname: str, model: dict) -> list[str]:
    """Llama 4: decode tokens/s of the three contenders per recipe, compile time and the compiler's
    peak RSS against checkpoint and build size, and the roofline by active bytes per token."""
    if "llama4" not in model:
        return []
    info, pt = model["llama4"], model["pytorch"].get("float32", {})
    ck = model["checkpoint_bytes"] / 1e6
    out = ["", f"Llama 4 ({info['active_params'] / 1e6:.1f}M of {info['total_params'] / 1e6:.1f}M parameters read per "
               f"token; checkpoint {ck:.1f} MB). Roofline: bandwidth ÷ the bytes one token reads (attention, norms, "
               "router, the chosen experts, the shared expert, one embedding row, lm_head), at the build's bits; "
               "PyTorch's at float32 (transformers' eager MoE computes every expert, so it actually reads "
               f"{pt.get('dense_bytes_per_token', math.nan) / 1e6:.0f} MB per token). Compiler peak RSS: the compiler "
               "service and its build children together, sampled every 50 ms during the compile (idle service first).",
           "", "| model | recipe | PyTorch fp32 tok/s | direct tok/s | stack tok/s | compile s | compiler peak RSS MB "
               "(idle) | checkpoint MB | build MB | active MB/token | roofline |",
           "|---|---|---|---|---|---|---|---|---|---|---|",
           f"| {mname} | PyTorch float32 | {_f(pt.get('short', {}).get('decode_tps', math.nan))} | — | — | — | — | "
           f"{ck:.1f} | — | {_f(pt.get('bytes_per_token', math.nan) / 1e6, 2)} | "
           f"{_f(pt.get('roofline_fraction', math.nan) * 100, 0)}% |"]
    for rc, r in model["recipes"].items():
        if "error" in r:
            out.append(f"| {mname} | {rc} | compile failed: {r['error'][:200]} |")
            continue
        rss = r.get("compile_rss_mb") or {}
        out.append(f"| {mname} | {rc} | {_f(pt.get('short', {}).get('decode_tps', math.nan))} | "
                   f"{_f(r['direct']['short']['decode_tps'])} | {_f(r['stack']['short']['decode_tps'])} | "
                   f"{_f(r['compile_s'])} | {_f(rss.get('peak', math.nan), 0)} ({_f(rss.get('start', math.nan), 0)}) | "
                   f"{ck:.1f} | {r['build_bytes'] / 1e6:.1f} | {_f(r.get('active_bytes_per_token', math.nan) / 1e6, 2)} | "
                   f"{_f(r['roofline_fraction'] * 100, 0)}% of {_f(r['roofline_tps'], 0)} |")
    return out + [""]


def _quality_table(model: dict) -> list[str]:
    """Per recipe: size, the quality gate's measurements against PyTorch, decode speed; and what auto chose."""
    rows = [(rc, r) for rc, r in model["recipes"].items() if "error" not in r and (r.get("quality") or {}).get("metrics")]
    if not rows:
        return []
    q0 = rows[0][1]["quality"]
    out = ["", f"Quality gate (teacher-forced against PyTorch float32 on {q0['prompts']} {q0['prompt_source']} "
               f"prompts, {q0['metrics']['tokens']} positions), size and speed:", "",
           "| recipe | build MB | top-1 agreement | mean KL | perplexity (Δ) | max abs Δlogit | gate | "
           "attention share | direct decode tok/s |",
           "|---|---|---|---|---|---|---|---|---|"]
    for rc, r in rows:
        q, mt = r["quality"], r["quality"]["metrics"]
        gate = "passed" if q["passed"] else "FAILED: " + "; ".join(q["failures"])
        share = (r.get("profile") or {}).get("attention_share")
        out.append(f"| {rc} | {r['build_bytes'] / 1e6:.1f} | {mt['top1_agreement']:.4f} | {mt['mean_kl']:.5f} | "
                   f"{mt['perplexity_build']:.2f} ({mt['perplexity_increase_pct']:+.2f}%) | {mt['max_abs_logit_diff']:.3f} | "
                   f"{gate} | {_f(share * 100 if share is not None else math.nan)}% | {_f(r['direct']['short']['decode_tps'])} |")
    for rc, r in rows:
        if r.get("auto"):
            a, mt = r["auto"], r["quality"]["metrics"]
            sens = ", ".join(f"{k} {d['mean_kl']:.5f} / {d['top1_disagreement']:.3f}" for k, d in a["sensitivity"].items())
            p, b = a["predicted"], a["budget"]
            out += ["", f"auto chose {', '.join(f'{g} {w}' for g, w in a['chosen'].items())}: predicted mean KL "
                        f"{p['mean_kl']:.5f} and top-1 disagreement {p['top1_disagreement']:.3f} (limits {b['mean_kl']:g} "
                        f"and {b['top1_disagreement']:.2f}, {a['safety']:.0%} used), measured {mt['mean_kl']:.5f} and "
                        f"{1 - mt['top1_agreement']:.3f}. With one group quantized (mean KL / top-1 disagreement): {sens}."]
    return out + [""]


def _claims(report: dict) -> list[dict]:
    name, model = _first_model(report)
    rec, pt = model["recipes"], model["pytorch"].get("float32", {})
    fp32, hybrid = rec.get("fp32", {}), rec.get("hybrid-int8", {})
    measured = {
        "ort_vs_pytorch_throughput": _safe_div(fp32.get("direct", {}).get("short", {}).get("decode_tps", math.nan),
                                               pt.get("short", {}).get("decode_tps", math.nan)),
        "latency_variance_reduction": 1 - _safe_div(fp32.get("direct", {}).get("short", {}).get("itl_ms_var", math.nan),
                                                    pt.get("short", {}).get("itl_ms_var", math.nan)),
        "hybrid_int8_latency_reduction": 1 - _safe_div(hybrid.get("direct", {}).get("short", {}).get("itl_ms_p50", math.nan),
                                                       fp32.get("direct", {}).get("short", {}).get("itl_ms_p50", math.nan)),
        "static_padding_cost": _safe_div(fp32.get("direct_padded", {}).get("ttft_ms_p50", math.nan),
                                         fp32.get("direct", {}).get("short", {}).get("ttft_ms_p50", math.nan)) - 1,
        "fused_gqa_attention_speedup": math.nan,
    }
    return [{"id": cid, "claim": text, "claimed": claimed, "measured": measured[cid],
             "ratio": _safe_div(measured[cid], claimed), "how": how, "model": name}
            for cid, text, claimed, how in CLAIMS]


def _targets(report: dict) -> list[dict]:
    out = []
    for mname, model in report["models"].items():
        pt_fp32 = model["pytorch"].get("float32", {}).get("short", {}).get("decode_tps", math.nan)
        for recipe, r in model["recipes"].items():
            if "error" in r:
                continue
            ov = r["overhead"]
            out.append(_t(mname, recipe, "whole stack ≥ 95% of direct decode tokens/s", ov["decode_tps_ratio"], 0.95))
            out.append(_t(mname, recipe, "whole stack adds ≤ 5 ms time to first token", ov["ttft_ms_added_p50"], 5.0,
                          higher_is_better=False))
            if recipe == "int4":
                out.append(_t(mname, recipe, "int4 decode ≥ 5× PyTorch eager fp32 (batch 1)",
                              _safe_div(r["direct"]["short"]["decode_tps"], pt_fp32), 5.0))
            if recipe in ("int8", "int4"):
                out.append(_t(mname, recipe, f"{recipe} decode ≥ 70% of the bandwidth limit", r["roofline_fraction"], 0.70))
            out.append(_t(mname, recipe, "aggregate tokens/s at concurrency 16 ≥ 2× concurrency 1",
                          r["concurrency_scaling_16_vs_1"], 2.0))
        out += serving_report.targets(mname, model, _t)
    return out


def _t(model: str, recipe: str, target: str, value: float, goal: float, higher_is_better: bool = True) -> dict:
    met = (value >= goal) if higher_is_better else (value <= goal)
    return {"model": model, "recipe": recipe, "target": target, "value": value, "goal": goal,
            "met": bool(met) if not math.isnan(value) else False}


def _f(x: float, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _signed(x: float, digits: int = 1) -> str:
    """"+0.14" or "−0.14" (a true minus sign); zero as it rounds, with "+"."""
    text = _f(x, digits)
    if text == "n/a":
        return text
    if text.startswith("-"):
        return MINUS + text[1:] if text.strip("-0.") else "+" + text[1:]
    return "+" + text


def markdown(report: dict, chart_prefix: str = "") -> str:
    meta = report["meta"]
    lines = [
        f"# Llamaship bench — {meta['date']} on {meta['host']}",
        "",
        f"{meta['platform']}, {meta['cpu_count']} cores, {meta['threads']} threads for PyTorch and direct ORT "
        "(the stack runs as `llamaship up` starts it: one thread per core), "
        f"device {meta['device']}{', quick run' if meta['quick'] else ''}. "
        f"Memory read bandwidth: **{report['bandwidth_gbs']:.1f} GB/s** (best of "
        f"{', '.join(f'{b:.1f}' for b in report.get('bandwidth_samples_gbs', [report['bandwidth_gbs']]))} "
        f"measured at start and end). {meta['weights_note']}.",
        f"Versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}.",
        "",
    ]
    for mname, model in report["models"].items():
        pt = model["prompt_tokens"]
        lines += [f"## {mname}", "",
                  f"Prompts: short {pt['short']} tokens, long {pt['long']} tokens; greedy; batch 1 unless noted.", "",
                  "| contender | recipe | TTFT short p50/p99 ms | TTFT long p50/p99 ms | ITL p50/p99 ms | ITL var | "
                  "decode tok/s | roofline | agg tok/s c=1/4/16 | build MB | compile s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for dtype, p in model["pytorch"].items():
            s, l = p["short"], p["long"]
            lines.append(f"| PyTorch eager | {dtype} | {_f(s['ttft_ms_p50'])}/{_f(s['ttft_ms_p99'])} | "
                         f"{_f(l['ttft_ms_p50'])}/{_f(l['ttft_ms_p99'])} | {_f(s['itl_ms_p50'], 2)}/{_f(s['itl_ms_p99'], 2)} | "
                         f"{_f(s['itl_ms_var'], 3)} | {_f(s['decode_tps'])} | {_f(p['roofline_fraction'] * 100, 0)}% | — | — | — |")
        for recipe, r in model["recipes"].items():
            if "error" in r:
                lines.append(f"| — | {recipe} | compile failed: {r['error']} |")
                continue
            agg = "/".join(_f(c["aggregate_tps"], 0) for c in r["concurrency"])
            for label, d in (("ORT GenAI direct", r["direct"]), ("Llamaship stack", r["stack"])):
                s, l = d["short"], d["long"]
                lines.append(
                    f"| {label} | {recipe} | {_f(s['ttft_ms_p50'])}/{_f(s['ttft_ms_p99'])} | "
                    f"{_f(l['ttft_ms_p50'])}/{_f(l['ttft_ms_p99'])} | {_f(s['itl_ms_p50'], 2)}/{_f(s['itl_ms_p99'], 2)} | "
                    f"{_f(s['itl_ms_var'], 3)} | {_f(s['decode_tps'])} | "
                    + (f"{_f(r['roofline_fraction'] * 100, 0)}% of {_f(r['roofline_tps'], 0)} | — | "
                       f"{r['build_bytes'] / 1e6:.1f} | {_f(r['compile_s'])} |" if label.startswith("ORT") else
                       f"— | {agg} | — | — |"))
        lines += ["", STACK_ITL_NOTE + " " + "; ".join(
            f"{rc}: chunk gap p50 {_f(r['stack']['short'].get('chunk_gap_ms_p50', math.nan), 2)} ms, "
            f"{_f(r['stack']['short'].get('tokens_per_chunk_mean', math.nan), 2)} tokens per chunk"
            for rc, r in model["recipes"].items() if "error" not in r)]
        lines += _llama4_table(mname, model)
        lines += _concurrency_table(model)
        lines += serving_report.table(model)
        lines += _quality_table(model)
        procs = sorted({k for r in model["recipes"].values() if "error" not in r
                        for k in r["cpu_ms_per_token"]["stack"]})
        lines += ["", "CPU profile: milliseconds of CPU per generated token (short prompt), direct vs whole stack", "",
                  "| recipe | direct ORT | " + " | ".join(f"stack: {p}" for p in procs) + " | stack total |",
                  "|---|---|" + "---|" * (len(procs) + 1)]
        for rc, r in model["recipes"].items():
            if "error" in r:
                continue
            st = r["cpu_ms_per_token"]["stack"]
            lines.append(f"| {rc} | {_f(sum(r['cpu_ms_per_token']['direct'].values()), 2)} | "
                         + " | ".join(_f(st.get(p, math.nan), 2) for p in procs) + f" | {_f(sum(st.values()), 2)} |")
        lines += ["", "Stack overhead (whole stack − direct, p50): "
                  + "; ".join(f"{rc}: {_signed(r['overhead']['ttft_ms_added_p50'], 2)} ms TTFT, "
                              f"{_signed(r['overhead']['itl_ms_added_p50'], 3)} ms/token (stack per chunk), "
                              f"{_f(r['overhead']['decode_tps_ratio'] * 100, 0)}% of direct decode"
                              for rc, r in model["recipes"].items() if "error" not in r), ""]
    lines += ["## The article's claims, measured", "",
              "| claim | claimed | measured | ratio | how |", "|---|---|---|---|---|"]
    for c in report["claims"]:
        lines.append(f"| {c['claim']} | {c['claimed'] * 100:.0f}% | {_f(c['measured'] * 100, 0)}% | "
                     f"{_f(c['ratio'], 2)} | {c['how']} ({c['model']}) |")
    lines += ["", "## Targets", "", "| model | recipe | target | measured | met |", "|---|---|---|---|---|"]
    for t in report["targets"]:
        lines.append(f"| {t['model']} | {t['recipe']} | {t['target']} | {_f(t['value'], 2)} | "
                     f"{'✅' if t['met'] else '❌'} |")
    lines += ["", "## Peak RSS (MB, with child processes such as decode workers)", "", " · ".join(f"{k}: {_f(v, 0)}" for k, v in report["peak_rss_mb"].items()), ""]
    if report.get("charts"):
        lines += ["## Charts", ""] + [f"![{Path(c).stem}]({chart_prefix}{Path(c).name})" for c in report["charts"]]
    return "\n".join(lines) + "\n"


def charts(report: dict, base: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base.mkdir(parents=True, exist_ok=True)
    out = []
    mname, model = _first_model(report)

    # 1. latency distributions: inter-token latency per contender
    labels, data = [], []
    for dtype, p in model["pytorch"].items():
        labels.append(f"PyTorch {dtype}")
        data.append([max(x * 1e3, ITL_FLOOR_MS) for r in p["raw"]["short"] for x in _itl(r)])
    for recipe, r in model["recipes"].items():
        if "error" in r:
            continue
        for label, key in (("direct", "direct"), ("stack", "stack")):
            labels.append(f"{recipe} {label}")
            data.append([max(x * 1e3, ITL_FLOOR_MS) for run in r["raw"][key]["short"] for x in _itl(run)])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    ax.boxplot([d or [0] for d in data], showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1), labels, rotation=30, ha="right")
    ax.set_ylabel("inter-token latency (ms; stack: chunk gap ÷ tokens in chunk)")
    ax.set_yscale("log")
    ax.set_title(f"Inter-token latency distribution — {mname}, batch 1")
    fig.tight_layout()
    out.append(_save(fig, base / "latency.png"))

    # 2. tokens/s vs concurrency, whole stack
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for recipe, r in model["recipes"].items():
        if "error" in r:
            continue
        xs = [c["concurrency"] for c in r["concurrency"]]
        ax.plot(xs, [c["aggregate_tps"] for c in r["concurrency"]], marker="o", label=recipe)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate tokens/s (whole stack)")
    ax.set_title(f"Throughput vs concurrency — {mname}")
    ax.legend()
    fig.tight_layout()
    out.append(_save(fig, base / "concurrency.png"))

    # 3. roofline fraction per recipe and model
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    names = list(report["models"])
    recipes = [rc for rc in next(iter(report["models"].values()))["recipes"]]
    width = 0.8 / max(len(recipes) + 1, 1)
    for i, rc in enumerate(["PyTorch fp32", *recipes]):
        vals = []
        for mn in names:
            mm = report["models"][mn]
            v = (mm["pytorch"].get("float32", {}).get("roofline_fraction", math.nan) if i == 0
                 else mm["recipes"].get(rc, {}).get("roofline_fraction", math.nan))
            vals.append(0 if math.isnan(v) else v * 100)
        ax.bar([j + i * width for j in range(len(names))], vals, width, label=rc)
    ax.axhline(70, color="k", linestyle="--", linewidth=1, label="target 70%")
    ax.set_xticks([j + width * len(recipes) / 2 for j in range(len(names))], names)
    ax.set_ylabel("% of bandwidth ÷ bytes-per-token")
    ax.set_title(f"Decode speed vs the memory-bandwidth limit ({report['bandwidth_gbs']:.0f} GB/s)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    out.append(_save(fig, base / "roofline.png"))
    return out


def _itl(run: dict) -> list[float]:
    from llamaship.bench.measure import Run

    return Run(**run).itl_s


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def update_readme(readme: Path, report: dict, chart_files: list[Path], latest_dir: Path) -> None:
    """Put the latest table and charts into the README between the bench markers."""
    latest_dir.mkdir(parents=True, exist_ok=True)
    for c in chart_files:
        shutil.copy(c, latest_dir / c.name)
    body = markdown({**report, "charts": [c.name for c in chart_files]}, chart_prefix="bench/latest/")
    body = re.sub(r"^# .*\n", "", body).replace("\n## ", "\n### ")
    text = readme.read_text()
    block = f"{README_START}\n### Latest run: {report['meta']['date']} on {report['meta']['host']}\n{body}{README_END}"
    if README_START in text:
        text = re.sub(re.escape(README_START) + ".*?" + re.escape(README_END), lambda _: block, text, flags=re.S)
    else:
        text += f"\n## Benchmark\n\n{block}\n"
    readme.write_text(text)
