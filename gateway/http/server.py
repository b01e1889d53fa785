"""Serving the HTTP front with uvicorn inside the gateway's event loop (beside the gRPC server)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Iterator

import uvicorn

from gateway.auth import KeyStore
from gateway.generation import GenerationCore
from gateway.http.app import HttpFront

log = logging.getLogger("llamaship.gateway.http")


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:  # the gateway handles SIGTERM/SIGINT itself
        yield


class HttpServer:
    def __init__(self, core: GenerationCore, keys: KeyStore | None, host: str, port: int,
                 tls_cert_file: str = "", tls_key_file: str = ""):
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.sock.bind((host, port))
        except OSError as exc:
            self.sock.close()
            raise RuntimeError(f"the HTTP front cannot bind {host}:{port}: {exc}") from None
        self.sock.listen(1024)
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(HttpFront(core, keys).app(), lifespan="off", access_log=False, log_config=None,
                                ssl_certfile=tls_cert_file or None, ssl_keyfile=tls_key_file or None,
                                timeout_graceful_shutdown=10)
        self.server = _Server(config)
        self.task: asyncio.Task | None = None

    async def start(self) -> int:
        self.task = asyncio.get_running_loop().create_task(self.server.serve(sockets=[self.sock]))
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("the HTTP front stopped while starting")
            await asyncio.sleep(0.02)
        return self.port

    async def stop(self) -> None:
        self.server.should_exit = True
        if self.task is not None:
            await self.task
        self.sock.close()
