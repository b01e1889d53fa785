"""Load through several gateways and replicas: 32 concurrent streams, nothing lost, every greedy
stream equal to the reference, both replicas used; builds published again and again under load."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request

import grpc
import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

pytestmark = pytest.mark.integration
STREAMS = 32
PROMPTS = ["def main(argv):\n    ", "class Parser:\n    ", "import os\n", "for i in range(10):\n    "]


@pytest.fixture(scope="module")
def load_stack(tmp_path_factory, demo_model):
    from llamaship.stack import Stack, StackConfig

    base = tmp_path_factory.mktemp("load")
    cfg = StackConfig(store=base / "store", log_dir=base / "logs", serving_ports=[0, 0], gateways=2,
                      slots=16, metrics=True)
    with Stack(cfg) as stack:
        yield stack


def _served_per_replica(stack) -> dict[str, float]:
    served = {}
    for name in [n for n in stack.procs if n.startswith("serving")]:
        text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports[name]}/metrics", timeout=5).read().decode()
        served[name] = sum(float(line.split()[-1]) for line in text.splitlines()
                           if line.startswith("llamaship_serving_requests_total{"))
    return served


def test_32_streams_through_2_gateways_and_2_replicas(load_stack, demo_model):
    from llamaship.client import GatewayClient

    stack = load_stack
    assert len(stack.gateway_addresses) == 2
    with GatewayClient(stack.gateway_addresses[0]) as c:
        assert c.compile(str(demo_model), "demo", "fp32").build_id
        reference = {p: c.generate("demo", p, 64).token_ids for p in PROMPTS}
    results: list = [None] * STREAMS
    errors: list = []

    def one(i: int) -> None:
        try:
            with GatewayClient(stack.gateway_addresses[i % 2]) as client:
                results[i] = client.generate("demo", PROMPTS[i % len(PROMPTS)], 64, timeout=120)
        except grpc.RpcError as exc:  # pragma: no cover - reported below
            errors.append(f"{i}: {exc.code().name} {exc.details()}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(STREAMS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors
    assert all(r is not None for r in results), "a stream was lost"
    for i, r in enumerate(results):
        assert r.token_ids == reference[PROMPTS[i % len(PROMPTS)]]
        assert r.completion_tokens == 64
    served = _served_per_replica(stack)
    assert all(v > 0 for v in served.values()), f"a replica took no work: {served}"
    assert sum(served.values()) >= STREAMS


def _reference(store, build_id: str, prompts: list[str], max_tokens: int) -> dict[str, list[int]]:
    """Greedy tokens of `build_id` straight from an engine, outside the stack."""
    from serving_service.engine import Engine
    from shared.generation import GenRequest
    from shared.store import BuildStore

    async def run() -> dict[str, list[int]]:
        engine = Engine(BuildStore(store), "cpu", slots=1)
        await engine.load("m", build_id)
        out = {}
        for i, p in enumerate(prompts):
            out[p] = [t async for c in engine.stream(GenRequest(f"ref{i}", "m", p, max_tokens)) for t in c.token_ids]
        engine.close()
        return out

    return asyncio.run(run())


def test_builds_published_repeatedly_under_load(load_stack, demo_model):
    """Streams keep arriving through both gateways while three builds are published in turn:
    none fails or is cut short, each runs wholly on one build and equals that build's reference."""
    from llamaship.client import GatewayClient

    stack = load_stack
    with GatewayClient(stack.gateway_addresses[0]) as c:
        first = c.compile(str(demo_model), "swap", "fp32")
    stop = threading.Event()
    results: list = []
    errors: list = []
    lock = threading.Lock()

    def client_loop(i: int) -> None:
        with GatewayClient(stack.gateway_addresses[i % 2]) as client:
            n = 0
            while not stop.is_set():
                prompt = PROMPTS[(i + n) % len(PROMPTS)]
                n += 1
                try:
                    chunks = list(client.stream("swap", prompt, 96, timeout=120))
                except grpc.RpcError as exc:
                    with lock:
                        errors.append(f"{exc.code().name}: {exc.details()}")
                    continue
                with lock:
                    results.append((prompt, chunks))

    threads = [threading.Thread(target=client_loop, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    published = [first.build_id]
    try:
        with GatewayClient(stack.gateway_addresses[1]) as c:
            for recipe in ("hybrid-int8", "int8", "fp32"):
                time.sleep(1.0)
                job = c.compile(str(demo_model), "swap", recipe)
                assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED, job.message
                published.append(job.build_id)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join(180)
    assert not errors, errors[:5]
    by_build: dict[str, list] = {}
    for prompt, chunks in results:
        builds = {ch.build_id for ch in chunks if ch.build_id}
        assert len(builds) == 1, f"a stream changed builds midway: {builds}"
        assert chunks[-1].finish_reason, "a stream ended without its final chunk"
        by_build.setdefault(builds.pop(), []).append((prompt, [t for ch in chunks for t in ch.token_ids]))
    assert len(by_build) >= 3, f"streams ran on too few builds to show the swaps: {list(by_build)}"
    assert set(by_build) <= set(published)
    for build_id, runs in by_build.items():
        reference = _reference(stack.cfg.store, build_id, PROMPTS, 96)
        for prompt, ids in runs:
            assert ids == reference[prompt], f"build {build_id}: stream differs from the reference"
    print(f"\n{len(results)} streams over {len(by_build)} builds while publishing {published[1:]}; 0 failed")
