"""What every service's entry point does: settings, logging, run until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import signal
from typing import Awaitable, Callable, Sequence

from shared import config
from shared.telemetry import setup_logging


def shutdown_event() -> asyncio.Event:
    """An event set by SIGINT or SIGTERM (call inside the running loop)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


def run_service(
    service: str,
    description: str,
    names: Sequence[str],
    serve: Callable[[config.Settings], Awaitable[None]],
    argv: list[str] | None = None,
) -> int:
    """Parse and validate the settings, set up logging, run `serve`; a start-up RuntimeError
    (Redis unreachable, port taken) is one log line and exit status 1."""
    settings = config.parse_service_args(f"llamaship-{service}", description, names, argv)
    setup_logging(service, settings.log_level)
    try:
        asyncio.run(serve(settings))
    except (RuntimeError, OSError) as exc:
        logging.getLogger(f"llamaship.{service}").error("%s", exc)
        return 1
    return 0


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out
