"""Prefix routing through a real stack with two replicas: requests that share a long prefix all
land on one replica (whose prefix cache then holds it), and when that replica's slots are taken the
other one serves them at once."""

from __future__ import annotations

import re
import threading
import time
import urllib.request

import pytest

pytestmark = pytest.mark.integration
SYSTEM = "You are Llamaship's helpful assistant. Answer briefly, in plain words, and cite nothing. " * 8
GRACE_MS = 5000  # long, so that a request waits for its busy-but-free preferred replica on a loaded machine


@pytest.fixture(scope="module")
def two_replicas(tmp_path_factory, demo_model):
    from llamaship.client import GatewayClient
    from llamaship.stack import Stack, StackConfig

    base = tmp_path_factory.mktemp("prefix-routing")
    cfg = StackConfig(store=base / "store", log_dir=base / "logs", serving_ports=[0, 0], slots=2, metrics=True,
                      env={"LLAMASHIP_PREFIX_GRACE_MS": str(GRACE_MS)})
    with Stack(cfg) as stack, GatewayClient(stack.gateway_address) as client:
        assert client.compile(str(demo_model), "demo", "fp32").build_id
        _wait_both_served(client)
        yield stack, client


def _metric(stack, service: str, name: str, **labels) -> float:
    text = urllib.request.urlopen(f"http://127.0.0.1:{stack.metrics_ports[service]}/metrics", timeout=5).read().decode()
    total = 0.0
    for line in text.splitlines():
        m = re.fullmatch(rf"{name}(?:{{(.*)}})? (\S+)", line)
        if m and all(f'{k}="{v}"' in (m[1] or "") for k, v in labels.items()):
            total += float(m[2])
    return total


def _wait_both_served(client, timeout_s: float = 60) -> None:
    """Until the gateway sees both replicas serve demo (their heartbeats), and its router's view of
    the live replicas (read at most once a second) has caught up."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if any(m.name == "demo" and len(m.replicas) == 2 for m in client.models()):
            time.sleep(1.2)
            return
        time.sleep(0.2)
    raise AssertionError("the two replicas never both served demo")


def _picks(stack, preferred: str) -> dict[str, float]:
    return {s: _metric(stack, s, "llamaship_serving_prefix_routed_picks_total", preferred=preferred)
            for s in ("serving-cpu-0", "serving-cpu-1")}


def test_requests_sharing_a_prefix_land_on_one_replica_and_overflow_when_it_is_full(two_replicas):
    stack, client = two_replicas
    before_here, before_other = _picks(stack, "here"), _picks(stack, "other")
    for i in range(6):
        out = client.generate("demo", SYSTEM + f"\nUser turn {i}: hello?", 4)
        assert out.completion_tokens == 4
    here = {s: n - before_here[s] for s, n in _picks(stack, "here").items()}
    assert sorted(here.values()) == [0, 6], (here, _picks(stack, "other"), _picks(stack, "none"))
    assert _picks(stack, "other") == before_other
    assert _metric(stack, "gateway", "llamaship_gateway_prefix_routed_total", pool="cpu") >= 6
    preferred = max(here, key=here.get)
    other = min(here, key=here.get)

    # The preferred replica's slots are taken by long streams of the same prefix: the next request
    # goes to the other replica at once, not after the grace.
    streams = [client.stream("demo", SYSTEM + f"\nUser turn long {i}: tell me everything.", 3000) for i in range(2)]
    started = [threading.Event() for _ in streams]

    def drain(stream, first):
        try:
            for chunk in stream:
                if chunk.token_ids:
                    first.set()
        except Exception:  # noqa: BLE001 - cancelled below
            first.set()

    readers = [threading.Thread(target=drain, args=pair) for pair in zip(streams, started)]
    for t in readers:
        t.start()
    try:
        assert all(e.wait(60) for e in started)
        assert _picks(stack, "here")[preferred] - before_here[preferred] == 8  # both run on the preferred one
        t0 = time.monotonic()
        out = client.generate("demo", SYSTEM + "\nUser turn 7: and now?", 4)
        assert out.completion_tokens == 4
        assert time.monotonic() - t0 < GRACE_MS / 1000, "waited for the full replica's grace"
        assert _picks(stack, "other")[other] - before_other[other] == 1
    finally:
        for stream in streams:
            stream.cancel()
        for t in readers:
            t.join(30)


def test_short_prompts_are_not_routed(two_replicas):
    stack, client = two_replicas
    before = sum(_picks(stack, "none").values())
    assert client.generate("demo", "def main(argv):", 4).completion_tokens == 4
    assert sum(_picks(stack, "none").values()) == before + 1
