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


# Distributions that install the same module as another: the GPU builds of ONNX Runtime.
_VARIANTS = {"onnxruntime": ("onnxruntime-gpu",), "onnxruntime-genai": ("onnxruntime-genai-cuda",)}


def package_versions(packages: Sequence[str]) -> dict[str, str]:
    """Installed versions by package name; a GPU variant counts as its package ("1.31.1 (onnxruntime-gpu)"),
    and is preferred where both are installed."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for pkg in packages:
        for dist in (*_VARIANTS.get(pkg, ()), pkg):
            try:
                v = version(dist)
            except PackageNotFoundError:
                continue
            out[pkg] = v if dist == pkg else f"{v} ({dist})"
            break
    return out
