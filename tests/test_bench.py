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
        serving = r["serving"]  # Poisson arrivals at three rates, the reference lines, the shared prefix
        assert [p["rate_per_s"] for p in serving["poisson"]] == sorted(p["rate_per_s"] for p in serving["poisson"])
        for p in serving["poisson"]:
            assert not p["errors"] and p["tokens"] == plan["serving_requests"] * plan["serving_new_tokens"]
            assert 0 < p["ttft_ms_p50"] <= p["ttft_ms_p99"] and p["aggregate_tps"] > 0
        assert serving["static_batch_16"]["tokens"] == 16 * plan["serving_new_tokens"]
        assert serving["og_engine"].get("tokens") == plan["serving_requests"] * plan["serving_new_tokens"]
        sp = serving["shared_prefix"]
        assert sp["requests"] == plan["prefix_turns"] and sp["shared_ttft_ms_p50"] > 0 and sp["distinct_ttft_ms_p50"] > 0
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


# -- unit: Llama 4 models, the --models option and the active-bytes roofline --------------------
def _llama4_config(**over) -> dict:
    cfg = {"architectures": ["Llama4ForCausalLM"], "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 64,
           "intermediate_size_mlp": 128, "num_local_experts": 8, "num_experts_per_tok": 1,
           "interleave_moe_layer_step": 1}
    cfg.update(over)
    return cfg


def _expected_active(cfg: dict, bytes_of, experts_read: int) -> float:
    """Straight from the definition: per layer attention + 2 norms, MoE layers router + chosen
    experts + shared expert, dense layers the dense MLP; one embedding row, final norm, lm_head."""
    h, d, v, m = cfg["hidden_size"], cfg["head_dim"], cfg["vocab_size"], cfg["intermediate_size"]
    moe = cfg.get("moe_layers", range(cfg["num_hidden_layers"]))
    total = 0.0
    for i in range(cfg["num_hidden_layers"]):
        total += bytes_of("attn", 2 * cfg["num_attention_heads"] * d * h + 2 * cfg["num_key_value_heads"] * d * h)
        total += 2 * h * 4
        if i in moe:
            total += cfg["num_local_experts"] * h * 4 + bytes_of("experts", experts_read * 3 * h * m)
            total += bytes_of("shared_expert", 3 * h * m)
        else:
            total += bytes_of("mlp", 3 * h * cfg["intermediate_size_mlp"])
    return total + h * 4 + h * 4 + bytes_of("lm_head", v * h)


@pytest.mark.parametrize("precision, per_weight", [
    ("fp32", {g: 4.0 for g in ("attn", "mlp", "shared_expert", "experts", "lm_head")}),
    ("int8", {g: 1 + 4 / 32 for g in ("attn", "mlp", "shared_expert", "experts", "lm_head")}),
    ("int4", {g: 0.5 + 4 / 32 for g in ("attn", "mlp", "shared_expert", "experts", "lm_head")}),
    ("hybrid-int4", {"attn": 4.0, "mlp": 4.0, "shared_expert": 4.0, "experts": 0.5 + 4 / 32, "lm_head": 4.0}),
    ("groups:attn=int8,experts=int4,lm_head=int8",
     {"attn": 1.125, "mlp": 4.0, "shared_expert": 4.0, "experts": 0.625, "lm_head": 1.125}),
])
@pytest.mark.parametrize("top_k", [1, 2])
def test_llama4_active_bytes_reads_only_the_chosen_experts(precision, per_weight, top_k):
    from llamaship.bench.models import llama4_active_bytes, llama4_bits

    cfg = _llama4_config(num_experts_per_tok=top_k)
    got = llama4_active_bytes(cfg, llama4_bits(precision))
    want = _expected_active(cfg, lambda g, n: n * per_weight[g], top_k)
    assert got["active_bytes"] == pytest.approx(want, abs=2)
    assert sum(got["parts"].values()) == pytest.approx(got["active_bytes"], abs=2)
    # every expert read: the other (experts - k) experts' bytes on top
    dense = _expected_active(cfg, lambda g, n: n * per_weight[g], cfg["num_local_experts"])
    assert got["dense_bytes"] == pytest.approx(dense, abs=2)
    assert got["active_bytes"] < got["dense_bytes"]


def test_llama4_active_bytes_dense_layers_and_pytorch_dtype():
    from llamaship.bench.models import llama4_active_bytes

    cfg = _llama4_config(moe_layers=[1, 3])
    got = llama4_active_bytes(cfg, {}, dtype_bytes=4)  # PyTorch float32: every group 4 bytes a weight
    assert got["active_bytes"] == pytest.approx(_expected_active(cfg, lambda g, n: 4.0 * n, 1), abs=2)
    assert got["parts"]["dense_mlp"] == 2 * 3 * 64 * 128 * 4
    h, m, d = 64, 64, 16
    layer = (2 * 4 + 2 * 2) * d * h + 2 * h  # attention + norms
    moe_active = 8 * h + 2 * 3 * h * m  # router + one expert + the shared expert
    want = 4 * layer + 2 * moe_active + 2 * 3 * h * 128 + 2 * h + 1000 * h
    assert got["active_params"] == want
    assert got["total_params"] == want + 2 * 7 * 3 * h * m


def test_llama4_quantized_weights_whose_k_is_not_a_block_multiple_stay_float():
    from llamaship.bench.models import _weight_bytes

    assert _weight_bytes(48 * 100, 4, 48) == 48 * 100 * 4.0
    assert _weight_bytes(64 * 100, 4, 64) == 64 * 100 * 0.625


def test_llama4_16e_is_mid_size_with_about_100m_active_parameters():
    from llamaship.bench.models import LLAMA4_SHAPES, llama4_active_bytes, llama4_spec
    from llamaship.llama4_model import text_config_dict

    spec = llama4_spec("llama4-16e")
    assert spec.num_experts == 16 and spec.top_k == 1 and spec.dtype == "bfloat16"
    cfg = {"architectures": ["Llama4ForCausalLM"], **text_config_dict(spec, 2048, 1, [2, 0], 0)}
    got = llama4_active_bytes(cfg, {}, dtype_bytes=4)
    assert 90e6 <= got["active_params"] <= 115e6 and got["total_params"] > 4 * got["active_params"]
    assert LLAMA4_SHAPES["llama4-tiny"] == {}  # make_llama4's defaults


@pytest.mark.parametrize("argv, quick, large, want", [
    ([], False, False, ["demo", "llama-125m"]),
    ([], True, False, ["demo"]),
    ([], False, True, ["demo", "llama-125m", "llama-3.2-1b"]),
    (["--models", "llama4-tiny", "llama4-16e"], False, False, ["llama4-tiny", "llama4-16e"]),
    (["--models", "llama4-16e", "demo", "llama4-16e"], True, False, ["llama4-16e", "demo"]),
])
def test_models_option(argv, quick, large, want):
    from llamaship.bench.runner import Plan
    from llamaship.cli import build_parser

    args = build_parser().parse_args(["bench", *argv, *(["--quick"] if quick else []), *(["--large"] if large else [])])
    assert Plan(args.quick, args.large, args.recipes, args.device, args.models).models == want


def test_unknown_model_is_refused_and_models_runs_leave_the_readme_alone(monkeypatch):
    from llamaship.bench import runner
    from llamaship.cli import build_parser, cmd_bench

    with pytest.raises(ValueError, match="unknown bench model 'llama5'"):
        runner.Plan(False, False, None, "cpu", ["llama5"])
    seen = {}
    monkeypatch.setattr("llamaship.bench.main", lambda a: seen.setdefault("args", a) and 0)
    for argv, readme in ((["bench", "--models", "llama4-tiny"], False), (["bench"], True), (["bench", "--quick"], False),
                         (["bench", "--models", "demo", "--update-readme"], True)):
        seen.clear()
        cmd_bench(build_parser().parse_args(argv))
        assert seen["args"].update_readme is readme, argv


def test_llama4_models_get_only_llama4_recipes():
    from llamaship.bench.runner import Plan

    plan = Plan(False, False, None, "cpu", ["demo", "llama4-tiny"])
    assert plan.recipes_for("demo") == ["fp32", "int8", "hybrid-int8", "hybrid-int4", "int4", "auto"]
    assert plan.recipes_for("llama4-tiny") == ["fp32", "int8", "hybrid-int4", "int4", "auto"]
    assert Plan(False, False, ["hybrid-int8", "int4"], "cpu", ["llama4-tiny"]).recipes_for("llama4-tiny") == ["int4"]


def test_llama4_roofline_uses_active_bytes():
    from llamaship.bench import report as rep

    data = _synthetic_report(0.002, 0.008, 4)
    model = data["models"].pop("demo")
    r = model["recipes"]["fp32"]
    r["active_bytes_per_token"] = 250_000  # a quarter of the build's per-token initializers
    r["compile_rss_mb"] = {"peak": 500.0, "start": 60.0}
    model.update(checkpoint_bytes=3 * 10**6, llama4={"active_params": 1e5, "total_params": 4e5})
    data["models"]["llama4-tiny"] = model
    rep.evaluate(data)
    assert r["roofline_tps"] == pytest.approx(10e9 / 250_000)
    md = rep.markdown(data)
    assert "| llama4-tiny | fp32 |" in md and "500 (60)" in md and "0.25 |" in md


def test_llama4_experts_stay_float_unless_hidden_and_width_are_block_multiples():
    from llamaship.bench.models import llama4_active_bytes, llama4_bits

    cfg = _llama4_config(intermediate_size=48)  # QMoE needs both K's (64 and 48) in blocks of 32
    got = llama4_active_bytes(cfg, llama4_bits("int4"))
    assert got["parts"]["experts"] == 4 * 3 * 64 * 48 * 4.0  # one expert a layer, float32
    assert got["parts"]["shared_expert"] == 4 * (2 * 48 * 64 * 0.625 + 64 * 48 * 4.0)  # gate/up K=64 int4, down K=48 float
