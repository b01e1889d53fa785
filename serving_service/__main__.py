"""python -m serving_service --pool cpu: one serving replica."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import time

from shared import catalog, config, cpu_budget, internal_tls, redis_conn
from shared.grpc_server import add_health_and_reflection, bind, create_server, set_serving
from shared.proto_gen.llamaship.serving.v1 import serving_pb2, serving_pb2_grpc
from shared.store import open_store
from shared.resilience import forever
from shared.service import run_service, shutdown_event
from shared.telemetry import start_metrics_server
from serving_service import metrics
from serving_service.build_watcher import BuildWatcher
from serving_service.engine import Engine
from serving_service.queue_worker import QueueWorker
from serving_service.servicer import ServingServicer

log = logging.getLogger("llamaship.serving")
SERVICE = serving_pb2.DESCRIPTOR.services_by_name["Serving"].full_name
HEARTBEAT_FAILURE_LOG_S = 60.0  # a failing heartbeat is logged at once, then at most this often


def kv_budget_bytes(budget_mb: int) -> int:
    if budget_mb:
        return budget_mb << 20
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4


async def serve(settings: config.Settings) -> None:
    internal = internal_tls.from_settings(settings)
    store = open_store(settings).ensure()
    r = redis_conn.connect(settings)
    await redis_conn.wait_ready(r, redis_conn.describe(settings))
    threads = settings.threads or cpu_budget.decode_threads()  # the CPUs a container really has (quota, affinity)
    engine = Engine(store, settings.pool, settings.slots, threads, kv_budget_bytes(settings.kv_budget_mb),
                    serving_engine=settings.serving_engine, prefix_cache_mb=settings.prefix_cache_mb)

    server = create_server()
    replica_id = settings.replica_id or f"{settings.pool}-{socket.gethostname()}-{os.getpid()}"
    servicer = ServingServicer(engine, replica_id)
    serving_pb2_grpc.add_ServingServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind(server, settings.host, settings.serving_port, internal=internal)
    address = settings.advertise_address or f"{settings.host}:{port}"
    await server.start()
    await set_serving(health, [SERVICE], False)
    metrics_port = start_metrics_server(settings.host, settings.metrics_port)

    async def heartbeat() -> None:
        hb = catalog.ReplicaHeartbeat(replica_id, settings.pool, address, engine.slots, engine.active, engine.served())
        metrics.ACTIVE.labels(settings.pool).set(engine.active)
        metrics.KV_RESERVED.labels(settings.pool).set(worker.kv_reserved_bytes() if worker else 0)
        await catalog.put_heartbeat(r, hb, alive_s=settings.replica_stale_s)

    worker: QueueWorker | None = None
    watcher = BuildWatcher(r, engine, on_change=heartbeat)
    await watcher.load_current()
    await heartbeat()
    worker = QueueWorker(r, engine, replica_id, settings.stream_interval_ms / 1000, settings.tenant_fair_slots,
                         settings.tenant_headroom_s, settings.prefix_grace_ms / 1000, settings.redis_lost_wait_s)
    await set_serving(health, [SERVICE], True)
    log.info("replica %s (pool %s) listening on %s:%d%s; serving %s", replica_id, settings.pool, settings.host, port,
             f", metrics on :{metrics_port}" if metrics_port else "", engine.served() or "nothing yet")
    print(f"LLAMASHIP_READY serving {settings.host}:{port}", flush=True)

    async def heartbeat_loop() -> None:
        failing_since: float | None = None
        logged_at = 0.0
        while True:
            await asyncio.sleep(settings.heartbeat_s)
            try:
                await heartbeat()
            except Exception as exc:  # noqa: BLE001 - retried at the next beat; gateways see the replica gone meanwhile
                now = time.monotonic()
                failing_since = failing_since or now
                if now - logged_at >= HEARTBEAT_FAILURE_LOG_S:
                    logged_at = now
                    log.warning("heartbeat failing for %.0fs (%s: %s); other replicas take over this replica's "
                                "requests once it has failed for --replica-stale-s", now - failing_since,
                                type(exc).__name__, exc)
                continue
            if failing_since is not None:
                log.info("heartbeat restored after %.0fs", time.monotonic() - failing_since)
                failing_since, logged_at = None, 0.0

    stop = shutdown_event()
    intake = [asyncio.create_task(forever("queue worker", worker.run)),
              asyncio.create_task(forever("build watcher", watcher.follow)),
              asyncio.create_task(forever("reclaim", worker.reclaim_loop))]
    beat = asyncio.create_task(heartbeat_loop())
    done, _ = await asyncio.wait([asyncio.create_task(stop.wait()), *intake, beat], return_when=asyncio.FIRST_COMPLETED)
    for t in done:
        if t in (*intake, beat) and t.exception():
            log.error("background task failed", exc_info=t.exception())
    log.info("shutting down: no new work taken, finishing running streams")
    await set_serving(health, [SERVICE], False)
    for t in intake:
        t.cancel()
    await worker.drain(timeout_s=30)  # the heartbeat goes on meanwhile: gateways see this replica alive
    beat.cancel()
    await catalog.remove_heartbeat(r, replica_id)
    await server.stop(grace=5)
    engine.close()
    await r.aclose()


def main(argv: list[str] | None = None) -> int:
    return run_service("serving", "Serving replica for one hardware pool.", config.SERVING, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
