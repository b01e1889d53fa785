"""Peak memory of a compile: the resident set of the compiler and every process it started
(the GenAI builder child), sampled in a background thread."""

from __future__ import annotations

import threading

import psutil


def tree_rss_bytes(proc: psutil.Process) -> int:
    """RSS of `proc` and its descendants now (processes that end meanwhile count as 0)."""
    total = 0
    for p in (proc, *proc.children(recursive=True)):
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakRss:
    """`with PeakRss() as peak: ...; peak.bytes` — the largest sample seen so far."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.bytes = 0
        self._proc = psutil.Process()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="peak-rss", daemon=True)

    def _sample(self) -> None:
        while True:
            self.bytes = max(self.bytes, tree_rss_bytes(self._proc))
            if self._done.wait(self.interval_s):
                return

    def __enter__(self) -> "PeakRss":
        self.bytes = tree_rss_bytes(self._proc)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
