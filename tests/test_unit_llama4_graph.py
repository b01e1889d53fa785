"""The Llama 4 text graph builder against transformers (float32): logits of a prefill and greedy
decode steps, through onnxruntime directly, on tiny random configs covering every feature."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from compiler_service.llama4.build import build_llama4
from tests.llama4_parity import make_checkpoint, max_diff, onnx_steps, reference_steps

TOLERANCE = 1e-3
SEQ = 40  # longer than the chunk (8) and the temperature floor (4) of tiny_config
DECODE = 4


def _parity(tmp_path: Path, demo_model: Path, lengths: tuple[int, ...] = (SEQ,), seed: int = 0,
            edit_config: dict | None = None, **overrides) -> list[float]:
    ckpt, out = tmp_path / "ckpt", tmp_path / "build"
    model = make_checkpoint(ckpt, demo_model, seed=seed, **overrides)
    if edit_config:  # the build sees a different config than the reference model (sensitivity checks)
        cfg = json.loads((ckpt / "config.json").read_text())
        (ckpt / "config.json").write_text(json.dumps({**cfg, **edit_config}))
    summary = build_llama4(ckpt, out, precision="fp32", pool="cpu", context_length=128)
    assert "com.microsoft.GroupQueryAttention" in summary["ops"]
    rng = np.random.default_rng(seed)
    prompts = [[1] + [int(t) for t in rng.integers(4, 2048, n - 1)] for n in lengths]
    refs = [reference_steps(model, p, DECODE) for p in prompts]
    cfg = model.config
    got = onnx_steps(out, prompts, [r[1] for r in refs], cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)
    return [max_diff(ref[0], row) for ref, row in zip(refs, got)]


@pytest.mark.parametrize("overrides", [
    pytest.param({"interleave_moe_layer_step": 1}, id="moe-every-layer"),
    pytest.param({"interleave_moe_layer_step": 2}, id="moe-alternate-layers"),
    pytest.param({"moe_layers": [0, 3]}, id="moe-explicit-list"),
    pytest.param({"no_rope_layer_interval": 2}, id="nope-every-2nd"),
    pytest.param({"no_rope_layers": [0, 1, 1, 0]}, id="nope-explicit-list"),
    pytest.param({"use_qk_norm": False}, id="no-qk-norm"),
    pytest.param({"num_experts_per_tok": 2}, id="top-2"),
    pytest.param({"attention_chunk_size": None}, id="no-chunking"),
    pytest.param({"attn_temperature_tuning": False}, id="no-temperature-tuning"),
    pytest.param({"num_key_value_heads": 4, "num_attention_heads": 4}, id="mha"),
    pytest.param({"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}}, id="default-rope"),
])
def test_parity(tmp_path, demo_model, overrides):
    diffs = _parity(tmp_path, demo_model, **overrides)
    assert max(diffs) < TOLERANCE, diffs


@pytest.mark.parametrize("top_k", [1, 2])
def test_batch_of_different_lengths_decodes_together(tmp_path, demo_model, top_k):
    diffs = _parity(tmp_path, demo_model, lengths=(SEQ, 13, 27, 8), interleave_moe_layer_step=2,
                    num_experts_per_tok=top_k)
    assert max(diffs) < TOLERANCE, diffs


@pytest.mark.parametrize("edit", [
    pytest.param({"attention_chunk_size": 16}, id="chunk-size"),
    pytest.param({"floor_scale": 8192}, id="temperature-floor"),
    pytest.param({"use_qk_norm": False}, id="qk-norm"),
    pytest.param({"num_experts_per_tok": 2}, id="top-k"),
])
def test_tests_see_each_feature(tmp_path, demo_model, edit):
    """A build made from a config that differs in one feature is far off: the parity configs
    really exercise that feature (chunks and the temperature floor are shorter than SEQ)."""
    diffs = _parity(tmp_path, demo_model, edit_config=edit)
    assert max(diffs) > 1e-2, diffs


def test_prompt_appended_in_two_parts(tmp_path, demo_model):
    """A second multi-token call on a cache (S > 1, past > 0: positions from the mask, as GQA
    takes them) gives transformers' logits for the whole prompt."""
    import onnxruntime as ort
    import torch

    ckpt, out = tmp_path / "ckpt", tmp_path / "build"
    model = make_checkpoint(ckpt, demo_model, seed=4)
    build_llama4(ckpt, out, precision="fp32", pool="cpu", context_length=128)
    prompt = [1] + [int(t) for t in np.random.default_rng(4).integers(4, 2048, SEQ - 1)]
    with torch.no_grad():
        want = model(input_ids=torch.tensor([prompt])).logits[0].numpy()
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    cfg = model.config
    past = {f"past_key_values.{i}.{kind}": np.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), np.float32)
            for i in range(cfg.num_hidden_layers) for kind in ("key", "value")}
    names = [o.name for o in session.get_outputs()]
    got = []
    for lo, hi in ((0, 19), (19, SEQ)):  # the split crosses chunk (8) and temperature floor (4) boundaries
        feeds = {"input_ids": np.array([prompt[lo:hi]]), "attention_mask": np.ones((1, hi), np.int64), **past}
        outs = dict(zip(names, session.run(None, feeds)))
        got.append(outs["logits"][0])
        past = {n.replace("present", "past_key_values"): v for n, v in outs.items() if n.startswith("present")}
    assert float(np.abs(np.concatenate(got) - want).max()) < TOLERANCE
