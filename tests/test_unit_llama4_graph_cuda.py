"""Llama 4 builds for the cuda pool compute in float16 (CUDA's GroupQueryAttention takes no
float32). ONNX Runtime's CPU provider runs the same float16 kernels, so these tests check the
graph here; scripts/device/check_llama4.py checks it on a GPU against PyTorch there."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from compiler_service.llama4.build import build_llama4
from compiler_service.llama4.linear import precision_named
from tests.llama4_parity import fake_quantize_model, make_checkpoint, onnx_steps, reference_steps

SEQ, DECODE = 40, 4
FP16_TOLERANCE = 0.05  # logits of about ±5: float16 keeps 3 significant digits through 4 layers


def _steps(tmp_path: Path, demo_model: Path, precision: str, lengths=(SEQ, 17), **overrides):
    overrides.setdefault("intermediate_size", 64)  # CUDA's QMoE tile (tiny_config's 32 keeps experts float)
    model = make_checkpoint(tmp_path / "ckpt", demo_model, **overrides)
    if precision != "fp16":
        fake_quantize_model(model, precision_named(precision).bits)
    summary = build_llama4(tmp_path / "ckpt", tmp_path / "build", precision=precision, pool="cuda", context_length=128)
    rng = np.random.default_rng(0)
    prompts = [[1] + [int(t) for t in rng.integers(4, 2048, n - 1)] for n in lengths]
    refs = [reference_steps(model, p, DECODE) for p in prompts]
    cfg = model.config
    got = onnx_steps(tmp_path / "build", prompts, [r[1] for r in refs], cfg.num_hidden_layers,
                     cfg.num_key_value_heads, cfg.head_dim)
    return summary, refs, got


@pytest.mark.parametrize("precision", ["fp16", "int4"])
def test_cuda_builds_compute_in_float16_and_match_transformers(tmp_path, demo_model, precision):
    summary, refs, got = _steps(tmp_path, demo_model, precision, use_qk_norm=True, interleave_moe_layer_step=2)
    assert summary["compute_type"] == "float16"
    model = onnx.load(str(tmp_path / "build" / "model.onnx"), load_external_data=False)
    past = next(i for i in model.graph.input if i.name == "past_key_values.0.key")
    assert past.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].name == "logits"
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    wide = [t.name for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert wide and all(name.startswith("const/float32/") for name in wide)  # the temperature's arithmetic only
    assert all(t.data_type != onnx.TensorProto.FLOAT for t in model.graph.initializer if t.data_location)
    expected_experts = "MoE float16" if precision == "fp16" else "QMoE 4-bit block 32"
    assert summary["features"]["weights.experts"] == expected_experts
    for (ref_logits, ref_tokens), rows in zip(refs, got):
        prefill = rows[0]
        assert np.abs(prefill - ref_logits[0]).max() < FP16_TOLERANCE
        for step, (want, have) in enumerate(zip(ref_logits[1:], rows[1:])):
            assert np.abs(want - have).max() < FP16_TOLERANCE, f"decode step {step}"
        assert [int(r.argmax()) for r in rows[:-1][1:]] == ref_tokens[1:]  # greedy tokens agree


def test_chunk_mask_and_temperature_past_float16_precision(tmp_path, demo_model):
    """Positions beyond 2048 are not exact in float16: the chunk mask and the temperature are
    computed from int64 positions (and float32), then narrowed, so a long context stays exact."""
    _, refs, got = _steps(tmp_path, demo_model, "fp16", lengths=(SEQ,), attention_chunk_size=16, floor_scale=8)
    assert max(float(np.abs(a - b).max()) for a, b in zip(refs[0][0], got[0])) < FP16_TOLERANCE


def test_a_context_within_one_chunk_needs_no_chunk_mask(tmp_path, demo_model):
    """Llama 4's chunk is 8192 tokens: a build whose context fits in it attends plainly causally
    (no attention_bias: ORT 1.31's CUDA GroupQueryAttention with a bias mishandled right-padded
    rows), and still matches transformers."""
    summary, refs, got = _steps(tmp_path, demo_model, "fp16", attention_chunk_size=128)
    model = onnx.load(str(tmp_path / "build" / "model.onnx"), load_external_data=False)
    assert not any(n.op_type == "GroupQueryAttention" and len(n.input) > 10 and n.input[10] for n in model.graph.node)
    assert summary["features"]["chunked_attention"].startswith("causal only")
    for (ref_logits, _), rows in zip(refs, got):
        assert max(float(np.abs(a - b).max()) for a, b in zip(ref_logits, rows)) < FP16_TOLERANCE


def test_experts_narrower_than_cudas_qmoe_tile_stay_float(tmp_path, demo_model):
    make_checkpoint(tmp_path / "ckpt", demo_model, intermediate_size=32)
    cuda = build_llama4(tmp_path / "ckpt", tmp_path / "cuda", precision="int4", pool="cuda", context_length=64)
    cpu = build_llama4(tmp_path / "ckpt", tmp_path / "cpu", precision="int4", pool="cpu", context_length=64)
    assert cuda["features"]["weights.experts"] == "MoE float16"
    assert cpu["features"]["weights.experts"] == "QMoE 4-bit block 32"
    assert cuda["features"]["weights.attn"] == "MatMulNBits 4-bit block 32"


def test_pool_decides_the_compute_type(tmp_path, demo_model):
    make_checkpoint(tmp_path / "ckpt", demo_model)
    with pytest.raises(ValueError, match="precision fp16 is for the cuda pool, not cpu"):
        build_llama4(tmp_path / "ckpt", tmp_path / "a", precision="fp16", pool="cpu", context_length=64)
    with pytest.raises(ValueError, match="precision fp32 is for the cpu pool, not cuda"):
        build_llama4(tmp_path / "ckpt", tmp_path / "b", precision="fp32", pool="cuda", context_length=64)
    assert build_llama4(tmp_path / "ckpt", tmp_path / "c", precision="int8", pool="cpu",
                        context_length=64)["compute_type"] == "float32"


def test_weights_beyond_float16_range_fail_clearly(tmp_path, demo_model):
    from safetensors.numpy import load_file, save_file

    make_checkpoint(tmp_path / "ckpt", demo_model)
    path = tmp_path / "ckpt" / "model.safetensors"
    tensors = load_file(str(path))
    name = "model.layers.0.self_attn.o_proj.weight"
    tensors[name] = tensors[name].copy()
    tensors[name][0, 0] = 2e5
    save_file(tensors, str(path), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"weight {name} holds values beyond float16's range"):
        build_llama4(tmp_path / "ckpt", tmp_path / "b", precision="fp16", pool="cuda", context_length=64)
    # quantized weights keep their scales in float16 too, and a 4-bit o_proj's largest scale, 2e5 / 7, fits
    build_llama4(tmp_path / "ckpt", tmp_path / "c", precision="int4", pool="cuda", context_length=64)
