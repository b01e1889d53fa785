"""Run a compile stage in a child process instead of a thread of the compiler.

ONNX Runtime's session creation and onnxruntime-genai's model load hold the GIL for the whole
load: in a thread, a 2.5 GB build starved the compiler's event loop for over 30 s (an 8 GB Llama 4
compile lost its job lease, faulthandler's stack named profiling._load_seconds). In a child the
loop keeps renewing the lease and answering RPCs. The child dies with the compiler (SIGKILL via
PR_SET_PDEATHSIG), is killed when the awaiting stage is cancelled, and counts in the job's peak
RSS (compiler_service.memory samples the compiler's process tree).
"""

from __future__ import annotations

import asyncio
import ctypes
import multiprocessing as mp
import signal
from typing import Any, Callable

from compiler_service.failures import CompileError

_CTX = mp.get_context("spawn")
PR_SET_PDEATHSIG = 1


def _child(conn, fn: Callable, args: tuple, kwargs: dict) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: cancellation still kills it
        pass
    try:
        result = ("ok", fn(*args, **kwargs))
    except BaseException as exc:  # noqa: BLE001 - re-raised in the compiler
        result = ("error", exc)
    try:
        conn.send(result)
    except Exception as exc:  # noqa: BLE001 - an unpicklable exception: its text still goes back
        conn.send(("error", CompileError(f"{type(result[1]).__name__}: {result[1]}" if result[0] == "error"
                                         else f"the stage's result could not be sent back: {exc}")))
    finally:
        conn.close()


async def in_child(fn: Callable, *args: Any, **kwargs: Any) -> Any:
    """fn(*args, **kwargs) in a spawned process (fn importable, arguments and result picklable);
    its exception is raised here."""
    recv, send = _CTX.Pipe(duplex=False)
    proc = _CTX.Process(target=_child, args=(send, fn, args, kwargs), daemon=True,
                        name=f"llamaship-{getattr(fn, '__name__', 'stage')}")
    proc.start()
    send.close()
    try:
        status, value = await asyncio.to_thread(_receive, recv, proc)
    except BaseException:
        proc.kill()
        raise
    finally:
        recv.close()
        await asyncio.shield(asyncio.to_thread(proc.join, 10))
    if status == "error":
        raise value
    return value


def _receive(conn, proc) -> tuple[str, Any]:
    try:
        return conn.recv()
    except EOFError:
        proc.join(5)
        raise CompileError(f"the {proc.name.removeprefix('llamaship-')} stage's process died "
                           f"(exit code {proc.exitcode})") from None
