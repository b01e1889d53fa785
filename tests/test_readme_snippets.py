"""README's "Use it from your service" snippets run as written (ports aside) against a stack started by
the README's own `llamaship up` line: compile and watch, the OpenAI client, curl, grpcurl,
GatewayClient and the plain stubs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parent.parent
SECTION = "## Use it from your service"


def snippets() -> list[tuple[str, str]]:
    text = (ROOT / "README.md").read_text()
    assert text.index(SECTION) < text.index("## The two commands"), "the README must open with " + SECTION
    body = text[text.index(SECTION):]
    body = body[: body.index("\n## ", len(SECTION))]
    return re.findall(r"```(sh|python)\n(.*?)```", body, re.S)


def test_the_section_has_every_kind_of_snippet():
    blocks = snippets()
    code = "\n".join(c for _, c in blocks)
    assert blocks[0][0] == "sh" and blocks[0][1].startswith("llamaship up ")
    for needed in ("from openai import OpenAI", "grpcurl ", "GatewayClient(", "gateway_pb2_grpc.GatewayStub(",
                   "submit_compile(", "watch_compile(", "curl "):
        assert needed in code, needed


def test_snippets_run_against_a_real_stack(tmp_path, demo_model):
    from llamaship.stack import free_port

    blocks = snippets()
    gw, http = free_port(), free_port()

    def ported(code: str) -> str:
        return code.replace(":50051", f":{gw}").replace(":8000", f":{http}").replace("localhost", "127.0.0.1")

    up_line = blocks[0][1].strip()
    assert "--http-port 8000" in up_line
    up_args = up_line.replace("--http-port 8000", f"--http-port {http}").split()[2:]
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    up = subprocess.Popen([sys.executable, "-m", "llamaship.cli", "up", *up_args, "--gateway-port", str(gw),
                           "--store", str(tmp_path / "store"), "--log-dir", str(tmp_path / "logs")],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=env)
    try:
        seen = []
        deadline = time.time() + 120
        for line in up.stdout:
            seen.append(line)
            if line.startswith("OpenAI-compatible API at"):
                break
            assert time.time() < deadline and up.poll() is None, "".join(seen)
        assert f"http://127.0.0.1:{http}/v1" in seen[-1], "".join(seen)
        for lang, code in blocks[1:]:
            cmd = [sys.executable, "-c", ported(code)] if lang == "python" else ["bash", "-euo", "pipefail", "-c",
                                                                                   ported(code)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
            assert out.returncode == 0, f"{lang} snippet failed:\n{code}\n{out.stdout}\n{out.stderr}"
            assert out.stdout.strip(), f"{lang} snippet printed nothing:\n{code}"
            if "watch_compile" in code:
                assert "JOB_STATE_SUCCEEDED" in out.stdout
            if "chat/completions" in code:
                assert '"chat.completion"' in out.stdout.replace(" ", "") or '"object":"chat.completion"' in out.stdout
            if "Gateway/Generate" in code:
                assert "FINISH_REASON_LENGTH" in out.stdout and "llamaship.gateway.v1.Gateway" in out.stdout
            if "trailing_metadata" in code:
                assert "x-llamaship-decode-ms" in out.stdout
    finally:
        up.terminate()
        try:
            up.wait(60)
        except subprocess.TimeoutExpired:
            up.kill()
            up.wait(10)
