"""python -m gateway: the front door."""

from __future__ import annotations

import asyncio
import logging
import sys
from pathlib import Path

from gateway.auth import AuthInterceptor, KeyStore, KeysFileError
from gateway.gen_queue import GenerationQueue
from gateway.generation import GenerationCore
from gateway.http.server import HttpServer
from gateway.servicer import GatewayServicer
from shared import config, internal_tls, redis_conn
from shared.grpc_server import add_health_and_reflection, bind, create_server, set_serving
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2_grpc
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from shared.service import run_service, shutdown_event
from shared.telemetry import start_metrics_server

log = logging.getLogger("llamaship.gateway")
SERVICE = gateway_pb2.DESCRIPTOR.services_by_name["Gateway"].full_name


async def serve(settings: config.Settings) -> None:
    internal = internal_tls.from_settings(settings)
    r = redis_conn.connect(settings)
    await redis_conn.wait_ready(r, redis_conn.describe(settings))
    channel = internal_tls.channel(settings.compiler_address, internal)
    queue = GenerationQueue(r, settings.queue_max_depth, settings.queue_timeout_s, settings.failover_timeout_s,
                            settings.tenant_max_requests, settings.relay_lease_s, settings.prefix_route_chars)
    interceptors = []
    keys = None
    if settings.api_keys_file:
        try:
            keys = KeyStore.load(settings.api_keys_file)
        except KeysFileError as exc:
            raise RuntimeError(str(exc)) from None
        interceptors.append(AuthInterceptor(keys))
        log.info("API keys required (%d keys from %s)", len(keys.by_hash), settings.api_keys_file)
    tls = None
    if settings.tls_cert_file or settings.tls_key_file:
        if not (settings.tls_cert_file and settings.tls_key_file):
            raise RuntimeError("TLS needs both --tls-cert-file and --tls-key-file")
        tls = (Path(settings.tls_cert_file).read_bytes(), Path(settings.tls_key_file).read_bytes())
    core = GenerationCore(r, queue)
    servicer = GatewayServicer(core, compiler_pb2_grpc.CompilerStub(channel), keys)
    server = create_server(interceptors)
    gateway_pb2_grpc.add_GatewayServicer_to_server(servicer, server)
    health = add_health_and_reflection(server, [SERVICE])
    port = bind(server, settings.host, settings.gateway_port, tls)
    await server.start()
    http = None
    if settings.http_port:
        http = HttpServer(core, keys, settings.host, settings.http_port, settings.tls_cert_file, settings.tls_key_file)
        log.info("OpenAI-compatible HTTP front on %s:%d", settings.host, await http.start())
    await set_serving(health, [SERVICE], True)
    metrics_port = start_metrics_server(settings.host, settings.metrics_port)
    if not settings.api_keys_file:
        log.warning("no API keys configured: the gateway is open to anyone who can reach %s", settings.host)
    log.info("gateway listening on %s:%d (compiler at %s)%s", settings.host, port, settings.compiler_address,
             f", metrics on :{metrics_port}" if metrics_port else "")
    if http is not None:
        print(f"LLAMASHIP_HTTP {settings.host}:{http.port}", flush=True)
    print(f"LLAMASHIP_READY gateway {settings.host}:{port}", flush=True)

    stop = shutdown_event()
    await stop.wait()
    log.info("shutting down: finishing open streams")
    await set_serving(health, [SERVICE], False)
    await asyncio.gather(server.stop(grace=10), *([http.stop()] if http is not None else []))
    await channel.close()
    await r.aclose()


def main(argv: list[str] | None = None) -> int:
    return run_service("gateway", "Gateway: the one front door.", config.GATEWAY, serve, argv)


if __name__ == "__main__":
    sys.exit(main())
