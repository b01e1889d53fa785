import json
import os
import struct
import threading

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
    with pytest.raises(ckpt.CheckpointError, match="'GPT2LMHeadModel' is not supported"):
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


def test_a_fifo_as_weights_is_refused_not_waited_on(scratch_checkpoint):
    weights = scratch_checkpoint / "model.safetensors"
    weights.unlink()
    os.mkfifo(weights)
    outcome: list = []

    def inspect():
        try:
            ckpt.inspect(scratch_checkpoint)
        except ckpt.CheckpointError as exc:
            outcome.append(str(exc))

    t = threading.Thread(target=inspect, daemon=True)
    t.start()
    t.join(5)
    if t.is_alive():  # the old code blocks in open(): release it before failing
        os.close(os.open(weights, os.O_WRONLY | os.O_NONBLOCK))
        t.join(5)
        pytest.fail("inspect blocked on a FIFO")
    assert outcome and "not a regular file" in outcome[0]


def test_a_huge_safetensors_header_is_refused_before_it_is_read(scratch_checkpoint):
    weights = scratch_checkpoint / "model.safetensors"
    n = 1 << 30  # a 1 GiB header in a sparse file: reading it would cost the compiler 1 GiB
    with open(weights, "wb") as f:
        f.write(struct.pack("<Q", n))
        f.truncate(8 + n + 16)
    with pytest.raises(ckpt.CheckpointError, match="over the 16 MiB limit"):
        ckpt.inspect(scratch_checkpoint)


def test_a_deeply_nested_config_is_an_invalid_checkpoint(scratch_checkpoint):
    (scratch_checkpoint / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ckpt.CheckpointError, match="nests too deeply"):
        ckpt.inspect(scratch_checkpoint)
    (scratch_checkpoint / "config.json").write_text(" " * (2 << 20) + "{}")
    with pytest.raises(ckpt.CheckpointError, match="larger than"):
        ckpt.inspect(scratch_checkpoint)


def test_messages_name_the_checkpoint_as_given_not_its_server_path(tmp_path):
    with pytest.raises(ckpt.CheckpointError) as info:
        ckpt.inspect(tmp_path, label="upload up-1")
    assert str(tmp_path) not in str(info.value) and "upload up-1" in str(info.value)


def test_hashing_stops_when_told(demo_model):
    stop = threading.Event()
    stop.set()
    with pytest.raises(ckpt.CheckpointError, match="stopped"):
        ckpt.content_hash(demo_model, stop=stop)
