"""Logging with the request id, Prometheus metrics endpoint."""

from __future__ import annotations

import contextvars
import logging
import sys

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")


class _RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id_var.get()
        return True


def setup_logging(service: str, level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_RequestIdFilter())
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s %(levelname)s {service} [%(request_id)s] %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def start_metrics_server(host: str, port: int) -> int | None:
    """Serve Prometheus /metrics on host:port; returns the port, or None when disabled (0)."""
    if not port:
        return None
    from prometheus_client import start_http_server

    start_http_server(port, addr=host)
    return port


async def watch_event_loop(service: str, interval_s: float = 0.25, stall_s: float = 5.0) -> None:
    """Measure how late the event loop wakes (work that holds the loop or the GIL) into
    `llamaship_event_loop_lag_seconds`; a loop held for `stall_s` or more has every thread's
    Python stack written to stderr (the service's log) by faulthandler's own C watchdog thread,
    which needs neither the loop nor the GIL, so the stack shows what held it."""
    import asyncio
    import faulthandler
    import time

    from prometheus_client import Histogram

    lag = _loop_lag_histogram(Histogram)
    log = logging.getLogger("llamaship.telemetry")
    try:
        while True:
            faulthandler.dump_traceback_later(stall_s, exit=False)
            t0 = time.perf_counter()
            await asyncio.sleep(interval_s)
            late = time.perf_counter() - t0 - interval_s
            lag.labels(service).observe(max(0.0, late))
            if late >= stall_s:
                log.warning("%s: the event loop was held for %.1f s (stacks above)", service, late)
    finally:
        faulthandler.cancel_dump_traceback_later()


_LAG = None


def _loop_lag_histogram(histogram):
    global _LAG
    if _LAG is None:
        _LAG = histogram("llamaship_event_loop_lag_seconds", "How late the event loop woke: time something else held it",
                         ["service"], buckets=(0.001, 0.005, 0.02, 0.1, 0.5, 1, 5, 30))
    return _LAG
