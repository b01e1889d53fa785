"""Runs the ONNX Runtime GenAI model builder in a child process: off the event loop, with its
output logged to a file, its progress parsed, and a kill switch for cancellation."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from pathlib import Path
from typing import Awaitable, Callable

_LAYER = re.compile(r"^Reading layer (\d+)")


class BuildFailed(RuntimeError):
    pass


class BuildCancelled(RuntimeError):
    pass


def _kill(proc: asyncio.subprocess.Process) -> None:
    """SIGKILL the builder's whole process group."""
    if proc.returncode is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()


def failure_reason(log_lines: list[str]) -> str:
    """The builder's own last error line, e.g. 'NotImplementedError: ...'."""
    for line in reversed(log_lines):
        line = line.strip()
        if re.match(r"^[A-Za-z_.]*(Error|Exception)\b.*:", line):
            return line[:500]
    tail = [l.strip() for l in log_lines if l.strip()]
    return tail[-1][:500] if tail else "no output"


async def run_builder(
    checkpoint: Path,
    output: Path,
    cache_dir: Path,
    builder_args: list[str],
    num_layers: int,
    log_path: Path,
    on_progress: Callable[[float, str], Awaitable[None]],
    should_cancel: Callable[[], Awaitable[bool]],
) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(checkpoint), "-o", str(output),
           "-c", str(cache_dir), *builder_args]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "compiler_service.child_guard", str(os.getpid()), *cmd,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, env=env, start_new_session=True,
    )
    lines: list[str] = []
    cancelled = False

    async def watch_cancel() -> None:
        nonlocal cancelled
        while proc.returncode is None:
            if await should_cancel():
                cancelled = True
                _kill(proc)
                return
            await asyncio.sleep(0.5)

    watcher = asyncio.create_task(watch_cancel())
    try:
        with open(log_path, "w") as log:
            log.write(" ".join(cmd) + "\n")
            assert proc.stdout is not None
            async for raw in proc.stdout:
                for line in raw.decode(errors="replace").replace("\r", "\n").splitlines():
                    log.write(line + "\n")
                    lines.append(line)
                    del lines[:-200]
                    if m := _LAYER.match(line):
                        await on_progress(0.1 + 0.7 * (int(m.group(1)) + 1) / max(num_layers, 1),
                                          f"converting layer {int(m.group(1)) + 1}/{num_layers}")
                    elif line.startswith("Saving ONNX model"):
                        await on_progress(0.85, "writing ONNX model")
                    elif line.startswith("Saving GenAI config"):
                        await on_progress(0.95, "writing GenAI config")
        rc = await proc.wait()
    except BaseException:  # cancelled, or a progress report that says the job must stop
        _kill(proc)
        await asyncio.shield(proc.wait())
        raise
    finally:
        watcher.cancel()
    if cancelled:
        raise BuildCancelled("cancelled while the builder ran")
    if rc != 0:
        raise BuildFailed(f"model builder failed (exit {rc}): {failure_reason(lines)}")
