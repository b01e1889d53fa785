"""`llamaship up` supervises its services: a replica SIGKILLed under two running streams is
restarted with its replica id and port while the other replica and the gateway keep serving;
both streams end exactly as an undisturbed run; a service that keeps crashing is given up on;
the embedded Redis comes back on its port; SIGTERM stops everything, leaving no process behind."""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
PROMPT = "def main(argv):\n    "  # greedy: never hits EOS
N = 800


class Up:
    """`python -m llamaship.cli up ...` in a subprocess, its output read line by line."""

    def __init__(self, tmp_path: Path, *args: str):
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "llamaship.cli", "up", "--store", str(tmp_path / "store"), "--log-dir",
             str(tmp_path / "logs"), *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        self.lines: list[str] = []
        self._q: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._q.put(line)
        self._q.put(None)

    def wait_for(self, pattern: str, timeout_s: float = 120) -> re.Match:
        for line in self.lines:
            if m := re.search(pattern, line):
                return m
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            try:
                line = self._q.get(timeout=0.2)
            except queue.Empty:
                continue
            if line is None:
                break
            self.lines.append(line)
            if m := re.search(pattern, line):
                return m
        raise AssertionError(f"no line matching {pattern!r} from llamaship up:\n{self.output}")

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def pid_of(self, name: str) -> int:
        return int(self.wait_for(rf"^  {re.escape(name)}\s.*\bpid (\d+)").group(1))

    def family(self) -> set[int]:
        """Every process `up` runs now: the services and their children (decode workers)."""
        import psutil

        return {p.pid for p in psutil.Process(self.popen.pid).children(recursive=True)}

    def stop(self, timeout_s: float = 60) -> int:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
        code = self.popen.wait(timeout_s)
        self.wait_for("stopped", 5) if code == 0 else None
        return code


def _all_gone(pids: set[int], timeout_s: float = 10) -> set[int]:
    import psutil

    deadline = time.time() + timeout_s
    while True:
        alive = {p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE}
        if not alive or time.time() > deadline:
            return alive
        time.sleep(0.1)


def test_up_restarts_a_killed_replica_and_both_streams_complete_exactly(tmp_path, demo_model):
    import psutil

    from llamaship.client import GatewayClient
    from llamaship.stack import free_port

    gw = free_port()
    up = Up(tmp_path, "--gateway-port", str(gw), "--replicas", "2", "--slots", "1")
    seen: set[int] = set()
    try:
        up.wait_for("gateway ready", 180)
        victim = up.pid_of("serving-cpu-0")
        address = up.wait_for(r"^  serving-cpu-0\s+grpc (\S+)").group(1)
        assert not re.search(r"grpc 127\.0\.0\.1:5005[23]\b", up.output), "compiler/replica ports must be free ones"
        with GatewayClient(f"127.0.0.1:{gw}") as client:
            assert client.compile(str(demo_model), "demo", "fp32").build_id
            reference = client.generate("demo", PROMPT, N)
            assert reference.completion_tokens == N

            streams = [client.stream("demo", PROMPT, N) for _ in range(2)]
            got = [list(next(s).token_ids) for s in streams]  # both running: one on each replica (1 slot each)
            seen |= up.family()
            assert psutil.Process(victim).children(), "the replica has a decode worker"
            os.kill(victim, signal.SIGKILL)

            errors: list[BaseException] = []

            def drain(i: int) -> None:
                try:
                    for chunk in streams[i]:
                        got[i] += chunk.token_ids
                except BaseException as exc:  # noqa: BLE001 - asserted below
                    errors.append(exc)

            readers = [threading.Thread(target=drain, args=(i,)) for i in range(2)]
            for t in readers:
                t.start()
            up.wait_for(r"serving-cpu-0 killed by SIGKILL; restarting it", 30)
            back = up.wait_for(r"serving-cpu-0 is back \(pid (\d+), (\S+)\)", 120)
            assert int(back.group(1)) != victim and back.group(2) == address  # same replica, same port
            for t in readers:
                t.join(180)
            assert not errors, errors
            assert got[0] == reference.token_ids and got[1] == reference.token_ids
            seen |= up.family()
            # the restarted replica serves under its own id
            served = {r.replica_id for m in client.models() for r in m.replicas}
            assert served == {"cpu-0", "cpu-1"}, served
            assert client.generate("demo", "x = ", 4).completion_tokens == 4
        assert "stopping the stack" not in up.output and up.popen.poll() is None
    finally:
        code = up.stop()
    assert code == 0, up.output
    assert not _all_gone(seen | {victim}), f"left behind after SIGTERM:\n{up.output}"


def test_up_restarts_redis_gives_up_on_a_crash_looping_service_and_stops_when_nothing_is_left(tmp_path):
    import grpc

    from llamaship.client import GatewayClient
    from llamaship.stack import free_port

    gw = free_port()
    up = Up(tmp_path, "--gateway-port", str(gw), "--max-restarts", "1", "--restart-window-s", "300")
    try:
        up.wait_for("gateway ready", 180)
        # the embedded Redis comes back on its port; the services reconnect
        redis_url = up.wait_for(r"^  redis\s+(\S+)").group(1)
        os.kill(up.pid_of("redis"), signal.SIGKILL)
        up.wait_for(r"redis killed by SIGKILL; restarting it", 30)
        up.wait_for(r"redis is back \(pid \d+, (\S+)\)", 60)
        assert up.wait_for(r"^  redis\s+(\S+)").group(1) == redis_url
        with GatewayClient(f"127.0.0.1:{gw}") as client:
            deadline = time.time() + 30
            while True:
                try:
                    assert not client.models()
                    break
                except grpc.RpcError:
                    assert time.time() < deadline, up.output
                    time.sleep(0.5)
        # the compiler keeps crashing: given up on after one restart, the rest serves on
        os.kill(up.pid_of("compiler"), signal.SIGKILL)
        again = int(up.wait_for(r"compiler is back \(pid (\d+)", 120).group(1))
        os.kill(again, signal.SIGKILL)
        up.wait_for(r"compiler killed by SIGKILL; it crashed 2 times within 300s: giving up on it", 30)
        time.sleep(1)
        assert up.popen.poll() is None, up.output
        seen = up.family()
        # the only replica too: nothing useful is left, so up stops everything and exits 1
        replica = up.pid_of("serving-cpu-0")
        os.kill(replica, signal.SIGKILL)
        up.wait_for(r"serving-cpu-0 .*restarting", 30)
        again = int(up.wait_for(r"serving-cpu-0 is back \(pid (\d+)", 120).group(1))
        seen |= up.family()
        os.kill(again, signal.SIGKILL)
        up.wait_for(r"no serving replica is left; stopping the stack", 30)
        code = up.popen.wait(60)
    finally:
        if up.popen.poll() is None:
            up.stop()
    assert code == 1, up.output
    assert not _all_gone(seen), up.output
