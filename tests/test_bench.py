"""`llamaship bench --quick` runs end to end and writes a complete, self-consistent report.
No timing assertions: speed targets are reported by the benchmark, not tested."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
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
