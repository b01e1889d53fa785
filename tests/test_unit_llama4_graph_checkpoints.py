"""Llama 4 sources the graph builder takes (bf16 shards, the text tower of a multimodal
checkpoint, published config quirks) and the ones it refuses, with the message it gives."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from compiler_service.builder_runner import BuildCancelled
from compiler_service.checkpoint import CheckpointError
from compiler_service.llama4 import config as l4config
from compiler_service.llama4.build import build_llama4
from tests.llama4_parity import TOKENIZER_FILES, make_checkpoint, max_diff, onnx_steps, reference_steps, tiny_config

VISION = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, image_size=28,
              patch_size=14, vision_output_dim=32, projector_input_dim=64, projector_output_dim=64,
              pixel_shuffle_ratio=0.5)


def _check_parity(text_model, build: Path, steps: int = 3) -> None:
    rng = np.random.default_rng(7)
    prompt = [1] + [int(t) for t in rng.integers(4, 2048, 29)]
    ref, tokens = reference_steps(text_model, prompt, steps)
    cfg = text_model.config
    got = onnx_steps(build, [prompt], [tokens], cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim)[0]
    assert max_diff(ref, got) < 1e-3


def test_bf16_sharded_checkpoint(tmp_path, demo_model):
    import torch
    from transformers import Llama4ForCausalLM

    ckpt = tmp_path / "ckpt"
    model = make_checkpoint(ckpt, demo_model, seed=1, interleave_moe_layer_step=2)
    for f in ckpt.glob("*.safetensors"):
        f.unlink()
    model.to(torch.bfloat16).save_pretrained(ckpt, max_shard_size="100KB")
    assert len(list(ckpt.glob("*.safetensors"))) > 2
    summary = build_llama4(ckpt, tmp_path / "build", precision="fp32", pool="cpu", context_length=64)
    assert summary["moe_layers"] == [1, 3]
    reference = Llama4ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()  # bf16 weights, fp32 compute
    _check_parity(reference, tmp_path / "build")


def test_text_tower_of_a_conditional_generation_checkpoint(tmp_path, demo_model):
    import torch
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(2)
    model = Llama4ForConditionalGeneration(Llama4Config(text_config=tiny_config(), vision_config=VISION)).eval()
    with torch.no_grad():
        for name, param in model.language_model.named_parameters():
            if "norm" not in name:
                param.normal_(0.0, 0.15 if "embed" not in name else 1.0)
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    for name in TOKENIZER_FILES:
        (ckpt / name).write_bytes((demo_model / name).read_bytes())
    build_llama4(ckpt, tmp_path / "build", precision="fp32", pool="cpu", context_length=64)
    assert (tmp_path / "build" / "tokenizer.json").is_file()
    _check_parity(model.language_model, tmp_path / "build")


def test_published_config_quirks():
    text = dict(tiny_config(), attn_temperature_tuning=4, max_position_embeddings=10_485_760, no_rope_layers=[],
                rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                   "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    del text["rope_parameters"]
    spec = l4config.parse({"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
                           "text_config": text})
    assert spec.temperature_tuning is True and spec.weight_prefix == "language_model."
    assert spec.rope["rope_type"] == "llama3" and spec.rope["rope_theta"] == 500000.0
    assert spec.rope_layers == (True, True, True, False)  # empty no_rope_layers: the default
    assert spec.chunked_layers == (True, True, True, False)
    assert spec.eos_token_ids == (2, 3)


def test_a_config_without_a_chunk_size_takes_transformers_default():
    text = dict(tiny_config())
    text.pop("attention_chunk_size", None)
    text.pop("layer_types", None)
    spec = l4config.parse({"architectures": ["Llama4ForCausalLM"], "model_type": "llama4_text", **text})
    assert spec.attention_chunk_size == 8192 and any(spec.chunked_layers)


def test_context_length_is_the_request_not_max_position_embeddings(tmp_path, demo_model):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, demo_model, max_position_embeddings=10_485_760)
    build_llama4(ckpt, tmp_path / "build", precision="fp32", pool="cpu", context_length=64)
    genai = json.loads((tmp_path / "build" / "genai_config.json").read_text())
    assert genai["model"]["context_length"] == 64 and genai["search"]["max_length"] == 64


def _rewrite_tensor(ckpt: Path, name: str, shape: list[int] | None) -> None:
    """Drop tensor `name` from the checkpoint (shape None) or give it another shape."""
    import torch
    from safetensors.torch import load_file, save_file

    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    if shape is None:
        del tensors[name]
    else:
        tensors[name] = torch.zeros(shape)
    save_file(tensors, path, metadata={"format": "pt"})


@pytest.mark.parametrize("name,shape,message", [
    ("model.layers.1.feed_forward.experts.gate_up_proj", None,
     "missing tensor model.layers.1.feed_forward.experts.gate_up_proj"),
    ("model.layers.1.feed_forward.experts.down_proj", [4, 16, 64],
     "tensor model.layers.1.feed_forward.experts.down_proj has shape [4, 16, 64], expected [4, 32, 64]"),
    ("model.layers.0.feed_forward.router.weight", [3, 64],
     "tensor model.layers.0.feed_forward.router.weight has shape [3, 64], expected [4, 64]"),
])
def test_malformed_checkpoint_names_the_tensor(tmp_path, demo_model, name, shape, message):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, demo_model, interleave_moe_layer_step=1)
    _rewrite_tensor(ckpt, name, shape)
    with pytest.raises(CheckpointError) as err:
        build_llama4(ckpt, tmp_path / "build", precision="fp32", pool="cpu", context_length=64)
    assert str(err.value) == message
    assert not (tmp_path / "build" / "model.onnx").exists()


def test_corrupt_safetensors_header(tmp_path, demo_model):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, demo_model)
    (ckpt / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 40) + b"{}")
    with pytest.raises(CheckpointError, match="corrupt safetensors file model.safetensors"):
        build_llama4(ckpt, tmp_path / "build", precision="fp32", pool="cpu", context_length=64)


@pytest.mark.parametrize("edit,message", [
    ({"architectures": ["LlamaForCausalLM"]}, "is not a Llama 4 model"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1.0}}, "rope type yarn is not supported"),
    ({"num_key_value_heads": 3}, "not a multiple of num_key_value_heads 3"),
    ({"moe_layers": [9]}, "moe_layers must list layer indices below 4"),
])
def test_bad_config(tmp_path, demo_model, edit, message):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, demo_model)
    cfg = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**cfg, **edit}))
    with pytest.raises(CheckpointError, match=message):
        build_llama4(ckpt, tmp_path / "build", precision="fp32", pool="cpu", context_length=64)


def test_should_stop_cancels_between_layers(tmp_path, demo_model):
    ckpt = tmp_path / "ckpt"
    make_checkpoint(ckpt, demo_model)
    seen: list[str] = []
    with pytest.raises(BuildCancelled):
        build_llama4(ckpt, tmp_path / "build", precision="fp32", pool="cpu", context_length=64,
                     progress=lambda f, m: seen.append(m), should_stop=lambda: any("layer 2/" in m for m in seen))
    assert seen[-1] == "converting layer 2/4"
