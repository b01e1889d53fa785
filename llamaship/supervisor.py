"""Keeps `llamaship up`'s services running. A service that exits, however it exits, is started
again after a backoff (a replica with its replica id, every service on its port where it can);
one that crashed `max_restarts` times within `window_s` is given up on while the others keep
serving. Only `up`'s caller (Ctrl-C, SIGTERM) stops the stack, or nothing useful being left."""

from __future__ import annotations

import signal
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from llamaship.stack import Stack


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5  # restarts allowed within window_s; one more crash and the service is given up on
    window_s: float = 120.0
    backoff_s: float = 0.5  # delay before the first restart in the window, doubled for each further one
    backoff_max_s: float = 30.0
    ready_timeout_s: float = 120.0  # a restarted service not serving by then counts as crashed

    def delay(self, recent_restarts: int) -> float:
        return min(self.backoff_max_s, self.backoff_s * 2 ** recent_restarts)


@dataclass
class _Service:
    restarts: deque = field(default_factory=deque)  # times of restarts within the window
    due: float | None = None  # when a pending restart is due
    starting_until: float | None = None  # a restarted process not yet serving
    given_up: bool = False


def describe_exit(code: int | None) -> str:
    if code is None:
        return "did not start in time"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exited with code {code}"


class Supervisor:
    def __init__(self, stack: Stack, policy: RestartPolicy = RestartPolicy(),
                 say: Callable[[str], None] = print, clock: Callable[[], float] = time.monotonic):
        self.stack = stack
        self.policy = policy
        self.say = say
        self.clock = clock
        self.services = {name: _Service() for name in stack.procs}

    def tick(self) -> None:
        """Look at every service once: notice exits, schedule and make restarts."""
        for name, svc in self.services.items():
            if not svc.given_up:
                self._check(name, svc, self.clock())

    def _check(self, name: str, svc: _Service, now: float) -> None:
        proc = self.stack.procs.get(name)
        if svc.due is not None:
            if now >= svc.due:
                self._restart(name, svc, now)
            return
        if proc is not None and proc.alive():
            if svc.starting_until is None:
                return
            if proc.ready.is_set():
                svc.starting_until = None
                self.say(f"{name} is back (pid {proc.popen.pid}, {proc.address})")
                return
            if now < svc.starting_until:
                return
            proc.popen.kill()
            proc.popen.wait()
            code = None
        else:
            code = proc.popen.returncode if proc is not None else None
        svc.starting_until = None
        while svc.restarts and svc.restarts[0] < now - self.policy.window_s:
            svc.restarts.popleft()
        log = f"; log {proc.log_path}" if proc is not None else ""
        if len(svc.restarts) >= self.policy.max_restarts:
            svc.given_up = True
            self.stack.reap(name)
            self.say(f"{name} {describe_exit(code)}; it crashed {len(svc.restarts) + 1} times within "
                     f"{self.policy.window_s:g}s: giving up on it{log}")
            return
        delay = self.policy.delay(len(svc.restarts))
        svc.due = now + delay
        self.say(f"{name} {describe_exit(code)}; restarting it in {delay:g}s{log}")

    def _restart(self, name: str, svc: _Service, now: float) -> None:
        svc.due = None
        svc.restarts.append(now)
        try:
            self.stack.respawn(name)
        except (RuntimeError, OSError) as exc:  # not started: counts as a crash on the next tick
            self.say(f"{name} did not start again: {str(exc).splitlines()[0]}")
            proc = self.stack.procs.get(name)
            if proc is not None and proc.alive():
                proc.popen.kill()
                proc.popen.wait()
            return
        svc.starting_until = now + self.policy.ready_timeout_s

    @property
    def given_up(self) -> list[str]:
        return [name for name, svc in self.services.items() if svc.given_up]

    def nothing_useful_left(self) -> str | None:
        """Why the stack can no longer serve anything, or None while it can: Redis (when
        embedded), every gateway or every replica given up on. Without the compiler, what is
        published is still served."""
        gone = set(self.given_up)
        if "redis" in gone:
            return "Redis is gone"
        for kind in ("gateway", "serving"):
            names = [n for n in self.services if n.startswith(kind)]
            if names and gone.issuperset(names):
                return f"no {'gateway' if kind == 'gateway' else 'serving replica'} is left"
        return None
