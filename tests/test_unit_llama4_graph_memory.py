"""The builder streams: its peak of traced allocations stays a small fraction of the checkpoint
(one expert, one layer's dense weights, a block of rows of the embeddings or lm_head)."""

from __future__ import annotations

import tracemalloc

import pytest

from compiler_service.llama4 import weights as l4weights
from compiler_service.llama4.build import build_llama4
from tests.llama4_parity import make_checkpoint


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_peak_allocations_are_a_fraction_of_the_checkpoint(tmp_path, demo_model, monkeypatch, precision):
    monkeypatch.setattr(l4weights, "ROW_BLOCK_BYTES", 128 << 10)
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, demo_model, hidden_size=128, intermediate_size=256, intermediate_size_mlp=256,
                    num_local_experts=16, num_attention_heads=4, head_dim=32, interleave_moe_layer_step=1)
    checkpoint_bytes = sum(f.stat().st_size for f in ckpt.glob("*.safetensors"))
    tracemalloc.start()
    try:
        build_llama4(ckpt, tmp_path / "build", precision=precision, pool="cpu", context_length=64)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    expert_bytes = 128 * 2 * 256 * 4
    assert checkpoint_bytes > 40 * expert_bytes
    assert peak < checkpoint_bytes / 12, (peak, checkpoint_bytes)
