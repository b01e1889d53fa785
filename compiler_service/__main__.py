"""python -m compiler_service: the compiler (gRPC API + one compile worker)."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from pathlib import Path

from compiler_service import sources
from compiler_service.jobs import JobStore
from compiler_service.pipeline import CompilePipeline
from compiler_service.servicer import CompilerServicer
from compiler_service.uploads import UploadLimits, UploadStore
from compiler_service.worker import CompileWorker
from shared import config, internal_tls, redis_conn
from shared.grpc_server import add_health_and_reflection, bind, create_server, set_serving
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2, compiler_pb2_grpc
from shared.store import open_store
from shared.resilience import forever
from shared.service import run_service, shutdown_event
from shared.telemetry import start_metrics_server, watch_event_loop

log = logging.getLogger("llamaship.compiler")
SERVICE = compiler_pb2.DESCRIPTOR.services_by_name["Compiler"].full_name


async def sweep_uploads(uploads: UploadStore, interval_s: float) -> None:
    while True:
        try:
            gone = await asyncio.to_thread(uploads.sweep)
            if gone:
                log.info("deleted %d expired upload(s)", len(gone))
        except Exception:  # noqa: BLE001 - retried next round
            log.exception("deleting expired uploads failed")
        await asyncio.sleep(interval_s)


async def serve(settings: config.Settings) -> None:
    internal = internal_tls.from_settings(settings)
    store = open_store(settings).ensure()
    work_dir = Path(settings.work_dir) if settings.work_dir else store.root / ".work"
    work_dir.mkdir(parents=True, exist_ok=True)
    r = redis_conn.connect(settings)
    await redis_conn.wait_ready(r, redis_conn.describe(settings))
    jobs = JobStore(r)
    uploads = UploadStore(store.root, UploadLimits.of(settings))
    roots = sources.parse_roots(settings.checkpoint_roots)
    worker = CompileWorker(jobs, CompilePipeline(store, r, work_dir, uploads, roots),
                           f"{socket.gethostname()}-{os.getpid()}", settings.job_lease_s, settings.max_attempts,
                           settings.job_poll_s)
    recovered = await jobs.recover(settings.max_attempts)
    if recovered:
        log.warning("recovered %d job(s) left by a compiler that stopped", len(recovered))

    server = create_server()
    compiler_pb2_grpc.add_CompilerServicer_to_server(CompilerServicer(jobs, store, uploads, roots), server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind(server, settings.host, settings.compiler_port, internal=internal)
    await server.start()
    await set_serving(health, [SERVICE], True)
    metrics_port = start_metrics_server(settings.host, settings.metrics_port)
    log.info("compiler listening on %s:%d (store %s)%s", settings.host, port, store.describe(),
             f", metrics on :{metrics_port}" if metrics_port else "")
    print(f"LLAMASHIP_READY compiler {settings.host}:{port}", flush=True)

    stop = shutdown_event()
    tasks = [asyncio.create_task(forever("compile worker", worker.run)),
             asyncio.create_task(forever("job recovery", worker.recover_loop)),
             asyncio.create_task(forever("upload expiry", lambda: sweep_uploads(uploads, settings.upload_sweep_s))),
             asyncio.create_task(forever("event loop watch", lambda: watch_event_loop("compiler")))]
    await asyncio.wait([asyncio.create_task(stop.wait()), *tasks], return_when=asyncio.FIRST_COMPLETED)
    for t in tasks:
        if t.done() and t.exception():
            log.error("background task failed", exc_info=t.exception())
    log.info("shutting down")
    await set_serving(health, [SERVICE], False)
    for t in tasks:
        t.cancel()  # a running job's builder is killed; its lease lapses and it is re-run
    await asyncio.gather(*tasks, return_exceptions=True)
    await server.stop(grace=3)
    await r.aclose()


def main(argv: list[str] | None = None) -> int:
    return run_service("compiler", "Compiler service.", config.COMPILER, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
