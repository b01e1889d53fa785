"""The serving workloads' part of the report: a table per model and issue #11's targets."""

from __future__ import annotations

import math


def _f(x, digits: int = 1) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def _div(a: float, b: float) -> float:
    return a / b if b else math.nan


def evaluate(r: dict) -> None:
    """Derived figures of one recipe's serving entry (in place)."""
    s = r.get("serving")
    if not s:
        return
    top = s["poisson"][-1]
    s["top_vs_static"] = _div(top["aggregate_tps"], s["static_batch_16"]["aggregate_tps"])
    s["top_ttft_p99_vs_target"] = _div(top["ttft_ms_p99"], s["unloaded"]["ttft_target_ms"])


def table(model: dict) -> list[str]:
    rows = [(rc, r["serving"]) for rc, r in model["recipes"].items() if "error" not in r and r.get("serving")]
    if not rows:
        return []
    out = ["", "Serving under staggered arrivals (Poisson; distinct prompts of "
           f"{rows[0][1]['prompt_tokens']} tokens, {rows[0][1]['new_tokens']} new tokens, greedy, "
           f"{rows[0][1]['requests_per_rate']} requests per rate; whole stack unless noted; ITL per chunk):", "",
           "| recipe | line | rate req/s | mean in flight | agg tok/s | TTFT p50/p99 ms | ITL p99 ms | errors |",
           "|---|---|---|---|---|---|---|---|"]
    for rc, s in rows:
        for p in s["poisson"]:
            out.append(f"| {rc} | stack | {_f(p['rate_per_s'], 2)} | {_f(p['mean_concurrency'])} | "
                       f"{_f(p['aggregate_tps'], 0)} | {_f(p['ttft_ms_p50'])}/{_f(p['ttft_ms_p99'])} | "
                       f"{_f(p['itl_ms_p99'], 2)} | {len(p['errors'])} |")
        e = s.get("og_engine", {})
        if "error" in e:
            out.append(f"| {rc} | og.Engine, direct | — | — | {e['error']} | | | |")
        elif e:
            out.append(f"| {rc} | og.Engine, direct (static batching, max 16) | {_f(s['poisson'][-1]['rate_per_s'], 2)} | "
                       f"{_f(e['mean_concurrency'])} | {_f(e['aggregate_tps'], 0)} | "
                       f"{_f(e['ttft_ms_p50'])}/{_f(e['ttft_ms_p99'])} | {_f(e['itl_ms_p99'], 2)} | 0 |")
        st = s["static_batch_16"]
        out.append(f"| {rc} | one static 16-row batch, direct (ceiling) | — | 16 | {_f(st['aggregate_tps'], 0)} | "
                   f"{_f(st['first_token_ms'])} (all 16) | — | 0 |")
    out += ["", "Shared prefix (a system prompt, then short user turns, one at a time): TTFT p50 ms", "",
            "| recipe | system prompt tokens | cached prefix | no cached prefix | ratio | unloaded prefill + step ms |",
            "|---|---|---|---|---|---|"]
    for rc, s in rows:
        sp, u = s["shared_prefix"], s["unloaded"]
        out.append(f"| {rc} | {sp['system_tokens']} | {_f(sp['shared_ttft_ms_p50'])} | {_f(sp['distinct_ttft_ms_p50'])} | "
                   f"{_f(sp['ratio_p50'] * 100, 0)}% | {_f(u['prefill_ms'])} + {_f(u['decode_step_ms'], 2)} |")
    return out


def targets(model_name: str, model: dict, t) -> list[dict]:
    """Issue #11's targets for every recipe with serving figures; `t` makes one target row."""
    out = []
    for rc, r in model["recipes"].items():
        if "error" in r or not r.get("serving"):
            continue
        s, ov = r["serving"], r["overhead"]
        out += [
            t(model_name, rc, "#11: whole-stack decode at c=1 ≥ 97% of direct", ov["decode_tps_ratio"], 0.97),
            t(model_name, rc, "#11: stack adds ≤ 2 ms to TTFT (p50)", ov["ttft_ms_added_p50"], 2.0, higher_is_better=False),
            t(model_name, rc, "#11: Poisson ~16 in flight, agg tok/s ≥ 85% of one static 16-row batch",
              s["top_vs_static"], 0.85),
            t(model_name, rc, "#11: TTFT p99 at that load ≤ 2 × (unloaded prefill + one step)",
              s["top_ttft_p99_vs_target"], 1.0, higher_is_better=False),
            t(model_name, rc, "#11: TTFT with a cached 512-token prefix ≤ 20% of without",
              s["shared_prefix"]["ratio_p50"], 0.20, higher_is_better=False),
        ]
    return out
