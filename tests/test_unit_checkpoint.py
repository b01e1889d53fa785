import json

import pytest

from compiler_service import checkpoint as ckpt


def test_demo_checkpoint_is_accepted_and_hash_is_stable(demo_model, scratch_checkpoint):
    info = ckpt.inspect(demo_model)
    assert info.architecture == "LlamaForCausalLM" and info.num_layers == 4
    assert 1_000_000 < info.parameters < 10_000_000
    assert ckpt.content_hash(demo_model) == ckpt.content_hash(scratch_checkpoint)
    (scratch_checkpoint / "extra.txt").write_text("x")
    assert ckpt.content_hash(demo_model) != ckpt.content_hash(scratch_checkpoint)


def test_bad_header_and_truncation(scratch_checkpoint):
    f = scratch_checkpoint / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:-1])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.inspect(scratch_checkpoint)
    f.write_bytes(b"\xff" * 8 + data[8:])
    with pytest.raises(ckpt.CheckpointError, match="header length"):
        ckpt.inspect(scratch_checkpoint)


def test_missing_tokenizer_and_unknown_architecture(scratch_checkpoint):
    cfg = json.loads((scratch_checkpoint / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (scratch_checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match="GPT2LMHeadModel is not supported"):
        ckpt.inspect(scratch_checkpoint)
    cfg["architectures"] = ["LlamaForCausalLM"]
    (scratch_checkpoint / "config.json").write_text(json.dumps(cfg))
    (scratch_checkpoint / "tokenizer.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="tokenizer.json"):
        ckpt.inspect(scratch_checkpoint)


@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", 128, "embed_tokens.weight is \\[2048, 256\\], the config implies \\[2048, 128\\]"),
    ("num_key_value_heads", 4, "k_proj.weight is \\[64, 256\\], the config implies \\[128, 256\\]"),
    ("intermediate_size", 999, "gate_proj.weight"),
    ("num_hidden_layers", 6, "num_hidden_layers is 6, the weights hold 4 layers"),
    ("vocab_size", 32000, "embed_tokens.weight"),
])
def test_config_and_weights_that_disagree(scratch_checkpoint, field, value, message):
    cfg = json.loads((scratch_checkpoint / "config.json").read_text())
    cfg[field] = value
    (scratch_checkpoint / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ckpt.CheckpointError, match=message):
        ckpt.inspect(scratch_checkpoint)
