"""The hardening probe of issue #9, condensed: a stack with API keys for four tenants, tried as a
careful attacker would. Prints one row per finding with pass/FAIL and what was seen.

Usage: python scripts/probe_hardening.py [--keep DIR]   (about two minutes on 2 cores)
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.auth import create_key  # noqa: E402
from llamaship.client import GatewayClient  # noqa: E402
from llamaship.demo_model import DEFAULT_DIR, make_model  # noqa: E402
from llamaship.stack import Stack, StackConfig  # noqa: E402
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2  # noqa: E402
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2  # noqa: E402

ROWS: list[tuple[str, bool, str]] = []


def row(name: str, ok: bool, seen: str) -> None:
    ROWS.append((name, ok, seen))
    print(f"{'pass' if ok else 'FAIL'}  {name}: {seen}", flush=True)


def code_of(fn) -> tuple[grpc.StatusCode | None, str]:
    try:
        fn()
    except grpc.RpcError as exc:
        return exc.code(), (exc.details() or "")[:120]
    return None, ""


def wait_job(c: GatewayClient, job_id: str, timeout_s: float) -> compiler_pb2.CompileJob:
    deadline = time.time() + timeout_s
    job = None
    for job in c.watch_compile(job_id):
        if job.state in (compiler_pb2.JOB_STATE_SUCCEEDED, compiler_pb2.JOB_STATE_FAILED,
                         compiler_pb2.JOB_STATE_CANCELLED) or time.time() > deadline:
            break
    return job


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--keep", default="")
    args = ap.parse_args()
    base = Path(args.keep or tempfile.mkdtemp(prefix="llamaship-probe-"))
    demo = make_model(DEFAULT_DIR)
    keys = base / "keys.json"
    k = {t: create_key(keys, t, s) for t, s in
         (("alpha", ["generate", "compile"]), ("beta", ["generate", "compile"]), ("gamma", ["generate"]),
          ("ops", ["admin"]))}
    cfg = StackConfig(store=base / "store", log_dir=base / "logs", slots=4,
                      env={"LLAMASHIP_API_KEYS_FILE": str(keys)})
    with Stack(cfg) as stack:
        addr = stack.gateway_address
        a, b, g, ops = (GatewayClient(addr, api_key=k[t]) for t in ("alpha", "beta", "gamma", "ops"))
        job = a.compile(str(demo), "demo", "fp32", wait_served=False)
        assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
        ops.wait_served("demo", job.build_id)
        a.stub.SetModelAccess(gateway_pb2.ModelAccess(model="demo", readers=["gamma"]), timeout=10)

        # cross-tenant cancel
        done: dict = {}

        def long_run(rid: str) -> None:
            try:
                done[rid] = a.generate("demo", "def f(x):\n", 1500, temperature=0.8, seed=3, request_id=rid)
            except grpc.RpcError as exc:
                done[rid] = exc.code()

        t = threading.Thread(target=long_run, args=("probe-r1",))
        t.start()
        time.sleep(0.5)
        found = b.stub.CancelGeneration(gateway_pb2.CancelGenerationRequest(request_id="probe-r1"), timeout=10).found
        b.stub.CancelGeneration(gateway_pb2.CancelGenerationRequest(request_id="probe-r2"), timeout=10)
        t.join(120)
        long_run("probe-r2")
        ok = not found and all(not isinstance(done[r], grpc.StatusCode) for r in ("probe-r1", "probe-r2"))
        row("cross-tenant cancel", ok, f"found={found}, alpha's streams: "
            f"{[getattr(done[r], 'finish_reason', done[r]) for r in ('probe-r1', 'probe-r2')]}")

        # cross-tenant publish, watch, cancel, upload
        publish = code_of(lambda: b.submit_compile(str(demo), "demo", "int8"))[0]
        watch = code_of(lambda: list(b.watch_compile(job.job_id)))[0]
        cancel = code_of(lambda: b.cancel_compile(job.job_id))[0]
        up = a.stub.CreateUpload(compiler_pb2.CreateUploadRequest(files=[compiler_pb2.UploadFile(
            path="config.json", size=2, sha256="0" * 64)]), timeout=10)
        read = code_of(lambda: b.stub.GetUpload(compiler_pb2.GetUploadRequest(upload_id=up.upload_id), timeout=10))[0]
        write = code_of(lambda: b.stub.UploadFiles(iter([compiler_pb2.UploadChunk(
            upload_id=up.upload_id, path="config.json", offset=0, data=b"{}")]), timeout=10))[0]
        models = [m.name for m in b.models()]
        ok = publish == grpc.StatusCode.PERMISSION_DENIED and watch == cancel == read == write == grpc.StatusCode.NOT_FOUND \
            and "demo" not in models
        row("cross-tenant publish, watch, cancel, upload", ok,
            f"publish {publish}, watch {watch}, cancel {cancel}, upload read {read} / write {write}, beta lists {models}")

        # internals
        replicas = [len(m.replicas) for m in g.models()]
        row("ListModels internals to admin only", replicas == [0] and len(ops.models()[0].replicas) > 0,
            f"gamma sees replicas {replicas}")

        # FIFO safetensors
        fifo_dir = base / "fifo-ckpt"
        shutil.copytree(demo, fifo_dir)
        for p in fifo_dir.glob("*.safetensors"):
            p.unlink()
            os.mkfifo(p)
        t0 = time.time()
        bad = b.submit_compile(str(fifo_dir), "beta-fifo", "fp32")
        bad = wait_job(b, bad.job_id, 60)
        after = b.compile(str(demo), "beta-demo", "fp32", wait_served=False)
        row("FIFO safetensors", bad.state == compiler_pb2.JOB_STATE_FAILED and after.state == compiler_pb2.JOB_STATE_SUCCEEDED,
            f"FIFO job {compiler_pb2.JobState.Name(bad.state)} ({bad.message[:70]}), next job "
            f"{compiler_pb2.JobState.Name(after.state)} after {time.time() - t0:.1f}s")

        # 1 MB stop strings
        c, _ = code_of(lambda: a.generate("demo", "x", 4, stop=["y" * (1 << 20)]))
        row("1 MB stop strings", c == grpc.StatusCode.INVALID_ARGUMENT, str(c))

        # huge model name
        c, _ = code_of(lambda: a.submit_compile(str(demo), "m" * (1 << 20), "fp32"))
        c2, _ = code_of(lambda: a.submit_compile(str(demo), "dеmo", "fp32"))  # Cyrillic е
        row("1 MB and look-alike model names", c == c2 == grpc.StatusCode.INVALID_ARGUMENT and ops.models(),
            f"{c}, look-alike {c2}")

        # 1 TiB upload
        c, d = code_of(lambda: a.stub.CreateUpload(compiler_pb2.CreateUploadRequest(files=[compiler_pb2.UploadFile(
            path="model.safetensors", size=1 << 40, sha256="0" * 64)]), timeout=10))
        row("1 TiB upload", c in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.INVALID_ARGUMENT), f"{c}: {d}")

        # UploadFiles errors
        c, d = code_of(lambda: a.stub.UploadFiles(iter([compiler_pb2.UploadChunk(
            upload_id=up.upload_id, path="config.json", offset=5, data=b"{}")]), timeout=10))
        row("UploadFiles errors", c not in (None, grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL) and "class" not in d,
            f"{c}: {d}")

        # top_k above the vocabulary
        c, d = code_of(lambda: a.generate("demo", "x", 4, temperature=0.5, top_k=10 ** 6))
        row("top_k above the vocabulary", c == grpc.StatusCode.INVALID_ARGUMENT, f"{c}: {d}")

        # 4 MB prompt while another stream runs
        arrivals: list[float] = []

        def watcher() -> None:
            for ch in g.stream("demo", "def f(x):\n", 3000, temperature=0.8, seed=9):
                if ch.token_ids:
                    arrivals.append(time.perf_counter())

        t = threading.Thread(target=watcher)
        t.start()
        while not arrivals:
            time.sleep(0.01)
        s0 = time.perf_counter()
        c, _ = code_of(lambda: a.generate("demo", "é" * 1_000_000 + "x" * 990_000, 4))
        s1 = time.perf_counter()
        t.join(120)
        during = [x for x in arrivals if s0 <= x <= s1 + 0.5]
        gap = max((y - x for x, y in zip(during, during[1:])), default=0.0)
        row("4 MB prompt", gap < 0.5, f"{c}; the other stream's longest gap meanwhile {gap * 1000:.0f} ms")

        # one tenant holding every slot
        hogs = [threading.Thread(target=lambda: a.generate("demo", "def f(x):\n", 2500, temperature=0.8, seed=5))
                for _ in range(4)]
        for h in hogs:
            h.start()
        time.sleep(1.0)
        t0 = time.perf_counter()
        g.generate("demo", "x = ", 8)
        waited = time.perf_counter() - t0
        for h in hogs:
            h.join(300)
        row("one tenant holding every slot", waited < 2.0, f"the other tenant's 8 tokens took {waited:.2f}s")
        for c in (a, b, g, ops):
            c.close()
    if not args.keep:
        shutil.rmtree(base, ignore_errors=True)
    failed = [r for r in ROWS if not r[1]]
    print(f"\n{len(ROWS) - len(failed)}/{len(ROWS)} rows pass")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
