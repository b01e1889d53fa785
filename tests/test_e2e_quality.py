"""The quality gate on real builds of the demo model: each recipe's report is measured and meets
its thresholds; a gate no build can pass keeps the build out of the alias (unless forced); bad
gate settings are refused up front."""

from __future__ import annotations

import json
import time

import grpc
import pytest

from compiler_service.quality import DEFAULT_THRESHOLDS
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("recipe", ["fp32", "int8", "hybrid-int8", "hybrid-int4", "int4"])
def test_each_recipe_passes_its_gate_with_measured_numbers(client, demo_model, fp32_build, recipe):
    job = client.compile(str(demo_model), f"q-{recipe}", recipe)
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    q = client.build(job.build_id).quality
    t = DEFAULT_THRESHOLDS[recipe]
    assert q.passed and not q.failures and not q.skipped_reason
    assert q.prompt_source == "default" and q.prompts >= 10 and q.tokens > 200
    assert q.top1_agreement >= t.min_top1_agreement and q.mean_kl <= t.max_mean_kl
    assert q.perplexity_build <= q.perplexity_reference * (1 + t.max_perplexity_increase_pct / 100)
    assert q.min_top1_agreement == pytest.approx(t.min_top1_agreement)
    manifest = json.loads(client.build(job.build_id).manifest_json)
    profile = manifest["profile"]["summary"]
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization"} <= set(profile["fused_ops"])
    assert ("MatMulNBits" in profile["fused_ops"]) == (recipe != "fp32")
    assert not profile["warnings"] and profile["rotary"] == "fused into GroupQueryAttention"
    assert profile["model_runs"] == 1 + profile["decode_steps"] and 0 < profile["attention_share"] < 1
    assert profile["per_op"]["GroupQueryAttention"]["calls"] == 4 * profile["model_runs"]  # 4 layers
    assert "load_s_original" in manifest["profile"]["load"]
    assert any(f["path"] == profile["trace"] for f in manifest["files"])  # the trace ships with the build
    if recipe == "fp32":  # the same math as PyTorch, to float rounding
        assert q.top1_agreement == 1.0 and q.max_abs_logit_diff < 1e-3
    else:  # quantization moves the logits, measurably
        assert 0 < q.mean_kl and q.max_abs_logit_diff > 1e-3


def test_a_failed_gate_keeps_the_build_out_until_forced(client, demo_model, fp32_build):
    assert client.compile(str(demo_model), "gated", "fp32").build_id == fp32_build
    impossible = compiler_pb2.QualityGate(min_top1_agreement=1.0, max_mean_kl=0.0,
                                          eval_prompts=["def f(x):\n    return x * 2\n", "import sys\nprint(sys.argv)"])
    job = client.compile(str(demo_model), "gated", "int4", quality=impossible)
    assert job.state == compiler_pb2.JOB_STATE_FAILED and "quality gate failed" in job.message
    assert job.build_id and job.build_id != fp32_build  # stored, with its report
    info = client.build(job.build_id)
    assert not info.quality.passed and info.quality.failures and info.quality.prompt_source == "request"
    assert info.quality.prompts == 2
    served = {m.name: m.build_id for m in client.models()}
    assert served["gated"] == fp32_build  # the alias did not move

    impossible.force_publish = True
    forced = client.compile(str(demo_model), "gated", "int4", quality=impossible)
    assert forced.state == compiler_pb2.JOB_STATE_SUCCEEDED and forced.build_id == job.build_id
    assert {m.name: m.build_id for m in client.models()}["gated"] == job.build_id
    manifest = json.loads(client.build(job.build_id).manifest_json)
    assert manifest["quality"]["forced"] and manifest["quality"]["forced_publishes"][0]["model_name"] == "gated"

    impossible.force_publish = False  # asking again without force: refused, and the record of the forced publish stays
    again = client.compile(str(demo_model), "gated-again", "int4", quality=impossible)
    assert again.state == compiler_pb2.JOB_STATE_FAILED and again.build_id == job.build_id
    quality = json.loads(client.build(job.build_id).manifest_json)["quality"]
    assert quality["forced"] and [p["model_name"] for p in quality["forced_publishes"]] == ["gated"]


@pytest.mark.parametrize("gate, field", [
    (compiler_pb2.QualityGate(min_top1_agreement=1.5), "min_top1_agreement"),
    (compiler_pb2.QualityGate(max_mean_kl=-0.1), "max_mean_kl"),
    (compiler_pb2.QualityGate(max_perplexity_increase_pct=float("nan")), "max_perplexity_increase_pct"),
    (compiler_pb2.QualityGate(eval_prompts=["ok", "  "]), "eval_prompts[1]"),
])
def test_bad_gate_settings_are_invalid_argument(client, demo_model, gate, field):
    with pytest.raises(grpc.RpcError) as info:
        client.submit_compile(str(demo_model), "bad-gate", "int8", quality=gate)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and field in info.value.details()


def test_builds_show_prints_the_report(stack, fp32_build):
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "llamaship", "builds", "show", fp32_build, "--gateway",
                          stack.gateway_address], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "quality gate: passed" in out.stdout and "top-1 agreement  1.0000" in out.stdout
    assert "fused: GroupQueryAttention" in out.stdout and "GroupQueryAttention" in out.stdout


def test_get_build_of_an_unknown_build_is_not_found(client):
    with pytest.raises(grpc.RpcError) as info:
        client.build("0" * 20)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_dynamic_shape_check_rejects_a_static_graph(stack, fp32_build, tmp_path):
    import onnx

    from compiler_service import recipes
    from compiler_service.pipeline import CompileError, inspect_graph

    model = onnx.load(str(stack.cfg.store / "builds" / fp32_build / "model.onnx"), load_external_data=False)
    assert inspect_graph_ok(inspect_graph, model, tmp_path, recipes)
    input_ids = next(i for i in model.graph.input if i.name == "input_ids")
    for dim, value in zip(input_ids.type.tensor_type.shape.dim, (1, 128)):
        dim.ClearField("dim_param")
        dim.dim_value = value  # what a static export (batch 1, padded to 128) looks like
    onnx.save(model, str(tmp_path / "model.onnx"))
    with pytest.raises(CompileError, match="static input_ids dims"):
        inspect_graph(tmp_path, recipes.get("fp32", "cpu"))


def inspect_graph_ok(inspect_graph, model, tmp_path, recipes) -> bool:
    import onnx

    onnx.save(model, str(tmp_path / "model.onnx"))
    summary = inspect_graph(tmp_path, recipes.get("fp32", "cpu"))
    return all(isinstance(d, str) for d in summary["inputs"])


def test_auto_measures_each_group_and_builds_the_smallest_assignment_within_budget(client, demo_model):
    job = client.compile(str(demo_model), "q-auto", "auto")
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    info = client.build(job.build_id)
    manifest = json.loads(info.manifest_json)
    auto = manifest["recipe_details"]["auto"]
    sens = auto["sensitivity"]
    assert set(sens) == {f"{g}={w}" for g in ("attn", "mlp", "lm_head") for w in ("int8", "int4")}
    for g in ("attn", "mlp", "lm_head"):  # 4 bits drift more than 8 (measured, not assumed)
        assert sens[f"{g}=int4"]["mean_kl"] > sens[f"{g}=int8"]["mean_kl"] > 0
    assert auto["predicted"]["mean_kl"] <= auto["budget"]["mean_kl"]
    assert auto["predicted"]["top1_disagreement"] <= auto["budget"]["top1_disagreement"]
    chosen = auto["chosen"]
    assert "int4" in chosen.values() or "int8" in chosen.values()  # the demo model tolerates quantization
    bits = manifest["recipe_details"]["graph"]["quantized_matmuls"]
    for name, b in bits.items():  # the graph is what was chosen
        group = "attn" if "/attn/" in name else "mlp" if "/mlp/" in name else "lm_head"
        assert chosen[group] == {4: "int4", 8: "int8"}[b]
    assert info.quality.passed and info.quality.mean_kl <= auto["budget"]["mean_kl"]

    strict = client.compile(str(demo_model), "q-auto-strict", "auto",
                            quality=compiler_pb2.QualityGate(max_mean_kl=1e-9))
    assert strict.state == compiler_pb2.JOB_STATE_SUCCEEDED, strict.message
    strict_auto = json.loads(client.build(strict.build_id).manifest_json)["recipe_details"]["auto"]
    assert set(strict_auto["chosen"].values()) == {"float"}  # nothing fits a zero budget


def test_prompts_sampled_at_the_gateway_calibrate_and_gate_a_compile(stack, client, demo_model, fp32_build):
    from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2

    assert client.compile(str(demo_model), "sampled", "fp32").build_id == fp32_build
    job = client.compile(str(demo_model), "sampled", "int8",  # nothing sampled yet: a clear failure
                         quality=compiler_pb2.QualityGate(sampled_prompts_of="sampled"))
    assert job.state == compiler_pb2.JOB_STATE_FAILED and "no prompts sampled" in job.message
    on = client.stub.SetPromptSampling(gateway_pb2.PromptSampling(model="sampled", enabled=True, rate=1.0,
                                                                  max_prompts=3, max_chars=24))
    assert on.enabled and on.kept == 0
    secret = [f"def secret_{i}(x):\n    return x + {i}  # private user text {i}" for i in range(5)]
    for p in secret:
        client.generate("sampled", p, 4)
    deadline = time.time() + 10
    while (got := client.stub.GetPromptSampling(gateway_pb2.GetPromptSamplingRequest(model="sampled"))).seen < 5:
        assert time.time() < deadline
        time.sleep(0.1)
    assert got.kept == 3 and got.seen == 5  # bounded: a uniform reservoir of 3 out of 5

    job = client.compile(str(demo_model), "sampled", "int8",
                         quality=compiler_pb2.QualityGate(sampled_prompts_of="sampled"))
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    info = client.build(job.build_id)
    assert info.quality.prompt_source == "sampled:sampled" and info.quality.prompts == 3
    snapshot = json.loads(info.manifest_json)["quality"]["extra"]["prompts_snapshot"]
    lines = [json.loads(x)["prompt"] for x in (stack.cfg.store / snapshot).read_text().splitlines()]
    assert len(lines) == 3 and all(len(p) <= 24 and any(s.startswith(p) for s in secret) for p in lines)
    for log in stack.cfg.log_dir.glob("*.log"):  # never logged
        assert "private user text" not in log.read_text(), log.name

    off = client.stub.SetPromptSampling(gateway_pb2.PromptSampling(model="sampled", enabled=False, clear=True))
    assert not off.enabled and off.kept == 0
    with pytest.raises(grpc.RpcError) as bad:
        client.stub.SetPromptSampling(gateway_pb2.PromptSampling(model="sampled", enabled=True, rate=1.5))
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "rate" in bad.value.details()
