"""Continuous batching in a replica's decode process: sequences that arrive together decode as one
cohort, newcomers join between steps, and every greedy sequence is exactly what it is alone."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.integration
PROMPTS = ["def main(argv):\n    ", "class Parser:\n    ", "import os\n", "for i in range(10):\n    ",
           "    return self._", "if __name__ == '__main__':\n", "try:\n    ", "x = "]


def test_batched_sequences_equal_sequential_ones(stack, fp32_build):
    from serving_service.engine import Engine
    from shared.generation import GenRequest
    from shared.store import BuildStore

    async def collect(engine, rid, prompt, n):
        return [t async for c in engine.stream(GenRequest(rid, "m", prompt, n)) for t in c.token_ids]

    async def run():
        engine = Engine(BuildStore(stack.cfg.store), "cpu", slots=8)
        await engine.load("m", fp32_build)
        lengths = [64] * 6 + [40, 96]  # the last two differ too much to share the cohort's KV
        alone = [await collect(engine, f"a{i}", p, n) for i, (p, n) in enumerate(zip(PROMPTS, lengths))]
        worker = engine.builds["m"].worker
        worker.step_rows.clear()
        together = await asyncio.gather(*(collect(engine, f"t{i}", p, n)
                                          for i, (p, n) in enumerate(zip(PROMPTS, lengths))))
        widest = max(worker.step_rows)

        # a newcomer joins a busy process between steps, and a cancelled row leaves its cohort
        first = [asyncio.ensure_future(collect(engine, f"b{i}", p, 400)) for i, p in enumerate(PROMPTS[:4])]
        cancelled = engine.stream(GenRequest("gone", "m", PROMPTS[5], 400))
        await cancelled.__anext__()
        await asyncio.sleep(0.05)
        late = await collect(engine, "late", PROMPTS[4], 32)
        await cancelled.aclose()
        busy = await asyncio.gather(*first)
        single_400 = [await collect(engine, f"s{i}", p, 400) for i, p in enumerate(PROMPTS[:4])]
        engine.close()
        return alone, together, widest, late, busy, single_400, engine.active

    alone, together, widest, late, busy, single_400, active = asyncio.run(run())
    assert widest >= 4, f"no batching: widest decode step advanced {widest} sequences"
    assert together == alone
    assert late == alone[4][:32]
    assert busy == single_400
    assert active == 0


def test_the_builds_max_batch_caps_a_cohort(client, stack, demo_model):
    from serving_service.engine import Engine
    from shared.generation import GenRequest
    from shared.store import BuildStore

    job = client.compile(str(demo_model), "small-batch", "fp32", max_batch=2)
    assert job.build_id

    async def run():
        engine = Engine(BuildStore(stack.cfg.store), "cpu", slots=8)
        await engine.load("m", job.build_id)

        async def one(i):
            return [t async for c in engine.stream(GenRequest(f"r{i}", "m", PROMPTS[i], 64)) for t in c.token_ids]

        await asyncio.gather(*(one(i) for i in range(6)))
        widths = dict(engine.builds["m"].worker.step_rows)
        engine.close()
        return widths

    widths = asyncio.run(run())
    assert max(widths) == 2, widths  # batched, but never past the compile request's max batch


def test_verify_rejects_a_build_whose_runtime_limits_differ(stack, fp32_build, tmp_path):
    import json
    import shutil

    from compiler_service.pipeline import CompileError, smoke_test

    build = tmp_path / "b"
    shutil.copytree(stack.cfg.store / "builds" / fp32_build, build)
    smoke_test(build, 4096, 32)
    cfg = json.loads((build / "genai_config.json").read_text())
    cfg["model"]["context_length"] = 100
    (build / "genai_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CompileError, match="context length is 100, not the requested 4096"):
        smoke_test(build, 4096, 32)
