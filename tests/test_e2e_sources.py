"""Checkpoint sources through the gateway: an upload interrupted mid-file and resumed, compiled
with the prompt set it carries; a hub id without network; requests naming no or two sources."""

from __future__ import annotations

import hashlib
import json
import shutil
import time

import grpc
import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

pytestmark = pytest.mark.integration


def test_upload_resumed_after_a_dropped_stream_then_compiled(client, demo_model, fp32_build, tmp_path):
    src = tmp_path / "ckpt"
    shutil.copytree(demo_model, src)
    prompts = ["def add(a, b):\n    return a + b\n", "class Stack:\n    def push(self, x):\n"]
    (src / "eval_prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    files = sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith("."))
    declared = [compiler_pb2.UploadFile(path=str(p.relative_to(src)), size=p.stat().st_size,
                                        sha256=hashlib.sha256(p.read_bytes()).hexdigest()) for p in files]
    state = client.stub.CreateUpload(compiler_pb2.CreateUploadRequest(files=declared))
    big = max(files, key=lambda p: p.stat().st_size)
    data = big.read_bytes()

    def dropped():  # half the weights, then the connection goes (once some bytes are stored)
        for off in range(0, len(data) // 2, 1 << 18):
            yield compiler_pb2.UploadChunk(upload_id=state.upload_id, path=big.name, offset=off,
                                           data=data[off:off + (1 << 18)])
        deadline = time.time() + 20
        while client.stub.GetUpload(compiler_pb2.GetUploadRequest(upload_id=state.upload_id)).received_bytes == 0:
            assert time.time() < deadline
            time.sleep(0.05)
        raise ConnectionError("network dropped")

    with pytest.raises(grpc.RpcError):
        client.stub.UploadFiles(dropped())
    part = client.stub.GetUpload(compiler_pb2.GetUploadRequest(upload_id=state.upload_id))
    assert 0 < part.received_bytes < part.total_bytes and not part.complete
    with pytest.raises(grpc.RpcError) as early:  # an incomplete upload cannot be compiled
        client.submit_compile("", "uploaded", "fp32", upload_id=state.upload_id)
    assert early.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "incomplete" in early.value.details()

    done = client.upload(str(src), upload_id=state.upload_id)
    assert done.complete and done.received_bytes == done.total_bytes
    job = client.compile("", "uploaded", "fp32", upload_id=state.upload_id)
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    assert job.build_id == fp32_build  # same content, same build, wherever it came from
    q = client.build(job.build_id).quality
    assert q.prompt_source == "upload" and q.prompts == 2 and q.passed
    assert client.generate("uploaded", "import os\n", 8).completion_tokens == 8


def test_hub_id_without_network_fails_clearly(client):
    job = client.compile("", "from-hub", "int8", hub_id="meta-llama/Llama-3.2-1B@main")
    assert job.state == compiler_pb2.JOB_STATE_FAILED
    assert "no network access" in job.message and "upload" in job.message


@pytest.mark.parametrize("kwargs, message", [
    ({}, "exactly one of"),
    ({"checkpoint": "/x", "hub_id": "a/b"}, "exactly one of"),
    ({"hub_id": "not a hub id"}, "hub_id"),
    ({"upload_id": "up-" + "0" * 24}, "no upload"),
])
def test_bad_sources_are_refused_at_submit(client, kwargs, message):
    checkpoint = kwargs.pop("checkpoint", "")
    with pytest.raises(grpc.RpcError) as info:
        client.submit_compile(checkpoint, "bad-source", "fp32", **kwargs)
    assert info.value.code() in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND)
    assert message in info.value.details()


def test_hub_id_served_from_the_compilers_hub_cache(client, stack, demo_model, fp32_build):
    """With no network, a hub checkpoint already in the compiler's cache (the store's .hub, in the
    Hugging Face cache layout) compiles; the same content gives the same build."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = stack.cfg.store / ".hub" / "models--llamaship-test--demo"
    shutil.copytree(demo_model, repo / "snapshots" / commit, ignore=shutil.ignore_patterns(".*"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    job = client.compile("", "from-hub-cache", "fp32", hub_id="llamaship-test/demo")
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
    assert job.build_id == fp32_build
