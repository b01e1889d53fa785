"""Hot-load: a new build published under a name while a stream runs on the old one."""

from __future__ import annotations

import threading
import time

import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

pytestmark = pytest.mark.integration
PROMPT = "class Parser:\n    "


def test_running_stream_finishes_on_its_build_and_next_request_uses_the_new_one(client, demo_model, fp32_build):
    job = client.compile(str(demo_model), "hot", "fp32")
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED and job.build_id == fp32_build
    expected = client.generate("hot", PROMPT, 400)
    assert expected.build_id == fp32_build

    result: dict = {}
    started = threading.Event()

    def slow_reader() -> None:
        text, ids, build_ids, finish = "", [], set(), None
        for i, chunk in enumerate(client.stream("hot", PROMPT, 400)):
            started.set()
            text += chunk.text
            ids.extend(chunk.token_ids)
            build_ids.add(chunk.build_id)
            finish = chunk.finish_reason or finish
            time.sleep(0.08 * len(chunk.token_ids))  # a slow client (32 s): the stream outlives the next compile
        result.update(text=text, ids=ids, build_ids=build_ids, finish=finish)

    t = threading.Thread(target=slow_reader)
    t.start()
    assert started.wait(30)
    new = client.compile(str(demo_model), "hot", "hybrid-int8")
    assert new.state == compiler_pb2.JOB_STATE_SUCCEEDED, new.message
    assert new.build_id != fp32_build
    assert t.is_alive(), "the stream ended before the new build was published; the test proves nothing"
    after = client.generate("hot", PROMPT, 8)
    t.join(120)
    assert result["ids"] == expected.token_ids
    assert result["text"] == expected.text
    assert result["build_ids"] == {fp32_build}
    assert after.build_id == new.build_id
    models = {m.name: m for m in client.models()}
    assert models["hot"].build_id == new.build_id and models["hot"].recipe == "hybrid-int8"


def test_swap_mid_decode_keeps_the_running_sequence_on_the_old_build(stack, fp32_build, client, demo_model):
    """Engine level, deterministic: the swap happens between two decode steps of one sequence."""
    import asyncio

    from serving_service.engine import Engine
    from shared.generation import GenRequest
    from shared.store import BuildStore

    hybrid = client.compile(str(demo_model), "hot", "hybrid-int8")
    engine = Engine(BuildStore(stack.cfg.store), "cpu", slots=2)

    async def run():
        await engine.load("m", fp32_build)
        reference = [c async for c in engine.stream(GenRequest("r0", "m", PROMPT, 1500))]
        stream = engine.stream(GenRequest("r1", "m", PROMPT, 1500))
        got = [await stream.__anext__()]
        old = engine.builds["m"]
        await engine.load("m", hybrid.build_id)
        assert old.active == 1 and engine.builds["m"] is not old  # swapped while r1 still runs on old
        got += [c async for c in stream]
        after = [c async for c in engine.stream(GenRequest("r2", "m", PROMPT, 4))]
        assert old.worker.closed and not engine.builds["m"].worker.closed  # the old build's process is gone
        engine.close()
        return reference, got, after

    reference, got, after = asyncio.run(run())
    flat = lambda chunks: [t for c in chunks for t in c.token_ids]  # noqa: E731
    assert len(flat(got)) == 1500 and flat(got) == flat(reference)
    assert {c.build_id for c in got} == {fp32_build}
    assert {c.build_id for c in after} == {hybrid.build_id}
    assert engine.active == 0
