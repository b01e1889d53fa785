"""Bad input gets a clear error with the right status code and changes nothing."""

from __future__ import annotations

import json
import math
import shutil
import sysconfig
from pathlib import Path

import grpc
import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

pytestmark = pytest.mark.integration
PROMPT = "import os\n"


def _status(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


@pytest.mark.parametrize(
    "kwargs, code, field",
    [
        (dict(model="no-such-model", prompt=PROMPT, max_tokens=4), grpc.StatusCode.NOT_FOUND, "no-such-model"),
        (dict(model="demo", prompt="", max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "prompt"),
        (dict(model="demo", prompt=PROMPT, max_tokens=0), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (dict(model="demo", prompt=PROMPT, max_tokens=-3), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (dict(model="demo", prompt=PROMPT, max_tokens=5000), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens"),
        (dict(model="demo", prompt=PROMPT, max_tokens=4, temperature=-0.5), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(model="demo", prompt=PROMPT, max_tokens=4, temperature=math.nan), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(model="demo", prompt=PROMPT, max_tokens=4, temperature=math.inf), grpc.StatusCode.INVALID_ARGUMENT, "temperature"),
        (dict(model="demo", prompt=PROMPT, max_tokens=4, top_p=0.0), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (dict(model="demo", prompt=PROMPT, max_tokens=4, top_p=1.5), grpc.StatusCode.INVALID_ARGUMENT, "top_p"),
        (dict(model="demo", prompt=PROMPT, max_tokens=4, top_k=-1), grpc.StatusCode.INVALID_ARGUMENT, "top_k"),
        (dict(model="", prompt=PROMPT, max_tokens=4), grpc.StatusCode.INVALID_ARGUMENT, "model"),
    ],
)
def test_generate_rejects(client, fp32_build, kwargs, code, field):
    got, details = _status(lambda: client.generate(**kwargs))
    assert got == code
    assert field in details
    assert "Traceback" not in details
    assert client.generate("demo", PROMPT, 4).completion_tokens == 4


def test_prompt_longer_than_context_is_rejected(client, fp32_build):
    text = (Path(sysconfig.get_paths()["stdlib"]) / "argparse.py").read_text()
    got, details = _status(lambda: client.generate("demo", text, 4))
    assert got == grpc.StatusCode.INVALID_ARGUMENT
    assert "prompt" in details and "context length 4096" in details
    assert client.generate("demo", PROMPT, 4).completion_tokens == 4


def test_unknown_recipe_is_rejected_at_submit(client, demo_model):
    got, details = _status(lambda: client.submit_compile(str(demo_model), "x", "int3"))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and "int3" in details


def test_cancel_of_unknown_request_is_idempotent(client):
    from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2

    for _ in range(2):
        assert not client.stub.CancelGeneration(gateway_pb2.CancelGenerationRequest(request_id="nope")).found


def _truncate_weights(ckpt: Path) -> None:
    f = ckpt / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])


def _llama4(ckpt: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["architectures"] = ["Llama4ForCausalLM"]
    cfg["model_type"] = "llama4_text"
    (ckpt / "config.json").write_text(json.dumps(cfg))


def _not_a_checkpoint(ckpt: Path) -> None:
    for f in ckpt.iterdir():
        f.unlink()
    (ckpt / "notes.txt").write_text("hello")


def _pickle_only(ckpt: Path) -> None:
    (ckpt / "model.safetensors").rename(ckpt / "pytorch_model.bin")


@pytest.mark.parametrize(
    "damage, reason",
    [
        (None, "does not exist"),
        (_not_a_checkpoint, "no config.json"),
        (_truncate_weights, "corrupt safetensors file model.safetensors"),
        (_llama4, "Llama4ForCausalLM"),
        (_pickle_only, "only pickle weights (.bin/.pt); Llamaship accepts safetensors unless the request sets allow_pickle"),
    ],
    ids=["missing-path", "not-a-checkpoint", "corrupt-safetensors", "llama4-architecture", "pickle-weights"],
)
def test_compile_failure_says_why_and_publishes_nothing(client, stack, scratch_checkpoint, damage, reason):
    path = scratch_checkpoint
    if damage is None:
        shutil.rmtree(path)
    else:
        damage(path)
    builds_before = sorted(p.name for p in (stack.cfg.store / "builds").iterdir())
    name = f"broken-{path.parent.name[-12:]}".replace("_", "-")
    job = client.compile(str(path), name, "fp32")
    assert job.state == compiler_pb2.JOB_STATE_FAILED
    assert reason in job.message
    assert name not in {m.name for m in client.models()}
    assert sorted(p.name for p in (stack.cfg.store / "builds").iterdir()) == builds_before
    assert client.generate("demo", PROMPT, 4).completion_tokens == 4


def test_pickle_weights_compile_only_when_allowed(client, scratch_checkpoint, fp32_build):
    import torch
    from safetensors.torch import load_file

    weights = scratch_checkpoint / "model.safetensors"
    torch.save(load_file(weights), scratch_checkpoint / "pytorch_model.bin")
    weights.unlink()
    refused = client.compile(str(scratch_checkpoint), "pickled", "fp32")
    assert refused.state == compiler_pb2.JOB_STATE_FAILED and "allow_pickle" in refused.message
    job = client.compile(str(scratch_checkpoint), "pickled", "fp32", allow_pickle=True)
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    assert client.build(job.build_id).quality.passed  # the same model: it matches the reference
    assert client.generate("pickled", PROMPT, 16).token_ids == client.generate("demo", PROMPT, 16).token_ids


def test_request_ids_are_single_use(client, fp32_build):
    assert client.generate("demo", PROMPT, 2, request_id="dup-once").completion_tokens == 2
    got, details = _status(lambda: client.generate("demo", PROMPT, 2, request_id="dup-once"))
    assert got == grpc.StatusCode.ALREADY_EXISTS and "dup-once" in details


def test_cancel_generation_ends_the_stream_with_cancelled(client, fp32_build):
    import time

    from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2

    stream = client.stream("demo", "def main(argv):\n    ", 4000, request_id="to-cancel")
    next(stream)
    assert client.stub.CancelGeneration(gateway_pb2.CancelGenerationRequest(request_id="to-cancel")).found
    t0 = time.time()
    with pytest.raises(grpc.RpcError) as info:
        for _ in stream:
            pass
    assert info.value.code() == grpc.StatusCode.CANCELLED
    assert time.time() - t0 < 10
    assert client.generate("demo", PROMPT, 4).completion_tokens == 4


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(seed=2**31, temperature=0.8), "seed"),
        (dict(stop=["x" * 257]), "stop"),
        (dict(model="x" * 5_000_000), "model"),
        (dict(model="dеmo"), "model"),  # Cyrillic е
        (dict(model="ｄｅｍｏ"), "model"),  # full-width
        (dict(model=".."), "model"),
        (dict(request_id="r" * 10_000_000), "request_id"),
    ],
    ids=["seed-2^31", "long-stop", "5MB-name", "cyrillic-name", "fullwidth-name", "dotdot-name", "10MB-id"],
)
def test_field_limits_answer_invalid_argument_briefly(client, fp32_build, kwargs, field):
    args = dict(model="demo", prompt=PROMPT, max_tokens=4)
    args.update(kwargs)
    got, details = _status(lambda: client.generate(**args))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and details.startswith(field) and len(details) < 300


def test_cancel_and_sampling_fields_are_bounded(client):
    from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2

    got, details = _status(lambda: client.stub.CancelGeneration(
        gateway_pb2.CancelGenerationRequest(request_id="x" * 10_000_000)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300
    got, details = _status(lambda: client.stub.GetPromptSampling(gateway_pb2.GetPromptSamplingRequest(model="x" * 100_000)))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300
    got, details = _status(lambda: client.set_model_access("x" * 100_000, ["*"]))
    assert got == grpc.StatusCode.INVALID_ARGUMENT and len(details) < 300


def test_upload_errors_keep_their_status(client):
    got, details = _status(lambda: client.stub.UploadFiles(iter([compiler_pb2.UploadChunk(
        upload_id="no-such-upload", path="a", offset=0, data=b"x")])))
    assert got == grpc.StatusCode.NOT_FOUND and "class" not in details


def test_corrupt_protobuf_is_invalid_argument_on_every_service(stack):
    corrupt = b"\xff\xff\xff\xff"
    calls = [(stack.gateway_address, "/llamaship.gateway.v1.Gateway/ListModels", "unary"),
             (stack.gateway_address, "/llamaship.gateway.v1.Gateway/Generate", "server-stream"),
             (stack.gateway_address, "/llamaship.gateway.v1.Gateway/UploadFiles", "client-stream"),
             (stack.procs["compiler"].address, "/llamaship.compiler.v1.Compiler/GetBuild", "unary"),
             (stack.procs["compiler"].address, "/llamaship.compiler.v1.Compiler/UploadFiles", "client-stream"),
             (stack.procs["serving-cpu-0"].address, "/llamaship.serving.v1.Serving/GetStatus", "unary")]
    for address, method, kind in calls:
        with grpc.insecure_channel(address) as channel:
            if kind == "unary":
                call = lambda: channel.unary_unary(method)(corrupt, timeout=10)  # noqa: E731
            elif kind == "server-stream":
                call = lambda: list(channel.unary_stream(method)(corrupt, timeout=10))  # noqa: E731
            else:
                call = lambda: channel.stream_unary(method)(iter([corrupt]), timeout=10)  # noqa: E731
            got, details = _status(call)
        assert got == grpc.StatusCode.INVALID_ARGUMENT, (method, got, details)
        assert "class" not in details and "DecodeError" not in details, details
