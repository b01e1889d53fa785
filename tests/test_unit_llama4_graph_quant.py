"""Quantized Llama 4 builds (MatMulNBits projections, QMoE experts) against transformers run
with the same round-to-nearest weights: the graph's packing and layouts are exact."""

from __future__ import annotations

import numpy as np
import pytest

from compiler_service.llama4.build import build_llama4
from compiler_service.llama4.linear import PRECISIONS, precision_named
from tests.llama4_parity import fake_quantize_model, make_checkpoint, max_diff, onnx_steps, reference_steps


@pytest.mark.parametrize("precision,tolerance,ops", [
    pytest.param("int4", 1e-3, {"com.microsoft.MatMulNBits", "com.microsoft.QMoE"}, id="int4"),
    # 8-bit QMoE on CPU always quantizes its activations to int8 (no float kernel)
    pytest.param("int8", 5e-2, {"com.microsoft.MatMulNBits", "com.microsoft.QMoE"}, id="int8"),
    pytest.param("hybrid-int4", 1e-3, {"com.microsoft.QMoE", "MatMul"}, id="hybrid-int4"),
])
@pytest.mark.parametrize("top_k", [1, 2])
def test_quantized_build_matches_its_dequantized_weights(tmp_path, demo_model, precision, tolerance, ops, top_k):
    ckpt, build = tmp_path / "ckpt", tmp_path / "build"
    model = make_checkpoint(ckpt, demo_model, seed=5, interleave_moe_layer_step=2, num_experts_per_tok=top_k)
    summary = build_llama4(ckpt, build, precision=precision, pool="cpu", context_length=64)
    assert ops <= set(summary["ops"])
    assert "com.microsoft.MoE" not in summary["ops"]
    fake_quantize_model(model, PRECISIONS[precision].bits)
    rng = np.random.default_rng(5)
    prompts = [[1] + [int(t) for t in rng.integers(4, 2048, n - 1)] for n in (40, 17)]
    refs = [reference_steps(model, p, 3) for p in prompts]
    cfg = model.config
    got = onnx_steps(build, prompts, [r[1] for r in refs], cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    diffs = [max_diff(ref[0], row) for ref, row in zip(refs, got)]
    assert max(diffs) < tolerance, diffs
    fp32_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    assert (build / "model.onnx.data").stat().st_size < fp32_bytes


def test_unquantizable_widths_stay_float(tmp_path, demo_model):
    """K not a multiple of the block (32): that projection stays MatMul, the rest is quantized."""
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, demo_model, intermediate_size_mlp=72, interleave_moe_layer_step=2)
    summary = build_llama4(ckpt, tmp_path / "build", precision="int4", pool="cpu", context_length=64)
    assert "MatMul" in summary["ops"] and "com.microsoft.MatMulNBits" in summary["ops"]


def test_per_group_precision(tmp_path, demo_model):
    ckpt, build = tmp_path / "ckpt", tmp_path / "build"
    model = make_checkpoint(ckpt, demo_model, seed=6, interleave_moe_layer_step=2)
    precision = "groups:attn=int8,experts=int4,lm_head=int4"
    summary = build_llama4(ckpt, build, precision=precision, pool="cpu", context_length=64)
    assert summary["features"]["weights.attn"] == "MatMulNBits 8-bit block 32"
    assert summary["features"]["weights.experts"] == "QMoE 4-bit block 32"
    assert summary["features"]["weights.mlp"] == "MatMul float32"
    fake_quantize_model(model, precision_named(precision).bits)
    prompt = [1] + [int(t) for t in np.random.default_rng(6).integers(4, 2048, 29)]
    ref, tokens = reference_steps(model, prompt, 2)
    cfg = model.config
    got = onnx_steps(build, [prompt], [tokens], cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)[0]
    assert max_diff(ref, got) < 1e-3


@pytest.mark.parametrize("precision", ["fp16", "groups:attn=int3", "groups:vision=int4"])
def test_unknown_precision(tmp_path, precision):
    with pytest.raises(ValueError, match="precision"):
        build_llama4(tmp_path, tmp_path / "build", precision=precision, pool="cpu", context_length=64)
