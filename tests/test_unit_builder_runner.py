"""The builder child dies with the compiler, even when the compiler is SIGKILLed (it runs in its
own session, so nothing else would stop it)."""

import os
import signal
import subprocess
import sys
import time


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"


def test_the_builder_child_dies_with_a_killed_compiler(tmp_path):
    pid_file = tmp_path / "child.pid"
    parent = subprocess.Popen([sys.executable, "-c", f"""
import asyncio, pathlib, sys
from compiler_service import builder_runner

async def main():
    real = asyncio.create_subprocess_exec

    async def spy(*args, **kw):  # run `sleep` in place of the model builder, through the same guard
        i = args.index("compiler_service.child_guard")
        proc = await real(*args[:i + 2], "/bin/sleep", "60", **kw)
        pathlib.Path({str(pid_file)!r}).write_text(str(proc.pid))
        return proc

    asyncio.create_subprocess_exec = spy
    async def no_progress(f, m): pass
    async def never(): return False
    await builder_runner.run_builder(pathlib.Path("."), pathlib.Path("."), pathlib.Path("."), [], 1,
                                     pathlib.Path({str(tmp_path / 'b.log')!r}), no_progress, never)

asyncio.run(main())
"""])
    deadline = time.time() + 30
    while not pid_file.exists() or not pid_file.read_text():
        assert time.time() < deadline and parent.poll() is None
        time.sleep(0.05)
    child = int(pid_file.read_text())
    time.sleep(0.5)  # the guard has exec'd sleep
    assert _alive(child)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 5
    while _alive(child) and time.time() < deadline:
        time.sleep(0.05)
    alive = _alive(child)
    if alive:
        os.killpg(child, signal.SIGKILL)
    assert not alive
