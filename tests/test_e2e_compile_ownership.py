"""Compile-side objects belong to a tenant: jobs, uploads, builds and model names of one tenant are
invisible (NOT_FOUND) or closed (PERMISSION_DENIED) to another; checkpoint paths must lie in the
compiler's checkpoint roots. Calls go straight to the compiler with the identity metadata a
gateway attaches (shared.tenancy)."""

from __future__ import annotations

import hashlib
import os

import grpc
import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2 as pb
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2_grpc as pb_grpc
from shared.tenancy import Caller

pytestmark = pytest.mark.integration

ALICE, BOB, ADMIN = Caller("alice", False).metadata(), Caller("bob", False).metadata(), Caller("ops", True).metadata()


@pytest.fixture(scope="module")
def compiler(tmp_path_factory, demo_model):
    from llamaship.stack import Stack, StackConfig

    base = tmp_path_factory.mktemp("ownership")
    for d in ("roots/other", "logs", "store"):
        (base / d).mkdir(parents=True)
    roots = f"{demo_model.parent},{base / 'roots'}"
    stack = Stack(StackConfig(store=base / "store", log_dir=base / "logs",
                              env={"LLAMASHIP_CHECKPOINT_ROOTS": roots}))
    try:
        stack.start_redis()
        stack.start_service("compiler", "compiler_service", 0, 60)
        channel = grpc.insecure_channel(stack.procs["compiler"].address)
        yield pb_grpc.CompilerStub(channel), stack, base
        channel.close()
    finally:
        stack.stop()


def _wait(stub, job_id, md):
    final = None
    for event in stub.WatchCompile(pb.WatchCompileRequest(job_id=job_id), metadata=md, timeout=600):
        final = event.job
    return final


def _code(call):
    with pytest.raises(grpc.RpcError) as info:
        call()
    return info.value.code(), info.value.details()


@pytest.fixture(scope="module")
def alices_build(compiler, demo_model):
    stub, _, _ = compiler
    # a relative path resolves against the roots
    job = stub.SubmitCompile(pb.CompileRequest(checkpoint_path=demo_model.name, model_name="alice-demo",
                                               recipe="fp32"), metadata=ALICE)
    assert job.tenant == "alice"
    final = _wait(stub, job.job_id, ALICE)
    assert final.state == pb.JOB_STATE_SUCCEEDED, final.message
    return job.job_id, final.build_id


def test_another_tenants_jobs_names_and_builds(compiler, alices_build, demo_model):
    stub, stack, _ = compiler
    job_id, build_id = alices_build
    for call in (lambda: stub.GetCompile(pb.GetCompileRequest(job_id=job_id), metadata=BOB),
                 lambda: stub.CancelCompile(pb.CancelCompileRequest(job_id=job_id), metadata=BOB),
                 lambda: list(stub.WatchCompile(pb.WatchCompileRequest(job_id=job_id), metadata=BOB)),
                 lambda: stub.GetBuild(pb.GetBuildRequest(build_id=build_id), metadata=BOB)):
        code, details = _code(call)
        assert code == grpc.StatusCode.NOT_FOUND and str(stack.cfg.store) not in details
    code, details = _code(lambda: stub.GetBuild(pb.GetBuildRequest(build_id="0" * 20), metadata=ALICE))
    assert code == grpc.StatusCode.NOT_FOUND and str(stack.cfg.store.resolve()) not in details
    assert stub.GetCompile(pb.GetCompileRequest(job_id=job_id), metadata=ADMIN).state == pb.JOB_STATE_SUCCEEDED
    assert stub.GetBuild(pb.GetBuildRequest(build_id=build_id), metadata=ALICE).build_id == build_id
    # bob may not publish under alice's name, not even with force_publish
    code, _ = _code(lambda: stub.SubmitCompile(pb.CompileRequest(
        checkpoint_path=str(demo_model), model_name="alice-demo", recipe="fp32",
        quality=pb.QualityGate(force_publish=True)), metadata=BOB))
    assert code == grpc.StatusCode.PERMISSION_DENIED
    # the same checkpoint under bob's own name reuses the build, which then lists both tenants
    job = stub.SubmitCompile(pb.CompileRequest(checkpoint_path=str(demo_model), model_name="bob-demo",
                                               recipe="fp32"), metadata=BOB)
    final = _wait(stub, job.job_id, BOB)
    assert final.state == pb.JOB_STATE_SUCCEEDED and final.reused and final.build_id == build_id, final.message
    info = stub.GetBuild(pb.GetBuildRequest(build_id=build_id), metadata=BOB)
    assert '"tenants": [\n    "alice",\n    "bob"\n  ]' in info.manifest_json
    assert str(stack.cfg.store) not in info.manifest_json


def test_another_tenants_uploads_do_not_exist_for_it(compiler):
    stub, _, _ = compiler
    data = b"{}"
    up = stub.CreateUpload(pb.CreateUploadRequest(files=[pb.UploadFile(
        path="config.json", size=len(data), sha256=hashlib.sha256(data).hexdigest())]), metadata=ALICE)
    assert up.expires_at > 0
    for call in (lambda: stub.GetUpload(pb.GetUploadRequest(upload_id=up.upload_id), metadata=BOB),
                 lambda: stub.UploadFiles(iter([pb.UploadChunk(upload_id=up.upload_id, path="config.json",
                                                               data=data)]), metadata=BOB),
                 lambda: stub.SubmitCompile(pb.CompileRequest(upload_id=up.upload_id, model_name="bob-up",
                                                              recipe="fp32"), metadata=BOB)):
        code, _ = _code(call)
        assert code == grpc.StatusCode.NOT_FOUND
    assert stub.GetUpload(pb.GetUploadRequest(upload_id=up.upload_id), metadata=ALICE).received_bytes == 0
    code, _ = _code(lambda: stub.CreateUpload(pb.CreateUploadRequest(files=[pb.UploadFile(
        path="a\0b", size=1, sha256="0" * 64)]), metadata=ALICE))
    assert code == grpc.StatusCode.INVALID_ARGUMENT


def test_checkpoint_paths_outside_the_roots_are_refused_alike(compiler, demo_model):
    stub, _, base = compiler
    os.symlink("/etc", base / "roots" / "escape")
    details = set()
    for path in ("/etc", "/no/such/dir", "../../../../etc", "other/../../../etc", str(base / "roots" / "escape"),
                 str(base / "store")):
        code, message = _code(lambda: stub.SubmitCompile(pb.CompileRequest(
            checkpoint_path=path, model_name="rooted", recipe="fp32"), metadata=ALICE))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "checkpoint roots" in message, path
        details.add(message.replace(repr(path), "<path>"))
    assert len(details) == 1  # existing or not, the same answer


def test_request_fields_are_bounded(compiler, demo_model):
    stub, _, _ = compiler
    for req in (pb.CompileRequest(checkpoint_path=str(demo_model), model_name="x" * 65, recipe="fp32"),
                pb.CompileRequest(checkpoint_path=str(demo_model), model_name="p", recipe="fp32",
                                  quality=pb.QualityGate(eval_prompts=["x" * 20_000])),
                pb.CompileRequest(checkpoint_path=str(demo_model), model_name="p", recipe="fp32",
                                  quality=pb.QualityGate(eval_prompts=["x"] * 300)),
                pb.CompileRequest(checkpoint_path="x" * 5000, model_name="p", recipe="fp32"),
                pb.CompileRequest(checkpoint_path=str(demo_model), model_name="p", recipe="fp32", max_batch=100_000)):
        code, _ = _code(lambda: stub.SubmitCompile(req, metadata=ALICE))
        assert code == grpc.StatusCode.INVALID_ARGUMENT
