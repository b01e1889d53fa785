"""Llama 4 checkpoints in the compiler: the checks before any heavy work (safetensors headers
only), published-config quirks, the conditional model's text tower, and the PyTorch reference."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from compiler_service import checkpoint as ckpt

SPEC = dict(hidden_size=64, intermediate_size=48, intermediate_size_mlp=96, num_hidden_layers=4, num_experts=4,
            attention_chunk_size=8, floor_scale=4)


@pytest.fixture(scope="module")
def llama4_dirs(tmp_path_factory) -> dict[str, Path]:
    from llamaship.llama4_model import make_llama4

    base = tmp_path_factory.mktemp("llama4")
    return {"causal": make_llama4(base / "causal", **SPEC),
            "conditional": make_llama4(base / "conditional", conditional=True, **SPEC)}


@pytest.fixture()
def causal(tmp_path, llama4_dirs) -> Path:
    return Path(shutil.copytree(llama4_dirs["causal"], tmp_path / "causal"))


@pytest.fixture()
def conditional(tmp_path, llama4_dirs) -> Path:
    return Path(shutil.copytree(llama4_dirs["conditional"], tmp_path / "conditional"))


def _edit_weights(path: Path, edit) -> None:
    from safetensors.numpy import load_file, save_file

    f = path / "model.safetensors"
    tensors = load_file(str(f))
    edit(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})


def _edit_config(path: Path, edit) -> None:
    cfg = json.loads((path / "config.json").read_text())
    edit(cfg)
    (path / "config.json").write_text(json.dumps(cfg))


def test_causal_checkpoint_is_accepted_with_published_quirks(causal):
    raw = json.loads((causal / "config.json").read_text())
    assert raw["attn_temperature_tuning"] == 4 and raw["max_position_embeddings"] == 10_485_760
    assert raw["eos_token_id"] == [2, 0] and raw["tie_word_embeddings"] is False
    info = ckpt.inspect(causal)
    assert info.is_llama4 and info.architecture == "Llama4ForCausalLM"
    assert info.num_layers == 4 and info.vocab_size == 2048 and info.max_position_embeddings == 10_485_760
    h, e, i, v = 64, 4, 48, 2048
    attn = 2 * (64 * h) + 2 * (32 * h)
    moe = e * h + e * h * 2 * i + e * i * h + 3 * i * h
    assert info.parameters == 2 * v * h + h + 4 * (2 * h + attn + moe)


def test_more_published_quirks_are_tolerated(causal):
    def published(cfg):
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope.pop("rope_theta")
        cfg["rope_scaling"] = rope
        cfg["no_rope_layers"] = []
        cfg["for_llm_compressor"] = False

    _edit_config(causal, published)
    assert ckpt.inspect(causal).num_layers == 4
    from compiler_service.torch_reference import llama4_text_config

    text = llama4_text_config(json.loads((causal / "config.json").read_text()))
    assert text.attn_temperature_tuning is True and text.no_rope_layers == [1, 1, 1, 0]
    assert text.rope_parameters["rope_type"] == "llama3" and text.rope_parameters["rope_theta"] == 500000.0


def test_conditional_checkpoint_gives_its_text_tower(conditional, llama4_dirs):
    info = ckpt.inspect(conditional)
    assert info.architecture == "Llama4ForConditionalGeneration"
    assert info.num_layers == 4 and info.vocab_size == 2048 and info.text["attn_temperature_tuning"] == 4
    assert info.parameters == ckpt.inspect(llama4_dirs["causal"]).parameters  # the vision tower not counted


def _drop(name):
    return lambda t: t.pop(name)


def _reshape(name, shape):
    return lambda t: t.__setitem__(name, np.zeros(shape, dtype=np.float32))


FF = "model.layers.1.feed_forward"


@pytest.mark.parametrize("edit, message", [
    (_drop(f"{FF}.experts.gate_up_proj"), f"the weights have no {FF}.experts.gate_up_proj"),
    (_drop(f"{FF}.experts.down_proj"), f"the weights have no {FF}.experts.down_proj"),
    (_reshape(f"{FF}.experts.gate_up_proj", (4, 64, 48)),
     rf"{FF}.experts.gate_up_proj is \[4, 64, 48\], the config implies \[4, 64, 96\] \[experts, hidden, 2 × intermediate_size\]"),
    (_reshape(f"{FF}.experts.down_proj", (4, 64, 48)),
     rf"{FF}.experts.down_proj is \[4, 64, 48\], the config implies \[4, 48, 64\]"),
    (_reshape(f"{FF}.router.weight", (3, 64)), rf"{FF}.router.weight is \[3, 64\], the config implies \[4, 64\]"),
    (_drop(f"{FF}.shared_expert.up_proj.weight"), f"the weights have no {FF}.shared_expert.up_proj.weight"),
    (_reshape("model.layers.2.self_attn.k_proj.weight", (64, 64)),
     r"model.layers.2.self_attn.k_proj.weight is \[64, 64\], the config implies \[32, 64\]"),
    (_drop("lm_head.weight"), "the weights have no lm_head.weight"),
    (lambda t: t.__setitem__(f"{FF}.experts.down_proj", t[f"{FF}.experts.down_proj"].astype(np.int8)),
     f"tensor {FF}.experts.down_proj is I8; Llama 4 builds take F32, F16, BF16"),
    (lambda t: t.__setitem__("model.layers.4.input_layernorm.weight", np.ones(64, np.float32)),
     "num_hidden_layers is 4, the weights hold 5 layers"),
], ids=["no-gate-up", "no-down", "gate-up-shape", "down-transposed", "router-experts", "no-shared-expert",
        "attention-shape", "no-lm-head", "quantized-dtype", "extra-layer"])
def test_malformed_weights_name_the_tensor_and_both_shapes(causal, edit, message):
    _edit_weights(causal, edit)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.inspect(causal)


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(moe_layers=[1, 3]), r"layer 0 has experts \(model.layers.0.feed_forward.router.weight\), "
                                            r"but moe_layers \[1, 3\] does not name it"),
    (lambda c: c.update(interleave_moe_layer_step=2, moe_layers=None), r"layer 0 has experts .*, but moe_layers \[1, 3\] does not"),
    (lambda c: c.update(num_local_experts=8), r"router.weight is \[4, 64\], the config implies \[8, 64\]"),
    (lambda c: c.update(intermediate_size=64), r"gate_up_proj is \[4, 64, 96\], the config implies \[4, 64, 128\]"),
    (lambda c: c.update(num_hidden_layers=3, moe_layers=[0, 1, 2]), "num_hidden_layers is 3, the weights hold 4 layers"),
    (lambda c: c.update(num_experts_per_tok=5), "num_experts_per_tok 5 exceeds num_local_experts 4"),
    (lambda c: c.update(hidden_act="gelu"), "hidden_act gelu is not supported"),
], ids=["moe-layers", "interleave", "experts", "intermediate", "layers", "top-k", "activation"])
def test_config_that_disagrees_with_the_weights(causal, edit, message):
    _edit_config(causal, edit)
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.inspect(causal)


def test_conditional_checks_the_text_tower_under_language_model(conditional):
    _edit_weights(conditional, _reshape("language_model.model.layers.0.feed_forward.experts.gate_up_proj", (4, 64, 8)))
    with pytest.raises(ckpt.CheckpointError,
                       match=r"language_model.model.layers.0.feed_forward.experts.gate_up_proj is \[4, 64, 8\]"):
        ckpt.inspect(conditional)


def test_conditional_vision_tower_is_neither_checked_nor_counted(conditional):
    before = ckpt.inspect(conditional).parameters
    _edit_weights(conditional, _reshape("vision_model.class_embedding", (3,)))
    assert ckpt.inspect(conditional).parameters == before


def test_a_relabelled_llama_checkpoint_is_refused_naming_llama4(scratch_checkpoint):
    _edit_config(scratch_checkpoint, lambda c: c.update(architectures=["Llama4ForCausalLM"], model_type="llama4_text"))
    with pytest.raises(ckpt.CheckpointError, match="^Llama4ForCausalLM checkpoint "):
        ckpt.inspect(scratch_checkpoint)
    _edit_config(scratch_checkpoint, lambda c: c.update(attention_chunk_size=8192))
    with pytest.raises(ckpt.CheckpointError, match="not a Llama 4 checkpoint"):
        ckpt.inspect(scratch_checkpoint)


def test_reference_is_transformers_text_model_of_either_architecture(llama4_dirs, tmp_path):
    import torch
    from transformers import Llama4ForCausalLM, Llama4ForConditionalGeneration

    from compiler_service.quality import reference_logits
    from compiler_service.torch_reference import load_llama4_text, load_tokenizer

    prompt = "def main(argv):\n    for name in sorted(os.listdir(argv[1])):\n        print(name)"
    ids = load_tokenizer(llama4_dirs["causal"])(prompt, return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 1 and ids.shape[1] > 3 * 8  # BOS as the tokenizer adds it; several chunks
    for kind, cls in (("causal", Llama4ForCausalLM), ("conditional", Llama4ForConditionalGeneration)):
        fixed = Path(shutil.copytree(llama4_dirs[kind], tmp_path / kind))
        _edit_config(fixed, lambda c: (c.get("text_config", c)).update(attn_temperature_tuning=True))
        plain = cls.from_pretrained(fixed).eval()
        plain = plain.language_model if kind == "conditional" else plain
        with torch.inference_mode():
            want = plain(ids).logits
            assert torch.equal(load_llama4_text(llama4_dirs[kind])(ids).logits, want)
        layerwise = reference_logits(llama4_dirs[kind], [ids[0].tolist()])  # one layer's weights at a time
        assert np.array_equal(layerwise[0], want[0].numpy())


def test_make_llama4_is_deterministic_and_reused(llama4_dirs, tmp_path):
    from llamaship.llama4_model import make_llama4

    again = make_llama4(tmp_path / "again", **SPEC)
    assert (again / "model.safetensors").read_bytes() == (llama4_dirs["causal"] / "model.safetensors").read_bytes()
    stamp = (again / "model.safetensors").stat().st_mtime_ns
    assert make_llama4(again, **SPEC) == again and (again / "model.safetensors").stat().st_mtime_ns == stamp
    other = make_llama4(tmp_path / "other", seed=1, **SPEC)
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_streamed_checkpoints_match_transformers_layout_in_bounded_slices(tmp_path, monkeypatch):
    from safetensors import safe_open

    from llamaship import safetensors_stream
    from llamaship.llama4_model import make_llama4

    def layout(directory: Path) -> dict:
        out = {}
        for f in sorted(directory.glob("*.safetensors")):
            with safe_open(str(f), "pt") as h:
                out.update((k, (h.get_slice(k).get_shape(), h.get_slice(k).get_dtype())) for k in h.keys())
        return out

    written: list[int] = []
    slices = safetensors_stream._slices
    monkeypatch.setattr(safetensors_stream, "SLICE_BYTES", 4096)
    monkeypatch.setattr(safetensors_stream, "_slices", lambda *a: (written.append(len(c)) or c for c in slices(*a)))
    for conditional in (False, True):
        saved = make_llama4(tmp_path / f"saved{conditional}", conditional=conditional, dtype="bfloat16", **SPEC)
        streamed = make_llama4(tmp_path / f"streamed{conditional}", conditional=conditional, dtype="bfloat16",
                               streamed=True, max_shard_size="100KB", **SPEC)
        assert layout(streamed) == layout(saved) and len(list(streamed.glob("model-*-of-*.safetensors"))) > 3
        assert json.loads((streamed / "config.json").read_text()) == json.loads((saved / "config.json").read_text())
        index = json.loads((streamed / "model.safetensors.index.json").read_text())
        assert set(index["weight_map"]) == set(layout(saved))
        assert ckpt.inspect(streamed).parameters == ckpt.inspect(saved).parameters
    assert max(written) <= 2 * 4096  # one slice (bfloat16 of at most 4 KiB of float32) at a time
    again = make_llama4(tmp_path / "again", conditional=True, dtype="bfloat16", streamed=True, max_shard_size="100KB",
                        **SPEC)
    assert all((again / f.name).read_bytes() == f.read_bytes() for f in (tmp_path / "streamedTrue").glob("*.safetensors"))
