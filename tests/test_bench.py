"""`llamaship bench --quick` runs end to end and writes a complete, self-consistent report.
No timing assertions: speed targets are reported by the benchmark, not tested. The unit tests at
the end check the latency arithmetic on synthetic runs."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RECIPES = ("fp32", "int8", "hybrid-int8", "int4")


@pytest.fixture(scope="module")
def report(tmp_path_factory, demo_model):
    out = tmp_path_factory.mktemp("bench")
    readme_before = (ROOT / "README.md").read_text()
    proc = subprocess.run([sys.executable, "-m", "llamaship.cli", "bench", "--quick", "--out", str(out), "--cache",
                           str(out / "cache")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (ROOT / "README.md").read_text() == readme_before, "--quick must not rewrite the README"
    [json_path] = out.glob("*.json")
    return json.loads(json_path.read_text()), json_path.with_suffix(".md").read_text(), out, proc.stdout


@pytest.mark.integration
def test_every_contender_and_metric_is_present(report):
    data, _, _, _ = report
    plan = data["meta"]["plan"]
    assert len(data["bandwidth_samples_gbs"]) == 2 and data["bandwidth_gbs"] == max(data["bandwidth_samples_gbs"]) > 0
    demo = data["models"]["demo"]
    assert demo["prompt_tokens"]["short"] < demo["prompt_tokens"]["long"]
    assert "float32" in demo["pytorch"]
    for recipe in RECIPES:
        r = demo["recipes"][recipe]
        for contender in ("direct", "stack"):
            for kind, reps in (("short", plan["reps_short"]), ("long", plan["reps_long"])):
                s = r[contender][kind]
                assert s["samples"] == reps
                assert all(not math.isnan(s[k]) and s[k] >= 0 for k in ("ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50",
                                                                          "itl_ms_p99", "itl_ms_var", "decode_tps"))
                assert s["ttft_ms_p50"] <= s["ttft_ms_p99"]
                for run in r["raw"][contender][kind]:
                    assert len(run["token_times_s"]) == plan["new_tokens"]
                    assert run["token_times_s"] == sorted(run["token_times_s"])
        assert [c["concurrency"] for c in r["concurrency"]] == [1, 4, 16]
        for c in r["concurrency"]:
            assert not c["errors"] and c["tokens"] == c["concurrency"] * plan["conc_tokens"]
        assert r["build_bytes"] > r["per_token_bytes"] > 0 and r["compile_s"] > 0
        cpu = r["cpu_ms_per_token"]
        assert cpu["direct"]["bench (direct ORT)"] > 0
        assert {"serving-cpu-0", "gateway", "redis", "client (bench)"} <= set(cpu["stack"])
        assert all(v >= 0 for v in cpu["stack"].values())
    assert {"gateway", "compiler", "serving-cpu-0", "redis"} <= set(data["peak_rss_mb"])


@pytest.mark.integration
def test_derived_figures_are_consistent(report):
    data, _, _, _ = report
    bw = data["bandwidth_gbs"] * 1e9
    recipes = data["models"]["demo"]["recipes"]
    for r in recipes.values():
        assert r["roofline_tps"] == pytest.approx(bw / r["per_token_bytes"])
        assert r["roofline_fraction"] == pytest.approx(r["direct"]["short"]["decode_tps"] / r["roofline_tps"])
        assert r["overhead"]["ttft_ms_added_p50"] == pytest.approx(
            r["stack"]["short"]["ttft_ms_p50"] - r["direct"]["short"]["ttft_ms_p50"])
    # quantized builds read fewer bytes per token than fp32
    assert recipes["int4"]["per_token_bytes"] < recipes["int8"]["per_token_bytes"] < recipes["hybrid-int8"]["per_token_bytes"] \
        < recipes["fp32"]["per_token_bytes"]
    assert len(data["claims"]) == 5
    for c in data["claims"]:
        if not math.isnan(c["measured"]):
            assert c["ratio"] == pytest.approx(c["measured"] / c["claimed"])
    assert data["targets"]
    for t in data["targets"]:
        higher = "≤" not in t["target"]
        assert t["met"] == ((t["value"] >= t["goal"]) if higher else (t["value"] <= t["goal"]))


@pytest.mark.integration
def test_markdown_and_charts(report):
    data, md, out, stdout = report
    for recipe in RECIPES:
        assert f"| ORT GenAI direct | {recipe} |" in md and f"| Llamaship stack | {recipe} |" in md
    assert "| PyTorch eager | float32 |" in md and "## Targets" in md and "random weights" in md
    assert len(data["charts"]) == 3
    for chart in data["charts"]:
        png = out / chart
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
        assert f"]({Path(chart).parent.name}/{png.name})" in md
    assert "## Targets" in stdout


# -- unit: latency arithmetic on synthetic runs -------------------------------------------------
def _chunked_stack_run(first_s: float, gap_s: float, chunks: int, per_chunk: int):
    from llamaship.bench.measure import Run

    return Run.from_chunks([(first_s + i * gap_s, per_chunk) for i in range(chunks)])


def test_stack_itl_is_per_chunk_not_zero_for_tokens_of_one_chunk():
    from llamaship.bench.measure import summarize

    # 4 tokens per chunk, a chunk every 10 ms: 2.5 ms per token, never 0
    s = summarize([_chunked_stack_run(0.05, 0.010, 8, 4)])
    assert s["itl_basis"] == "chunk"
    assert s["itl_ms_p50"] == pytest.approx(2.5) and s["itl_ms_p99"] == pytest.approx(2.5)
    assert s["itl_ms_var"] == pytest.approx(0.0, abs=1e-9)
    assert s["chunk_gap_ms_p50"] == pytest.approx(10.0) and s["tokens_per_chunk_mean"] == 4
    assert s["decode_tps"] == pytest.approx(28 / 0.070)
    assert s["ttft_ms_p50"] == pytest.approx(50.0)


def test_runs_without_chunks_keep_the_per_token_latency():
    from llamaship.bench.measure import Run, summarize

    run = Run(0.02, [0.02, 0.03, 0.05, 0.06])
    assert run.itl_s == pytest.approx([0.01, 0.02, 0.01])
    s = summarize([run])
    assert s["itl_basis"] == "token" and "tokens_per_chunk_mean" not in s
    assert s["itl_ms_p50"] == pytest.approx(10.0) and s["decode_tps"] == pytest.approx(3 / 0.04)


def _synthetic_report(direct_itl_s: float, stack_gap_s: float, per_chunk: int) -> dict:
    from llamaship.bench.measure import Run, as_dict, summarize

    direct = [Run(0.01, [0.01 + i * direct_itl_s for i in range(32)])]
    stack = [_chunked_stack_run(0.012, stack_gap_s, 32 // per_chunk, per_chunk)]
    recipe = {
        "direct": {"short": summarize(direct), "long": summarize(direct)},
        "stack": {"short": summarize(stack), "long": summarize(stack)},
        "concurrency": [{"concurrency": c, "aggregate_tps": 100.0 * c, "ttft_ms_p50": 1.0, "ttft_ms_p99": 2.0,
                         "errors": [], "tokens": 16 * c, "wall_s": 1.0} for c in (1, 4, 16)],
        "cpu_ms_per_token": {"direct": {"bench (direct ORT)": 1.0}, "stack": {"gateway": 0.5}},
        "per_token_bytes": 10**6, "build_bytes": 2 * 10**6, "compile_s": 1.0,
        "raw": {"direct": {"short": [as_dict(r) for r in direct]}, "stack": {"short": [as_dict(r) for r in stack]}},
    }
    return {"meta": {"date": "d", "host": "h", "platform": "p", "cpu_count": 2, "threads": 2, "device": "cpu",
                     "quick": True, "weights_note": "n", "versions": {}},
            "bandwidth_gbs": 10.0, "peak_rss_mb": {}, "models": {"demo": {
                "prompt_tokens": {"short": 16, "long": 256}, "pytorch": {}, "recipes": {"fp32": recipe}}}}


@pytest.mark.parametrize("direct_itl_ms, stack_gap_ms, per_chunk, shown", [
    (2.0, 8.552, 4, "+0.138 ms/token"),   # stack slower per token than direct
    (2.0, 7.448, 4, "\u22120.138 ms/token"),  # faster (direct's ITL inflated by something): a true minus, never "+-"
])
def test_overhead_is_signed_and_the_stack_itl_is_labelled_per_chunk(direct_itl_ms, stack_gap_ms, per_chunk, shown):
    from llamaship.bench import report as rep

    data = _synthetic_report(direct_itl_ms / 1e3, stack_gap_ms / 1e3, per_chunk)
    rep.evaluate(data)
    added = data["models"]["demo"]["recipes"]["fp32"]["overhead"]["itl_ms_added_p50"]
    assert added == pytest.approx(stack_gap_ms / per_chunk - direct_itl_ms)
    md = rep.markdown(data)
    assert shown in md and "+-" not in md and "+\u2212" not in md
    assert "per chunk" in md and "4.00 tokens per chunk" in md


def test_signed_numbers():
    from llamaship.bench.report import _signed

    assert _signed(0.138, 2) == "+0.14" and _signed(-0.138, 2) == "\u22120.14"
    assert _signed(-0.0001, 2) == "+0.00" and _signed(0.0, 1) == "+0.0" and _signed(float("nan")) == "n/a"


def test_chart_latencies_use_the_chunk_basis():
    from llamaship.bench.measure import as_dict
    from llamaship.bench.report import _itl

    run = as_dict(_chunked_stack_run(0.05, 0.010, 3, 2))
    assert _itl(run) == pytest.approx([0.005, 0.005])
