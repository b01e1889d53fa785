"""Inputs only the replica can judge (the vocabulary, the prompt in tokens) get INVALID_ARGUMENT,
not a retryable UNAVAILABLE with runtime text; a huge prompt does not stall other streams."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest

pytestmark = pytest.mark.integration


def _status(fn):
    with pytest.raises(grpc.RpcError) as info:
        fn()
    return info.value.code(), info.value.details()


def _vocab_size(demo_model) -> int:
    return json.loads((demo_model / "config.json").read_text())["vocab_size"]


def test_top_k_above_the_vocabulary_is_invalid(client, fp32_build, demo_model):
    vocab = _vocab_size(demo_model)
    code, details = _status(lambda: client.generate("demo", "x = ", 4, temperature=0.7, top_k=vocab + 1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_k" in details, (code, details)
    assert client.generate("demo", "x = ", 4, temperature=0.7, top_k=vocab, seed=1).completion_tokens == 4


def test_a_huge_prompt_is_refused_without_stalling_other_streams(client, fp32_build):
    """Tokenizing a 2 MB prompt on the replica's event loop stalled every other stream for seconds."""
    arrivals: list[float] = []

    def long_stream() -> None:
        for chunk in client.stream("demo", "def f(x):\n", 3000, temperature=0.8, seed=7):
            if chunk.token_ids:
                arrivals.append(time.perf_counter())

    runner = threading.Thread(target=long_stream)
    runner.start()
    while not arrivals:
        time.sleep(0.01)
    sent = time.perf_counter()
    code, details = _status(lambda: client.generate("demo", "é" * 990_000, 4))
    answered = time.perf_counter()
    runner.join(120)
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "context length" in details, (code, details)
    during = [t for t in arrivals if sent <= t <= answered + 0.5]
    assert arrivals[-1] > answered, "the other stream ended before the huge prompt was answered"
    gaps = [b - a for a, b in zip(during, during[1:])]
    assert gaps and max(gaps) < 1.0, f"the other stream stalled {max(gaps):.2f}s"


def test_replicas_use_every_core_by_default(stack, fp32_build):
    """ONNX Runtime's own default was one intra-op thread on a 2-core machine: the stack as a user
    starts it decoded at about 60% of a direct call."""
    from serving_service.decode_worker import usable_cores

    logs = "".join(p.read_text() for p in stack.cfg.log_dir.glob("serving-*.log"))
    assert f"{usable_cores()} intra-op threads" in logs
