"""Runs the Llama 4 graph builder (compiler_service.llama4) in a worker thread: off the event
loop, its progress forwarded to the job, and told to stop when the job is cancelled or the run
ends. The run does not return before the thread has stopped writing into the build directory."""

from __future__ import annotations

import asyncio
import hashlib
import threading
from pathlib import Path
from typing import Awaitable, Callable

from compiler_service.builder_runner import BuildCancelled
from compiler_service.checkpoint import CheckpointError
from compiler_service.failures import CompileError

POLL_S = 0.25
BUILDER_DIR = Path(__file__).resolve().parent / "llama4"


def supported_precisions() -> dict[str, tuple[str, ...]]:
    """Per pool, the recipes the builder makes: its presets for that pool, and auto (it takes
    per-group precisions; offered where the pool offers it)."""
    from compiler_service.llama4.build import PRECISIONS

    return {pool: (*(name for name, p in PRECISIONS.items() if pool in p.pools), "auto") for pool in ("cpu", "cuda")}


def builder_version() -> str:
    """A digest of the builder's sources: a changed builder never reuses an old build."""
    h = hashlib.sha256()
    for path in sorted(BUILDER_DIR.glob("*.py")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return "llama4-" + h.hexdigest()[:12]


async def run_llama4_build(
    checkpoint: Path, out_dir: Path, *, precision: str, pool: str, context_length: int,
    on_progress: Callable[[float, str], Awaitable[None]],
    should_cancel: Callable[[], Awaitable[bool]],
    stop: threading.Event,
) -> dict:
    """The builder's report. CompileError for a checkpoint or option the builder refuses,
    BuildCancelled when the job was cancelled while it ran."""
    from compiler_service.llama4.build import build_llama4

    loop = asyncio.get_running_loop()
    cancel = threading.Event()
    reports: asyncio.Queue[tuple[float, str] | None] = asyncio.Queue()
    forwarder = asyncio.ensure_future(_forward(reports, on_progress, cancel))

    def progress(fraction: float, message: str) -> None:
        loop.call_soon_threadsafe(reports.put_nowait, (fraction, message))

    def should_stop() -> bool:
        return cancel.is_set() or stop.is_set()

    task = asyncio.ensure_future(asyncio.to_thread(
        build_llama4, checkpoint, out_dir, precision=precision, pool=pool, context_length=context_length,
        progress=progress, should_stop=should_stop))
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=POLL_S)
            if not task.done() and await should_cancel():
                cancel.set()
        return task.result()
    except BuildCancelled:
        raise BuildCancelled("cancelled while the Llama 4 builder ran") from None
    except (CheckpointError, ValueError) as exc:  # CheckpointError is a ValueError too
        if should_stop():
            raise BuildCancelled("cancelled while the Llama 4 builder ran") from None
        raise CompileError(str(exc)) from None
    finally:
        if not task.done():  # the run was cancelled: the thread stops at its next check
            cancel.set()
            forwarder.cancel()
            await asyncio.shield(asyncio.wait({task}))
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: an abandoned failure is not reported as never retrieved
        # every report is written before the next stage's: the job's stage never goes back to "build"
        reports.put_nowait(None)
        await asyncio.wait({forwarder})


async def _forward(reports: asyncio.Queue, on_progress: Callable[[float, str], Awaitable[None]],
                   cancel: threading.Event) -> None:
    """Forward the builder's reports in order; the job's progress raises when the job must stop."""
    while (item := await reports.get()) is not None:
        if cancel.is_set():
            continue
        try:
            await on_progress(*item)
        except Exception:  # noqa: BLE001 - JobStopped and the like: stop the builder
            cancel.set()
