"""Llama 4 in the compile pipeline, without a stack: recipes offered, gate defaults for a routed
model, the graph check, and the builder run (progress, cancellation, errors)."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import pytest
from onnx import helper

from compiler_service import auto_precision, llama4_runner, quality, recipes, verify
from compiler_service.builder_runner import BuildCancelled
from compiler_service.failures import CompileError


def test_llama4_recipes_are_what_its_builder_makes():
    only_fp32 = {"cpu": ("fp32",)}
    recipes.check_llama4(recipes.get("fp32", "cpu"), "cpu", only_fp32)
    with pytest.raises(recipes.RecipeError,
                       match="recipe int8 on pool cpu is not supported for Llama 4 checkpoints yet; supported: fp32 on cpu"):
        recipes.check_llama4(recipes.get("int8", "cpu"), "cpu", only_fp32)
    with pytest.raises(recipes.RecipeError, match="recipe fp16 on pool cuda .* supported: fp32 on cpu$"):
        recipes.check_llama4(recipes.get("fp16", "cuda"), "cuda", only_fp32)
    # the builder's own table: fp32 on cpu, fp16 on cuda, quantized on both; auto where the pool offers it
    assert recipes.llama4_offered(llama4_runner.supported_precisions()) == {
        "cpu": ("fp32", "int8", "int4", "hybrid-int4", "auto"), "cuda": ("fp16", "int8", "int4", "hybrid-int4")}
    with pytest.raises(recipes.RecipeError, match="recipe hybrid-int8 on pool cuda .* supported: fp32, int8"):
        recipes.check_llama4(recipes.get("hybrid-int8", "cuda"), "cuda", llama4_runner.supported_precisions())


def test_routed_gate_defaults_keep_float_strict_and_relax_quantized():
    dense, routed = quality.thresholds_for("fp32", {}), quality.thresholds_for("fp32", {}, routed=True)
    assert routed == dense
    for recipe in ("int8", "int4", "hybrid-int4", "auto"):
        d, r = quality.thresholds_for(recipe, {}), quality.thresholds_for(recipe, {}, routed=True)
        assert r.min_top1_agreement < d.min_top1_agreement and r.max_mean_kl > d.max_mean_kl
    assert quality.thresholds_for("int4", {"max_mean_kl": 0.01}, routed=True).max_mean_kl == 0.01


def _graph(tmp_path: Path, nodes: list) -> Path:
    import onnx
    from onnx import TensorProto

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", 8])
    onnx.save(helper.make_model(helper.make_graph(nodes, "g", [ids], [out])), str(tmp_path / "model.onnx"))
    return tmp_path


def _node(op: str, name: str):
    return helper.make_node(op, [], [name + "/out"], name=name, domain="com.microsoft")


def test_graph_check_wants_attention_in_every_layer_and_experts_in_moe_layers(tmp_path):
    fp32 = recipes.get("fp32", "cpu")
    gqa = [_node("GroupQueryAttention", f"/model/layers.{i}/attn/GroupQueryAttention") for i in range(3)]
    built = _graph(tmp_path, [*gqa, _node("MoE", "/model/layers.0/moe/MoE"),
                              _node("MatMul", "/model/layers.2/moe/experts/fc1")])
    assert verify.inspect_graph(built, fp32, 3, (0, 2))["ops"]["GroupQueryAttention"] == 3
    with pytest.raises(CompileError, match="MoE layer 1 has no MoE kernel or expert nodes"):
        verify.inspect_graph(built, fp32, 3, (0, 1))
    with pytest.raises(CompileError, match="layer 3 has no GroupQueryAttention kernel"):
        verify.inspect_graph(built, fp32, 4, ())
    with pytest.raises(CompileError, match="recipe int8 wants quantized weights, but the graph has no MatMulNBits or QMoE"):
        verify.inspect_graph(built, recipes.get("int8", "cpu"), 3, (0,))
    quantized = _graph(tmp_path, [*gqa, _node("QMoE", "/model/layers.0/moe/QMoE")])
    assert verify.inspect_graph(quantized, recipes.get("int4", "cpu"), 3, (0,))["ops"]["QMoE"] == 1
    with pytest.raises(CompileError, match="recipe fp32 wants float weights, but the graph has 1 quantized kernels"):
        verify.inspect_graph(quantized, fp32, 3, (0,))
    import dataclasses

    auto = recipes.get("auto", "cpu")
    all_float = dataclasses.replace(auto, assignment=(("attn", "float"), ("experts", "float")))
    assert verify.inspect_graph(quantized, dataclasses.replace(auto, assignment=(("experts", "int4"),)), 3, (0,))
    with pytest.raises(CompileError, match="recipe auto wants float weights"):
        verify.inspect_graph(quantized, all_float, 3, (0,))


def _run(checkpoint: Path, out: Path, *, precision="fp32", cancel_after: float | None = None,
         stop: threading.Event | None = None) -> tuple[dict | Exception, list[tuple[float, str]]]:
    seen: list[tuple[float, str]] = []
    t0 = time.monotonic()

    async def progress(fraction: float, message: str) -> None:
        seen.append((fraction, message))

    async def should_cancel() -> bool:
        return cancel_after is not None and time.monotonic() - t0 > cancel_after

    async def main():
        return await llama4_runner.run_llama4_build(
            checkpoint, out, precision=precision, pool="cpu", context_length=64, on_progress=progress,
            should_cancel=should_cancel, stop=stop or threading.Event())

    try:
        return asyncio.run(main()), seen
    except Exception as exc:  # noqa: BLE001 - returned for the test to look at
        return exc, seen


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from llamaship.llama4_model import make_llama4

    return make_llama4(tmp_path_factory.mktemp("l4") / "tiny", num_hidden_layers=2, moe_layers=(1,))


def test_builder_runs_off_the_loop_and_reports_progress(tiny, tmp_path):
    report, seen = _run(tiny, tmp_path / "out")
    assert isinstance(report, dict), report
    assert report["moe_layers"] == [1] and (tmp_path / "out" / "model.onnx").is_file()
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert any("layer 2/2" in m for _, m in seen)


def test_builder_refusals_are_compile_errors(tiny, tmp_path):
    err, _ = _run(tiny, tmp_path / "out", precision="hybrid-int8-unknown")
    assert isinstance(err, CompileError) and "hybrid-int8-unknown" in str(err)
    stop = threading.Event()
    stop.set()  # the run ended (the job was stopped) before the builder's first layer
    err, _ = _run(tiny, tmp_path / "out2", stop=stop)
    assert isinstance(err, BuildCancelled)


@pytest.fixture()
def slow_builder(monkeypatch):
    """A builder that works until told to stop, and records when it did."""
    from compiler_service.llama4 import build

    state = {"stopped_at": None}

    def fake(checkpoint, out_dir, *, precision, pool, context_length, progress=None, should_stop=None):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            progress(0.5, "working")
            if should_stop():
                time.sleep(0.2)  # still writing for a moment after it was told
                state["stopped_at"] = time.monotonic()
                raise BuildCancelled("stopped")
            time.sleep(0.02)
        raise AssertionError("never told to stop")

    monkeypatch.setattr(build, "build_llama4", fake)
    return state


def test_a_cancelled_job_stops_the_builder(slow_builder, tmp_path):
    t0 = time.monotonic()
    err, _ = _run(tmp_path, tmp_path / "out", cancel_after=0.3)
    assert isinstance(err, BuildCancelled) and "Llama 4 builder" in str(err)
    assert slow_builder["stopped_at"] is not None and time.monotonic() - t0 < 3


def test_an_abandoned_run_returns_only_after_the_builder_stopped(slow_builder, tmp_path):
    async def main():
        task = asyncio.ensure_future(llama4_runner.run_llama4_build(
            tmp_path, tmp_path / "out", precision="fp32", pool="cpu", context_length=64,
            on_progress=lambda f, m: asyncio.sleep(0), should_cancel=lambda: asyncio.sleep(0, False),
            stop=threading.Event()))
        await asyncio.sleep(0.3)
        task.cancel()  # as the worker does when the job is cancelled or taken over
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.monotonic()

    returned = asyncio.run(main())
    assert slow_builder["stopped_at"] is not None and slow_builder["stopped_at"] <= returned


def test_a_job_stopped_through_progress_stops_the_builder(slow_builder, tmp_path):
    async def refuse(fraction: float, message: str) -> None:
        raise RuntimeError("job lost")  # what the worker's progress raises for a job it lost

    async def main():
        return await llama4_runner.run_llama4_build(
            tmp_path, tmp_path / "out", precision="fp32", pool="cpu", context_length=64, on_progress=refuse,
            should_cancel=lambda: asyncio.sleep(0, False), stop=threading.Event())

    with pytest.raises(BuildCancelled):
        asyncio.run(main())


def test_builder_version_changes_with_its_sources(tmp_path, monkeypatch):
    (tmp_path / "a.py").write_text("x = 1\n")
    monkeypatch.setattr(llama4_runner, "BUILDER_DIR", tmp_path)
    before = llama4_runner.builder_version()
    (tmp_path / "a.py").write_text("x = 2\n")
    assert llama4_runner.builder_version() != before and before.startswith("llama4-")


def test_llama4_auto_groups_sizes_and_choice():
    from compiler_service import llama4_auto
    from compiler_service.auto_precision import Budget, Drift
    from compiler_service.llama4 import config as l4config

    cfg = {"architectures": ["Llama4ForCausalLM"], "vocab_size": 256, "hidden_size": 64, "num_hidden_layers": 4,
           "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "intermediate_size": 32,
           "intermediate_size_mlp": 128, "num_local_experts": 8, "moe_layers": [1, 3],
           "attention_chunk_size": 8192}
    params = llama4_auto.group_params(l4config.parse(cfg))
    assert params == {"attn": 4 * 64 * 16 * (2 * 4 + 2 * 2), "mlp": 2 * 3 * 64 * 128, "shared_expert": 2 * 3 * 64 * 32,
                      "experts": 2 * 8 * 3 * 64 * 32, "lm_head": 256 * 64}
    cheap, costly = Drift(0.0001, 0.001, 0.01), Drift(0.5, 0.5, 50.0)
    sensitivity = {(g, w): (costly if (g, w) == ("attn", "int4") else cheap) for g in params for w in ("int8", "int4")}
    choice = auto_precision.choose(sensitivity, params, Budget(0.03, 0.07, 4.0))
    assert choice.assignment == {"attn": "int8", "mlp": "int4", "shared_expert": "int4", "experts": "int4",
                                 "lm_head": "int4"}
    assert llama4_auto.precision(choice.assignment).startswith("groups:attn=int8,mlp=int4,")
    nothing = auto_precision.choose({k: costly for k in sensitivity}, params, Budget(0.03, 0.07, 4.0))
    assert set(nothing.assignment.values()) == {"float"}

    seen: list[dict] = []

    async def build(assignment, label):
        seen.append(assignment)
        return cheap

    async def on_trial(i, n, label):
        assert n == 3

    # experts are never tried at 8 bits (QMoE's 8-bit CPU path decodes slower than float experts)
    got = asyncio.run(llama4_auto.measure_sensitivity(["attn", "experts"], build, on_trial))
    assert set(got) == {("attn", "int8"), ("attn", "int4"), ("experts", "int4")}
    assert seen[0] == {"attn": "int8", "experts": "float"} and seen[-1] == {"attn": "float", "experts": "int4"}
    # so when 4-bit experts cost too much, they stay float
    measured = {k: v for k, v in sensitivity.items() if k != ("experts", "int8")}
    measured[("experts", "int4")] = costly
    assert auto_precision.choose(measured, params, Budget(0.03, 0.07, 4.0)).assignment["experts"] == "float"


def test_router_flips_are_measured_with_the_weights_the_build_holds(tiny, tmp_path):
    import numpy as np

    from compiler_service.llama4_router_flips import dequantized_weights, router_flips
    from compiler_service.torch_reference import llama4_logits_layerwise

    report, _ = _run(tiny, tmp_path / "h4", precision="hybrid-int4")
    assert isinstance(report, dict), report
    ids = quality.tokenize(tiny, list(quality.DEFAULT_PROMPTS[:3]))
    as_built = llama4_logits_layerwise(tiny, ids, transform=dequantized_weights("hybrid-int4"))
    for ref, got in zip(as_built, quality.build_logits(tmp_path / "h4", ids)):
        assert np.abs(ref - got).max() < 1e-4  # the dequantized reference computes what the build does
    routes: dict = {}
    quality.reference_logits(tiny, ids, routes)
    assert list(routes) == [1] and [r.shape for r in routes[1]] == [(len(x), 1) for x in ids]
    flips = router_flips(tiny, ids, "hybrid-int4", routes)
    assert set(flips) == {"rate", "per_layer", "token_choices"} and 0 <= flips["rate"] <= 1
    assert flips["token_choices"] == sum(map(len, ids)) and list(flips["per_layer"]) == ["1"]
    assert router_flips(tiny, ids, "fp32", routes) == {} and dequantized_weights("fp32") is None
