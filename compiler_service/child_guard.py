"""python -m compiler_service.child_guard PARENT_PID PROGRAM ARGS...: exec PROGRAM so that it gets
SIGKILL when the compiler (PARENT_PID) dies, however it dies (Linux prctl PR_SET_PDEATHSIG, which
survives exec). Done here rather than in a preexec_fn: code between fork and exec in a process
with gRPC threads is not safe."""

from __future__ import annotations

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def main(argv: list[str]) -> None:
    parent, program = int(argv[0]), argv[1:]
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the compiler's own kill paths still apply
        pass
    if os.getppid() != parent:  # the compiler died before the guard was set
        sys.exit(137)
    os.execv(program[0], program)


if __name__ == "__main__":
    main(sys.argv[1:])
