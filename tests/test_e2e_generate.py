"""End to end through real processes: compile → publish → serve → stream through the gateway."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2

pytestmark = pytest.mark.integration
PROMPT = "def main(argv):\n    "


@pytest.fixture(scope="module")
def reference():
    """transformers' greedy generate on the same checkpoint."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.conftest import DEMO_MODEL_DIR

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR)

    def run(prompt: str, max_new_tokens: int) -> tuple[list[int], list[int], str]:
        ids = tok(prompt)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[0].tolist()
        new = out[len(ids):]
        return ids, new, tok.decode(new, skip_special_tokens=True)

    return run


def test_greedy_stream_equals_transformers(client, fp32_build, reference):
    prompt_ids, ref_ids, ref_text = reference(PROMPT, 48)
    out = client.generate("demo", PROMPT, 48)
    assert len(out.token_ids) >= 32
    assert out.token_ids == ref_ids
    assert out.text == ref_text
    assert out.prompt_tokens == len(prompt_ids)  # BOS included, as the HF tokenizer does
    assert out.completion_tokens == len(out.token_ids)
    assert out.build_id == fp32_build
    assert out.finish_reason in ("length", "eos")


def test_tokens_stream_in_chunks_as_they_are_produced(client, fp32_build):
    chunks = list(client.stream("demo", PROMPT, 200))
    body = [c for c in chunks if c.token_ids]
    # a chunk carries the tokens decoded since the last one (at most 64), never the whole answer
    assert len(body) >= 4 and all(1 <= len(c.token_ids) <= 64 for c in body)
    assert sum(len(c.token_ids) for c in chunks) == 200
    assert chunks[-1].finish_reason != 0 and chunks[-1].usage.completion_tokens == 200
    assert all(c.finish_reason == 0 for c in chunks[:-1])
    assert len({c.request_id for c in chunks}) == 1


def test_seeded_sampling_is_reproducible_and_differs_from_greedy(client, fp32_build):
    a = client.generate("demo", PROMPT, 32, temperature=1.0, top_k=50, seed=11)
    b = client.generate("demo", PROMPT, 32, temperature=1.0, top_k=50, seed=11)
    greedy = client.generate("demo", PROMPT, 32)
    assert a.token_ids == b.token_ids
    seeds = {tuple(client.generate("demo", PROMPT, 32, temperature=1.0, seed=s).token_ids) for s in range(4)}
    assert len(seeds | {tuple(greedy.token_ids)}) > 1


def test_stop_string_ends_the_stream_before_it(client, fp32_build):
    full = client.generate("demo", PROMPT, 40)
    assert len(full.text) > 6
    stop = full.text[3:6]
    out = client.generate("demo", PROMPT, 40, stop=[stop])
    assert out.finish_reason == "stop"
    assert stop not in out.text
    assert full.text.startswith(out.text)
    assert out.text == full.text[: full.text.find(stop)]


def test_max_tokens_limits_the_completion(client, fp32_build):
    out = client.generate("demo", PROMPT, 5)
    assert out.completion_tokens == 5 and out.finish_reason == "length"


def test_models_lists_build_and_replica(client, fp32_build):
    models = {m.name: m for m in client.models()}
    assert models["demo"].build_id == fp32_build
    assert models["demo"].recipe == "fp32"
    assert models["demo"].context_length == 4096
    assert [r.build_id for r in models["demo"].replicas] == [fp32_build]


def test_client_disconnect_frees_the_slot(client, stack, fp32_build):

    from shared.proto_gen.llamaship.serving.v1 import serving_pb2, serving_pb2_grpc

    call = client.stream("demo", PROMPT, 3000)
    next(call)
    call.cancel()
    with grpc.insecure_channel(stack.procs["serving-cpu-0"].address) as ch:
        stub = serving_pb2_grpc.ServingStub(ch)
        deadline = time.time() + 10
        while stub.GetStatus(serving_pb2.GetStatusRequest()).active != 0:
            assert time.time() < deadline, "slot still busy after the client went away"
            time.sleep(0.05)
    assert client.generate("demo", PROMPT, 4).completion_tokens == 4


def test_concurrent_streams_all_complete(client, fp32_build):
    results, errors = [], []

    def one(i):
        try:
            results.append(client.generate("demo", PROMPT, 24))
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert len(results) == 8 and len({tuple(r.token_ids) for r in results}) == 1


def test_compile_of_identical_inputs_reuses_the_build(client, demo_model, fp32_build):
    job = client.compile(str(demo_model), "demo", "fp32")
    assert job.state == compiler_pb2.JOB_STATE_SUCCEEDED
    assert job.reused and job.build_id == fp32_build


def test_prometheus_metrics_count_the_work(client, stack, fp32_build):
    import re
    import urllib.request

    client.generate("demo", PROMPT, 8)

    def scrape(name: str) -> str:
        port = stack.metrics_ports[name]
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    def value(text: str, metric: str) -> float:
        return sum(float(v) for v in re.findall(rf"^{metric}(?:{{[^}}]*}})? (\S+)$", text, re.M))

    serving, gateway = scrape("serving-cpu-0"), scrape("gateway")
    assert value(serving, "llamaship_serving_tokens_total") >= 8
    assert value(serving, "llamaship_serving_time_to_first_token_seconds_count") >= 1
    assert value(serving, "llamaship_serving_build_load_seconds_count") >= 1
    assert value(gateway, "llamaship_gateway_requests_total") >= 1
    assert value(gateway, "llamaship_gateway_tokens_total") >= 8
    assert "process_cpu_seconds_total" in scrape("compiler")
