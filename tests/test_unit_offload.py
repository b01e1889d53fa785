"""Compile stages in a child process: result, exception, death and cancellation."""

import asyncio
import os
import signal
import time

import pytest

from compiler_service.failures import CompileError
from compiler_service.offload import in_child


def _double(x: int) -> int:
    return 2 * x


def _refuse() -> None:
    raise CompileError("the build is refused")


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _hang() -> None:
    time.sleep(60)


def test_result_exception_and_death_come_back():
    async def main():
        assert await in_child(_double, 21) == 42
        with pytest.raises(CompileError, match="refused"):
            await in_child(_refuse)
        with pytest.raises(CompileError, match=r"_die stage's process died \(exit code -9\)"):
            await in_child(_die)

    asyncio.run(main())


def test_a_cancelled_stage_kills_its_process():
    import psutil

    before = {p.pid for p in psutil.Process().children(recursive=True)}  # other tests' servers

    async def main():
        task = asyncio.ensure_future(in_child(_hang))
        await asyncio.sleep(1.0)
        t0 = time.perf_counter()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        return time.perf_counter() - t0

    assert asyncio.run(main()) < 10
    left = [p for p in psutil.Process().children(recursive=True) if p.pid not in before and p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left  # killed and reaped (multiprocessing's own resource tracker aside)
