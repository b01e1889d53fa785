"""The `llamaship` command as a person uses it: up, compile, generate, models, then SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent


def _cli(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "llamaship.cli", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=timeout)


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def test_up_compile_generate_models_and_sigterm(tmp_path, demo_model):
    from llamaship.stack import free_port

    gw, comp, serv = free_port(), free_port(), free_port()
    up = subprocess.Popen([sys.executable, "-m", "llamaship.cli", "up", "--gateway-port", str(gw), "--compiler-port",
                           str(comp), "--serving-port", str(serv), "--store", str(tmp_path / "store"), "--log-dir",
                           str(tmp_path / "logs")], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=ROOT)
    lines = []
    try:
        for line in up.stdout:
            lines.append(line)
            if "gateway ready" in line:
                break
        assert any(f"127.0.0.1:{gw}" in l for l in lines), "".join(lines)
        env = dict(os.environ, LLAMASHIP_GATEWAY=f"127.0.0.1:{gw}")
        assert "no models published yet" in _cli("models", env=env).stdout

        done = _cli("compile", str(demo_model), "--name", "cli", "--recipe", "int8", env=env)
        assert done.returncode == 0, done.stderr
        assert "is served" in done.stdout

        gen = _cli("generate", "cli", "def f(x):", "--max-tokens", "12", "--stats", env=env)
        assert gen.returncode == 0, gen.stderr
        assert gen.stdout.startswith("def f(x):") and len(gen.stdout) > len("def f(x):\n")
        assert "12 tokens" in gen.stderr and "time to first token" in gen.stderr

        # batch priority, and a client that lists a dead gateway first: it goes on to the live one
        dead = free_port()
        again = _cli("generate", "cli", "def f(x):", "--max-tokens", "12", "--priority", "batch", "--gateway",
                     f"127.0.0.1:{dead},127.0.0.1:{gw}")
        assert again.returncode == 0, again.stderr
        assert again.stdout == gen.stdout

        shown = _cli("builds", "show", done.stdout.split("build ")[1].split()[0], env=env)
        assert shown.returncode == 0 and "quality gate: passed" in shown.stdout, shown.stderr

        models = _cli("models", env=env)
        assert "cli" in models.stdout and "int8" in models.stdout and "cpu-0@" in models.stdout

        bad = _cli("compile", str(tmp_path / "nope"), "--name", "x", env=env)
        assert bad.returncode == 1 and "does not exist" in bad.stderr.strip().splitlines()[-1]
        missing = _cli("generate", "nope", "hi", env=env)
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

        access = _cli("models", "access", "cli", "--allow", "acme,beta", env=env)
        assert access.returncode == 0 and "acme, beta" in access.stdout, access.stderr
        assert "acme, beta" in _cli("models", env=env).stdout
        assert _cli("cancel", "not-running", env=env).stdout.strip().endswith("(unknown, finished, or not yours)")
        gone = _cli("models", "delete", "cli", env=env)
        assert gone.returncode == 0 and "deleted" in gone.stdout, gone.stderr
        after = _cli("generate", "cli", "def f(x):", env=env)
        assert after.returncode == 1 and "NOT_FOUND" in after.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        rest, _ = up.communicate(timeout=60)
    assert up.returncode == 0, "".join(lines) + rest
    assert "stopped" in rest
    deadline = time.time() + 10
    while any(_port_open(p) for p in (gw, comp, serv)):
        assert time.time() < deadline, "a service still listens after llamaship up stopped"
        time.sleep(0.1)


def test_client_commands_fail_cleanly_without_a_gateway():
    from llamaship.stack import free_port

    env = dict(os.environ, LLAMASHIP_GATEWAY=f"127.0.0.1:{free_port()}")
    out = _cli("models", env=env, timeout=60)
    assert out.returncode == 1 and "UNAVAILABLE" in out.stderr and "Traceback" not in out.stderr


def test_up_refuses_an_open_gateway_off_loopback(tmp_path):
    out = _cli("up", "--host", "0.0.0.0", "--store", str(tmp_path / "s"), timeout=60)
    assert out.returncode == 1 and "without API keys" in out.stderr and "--allow-open" in out.stderr
