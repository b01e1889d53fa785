"""One way to build a Llamaship gRPC server: error interceptor, health, reflection."""

from __future__ import annotations

from typing import Iterable

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from shared.errors import ErrorInterceptor
from shared.internal_tls import InternalTLS

MAX_MESSAGE_BYTES = 64 * 1024 * 1024


def create_server(extra_interceptors: Iterable[grpc.aio.ServerInterceptor] = ()) -> grpc.aio.Server:
    return grpc.aio.server(
        interceptors=[*extra_interceptors, ErrorInterceptor()],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
        ],
    )


def add_health_and_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> health.aio.HealthServicer:
    names = list(service_names)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    return health_servicer


async def set_serving(health_servicer: health.aio.HealthServicer, service_names: Iterable[str], serving: bool) -> None:
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ["", *service_names]:
        await health_servicer.set(name, status)


def bind(server: grpc.aio.Server, host: str, port: int, tls: tuple[bytes, bytes] | None = None,
         internal: InternalTLS | None = None) -> int:
    """Bind on host:port (0 picks a free port); returns the port. With `tls` (cert chain, key): server TLS
    for public clients; with `internal`: mTLS, only clients with a certificate from the internal CA."""
    if internal is not None:
        bound = server.add_secure_port(f"{host}:{port}", internal.server_credentials())
    elif tls:
        creds = grpc.ssl_server_credentials([(tls[1], tls[0])])
        bound = server.add_secure_port(f"{host}:{port}", creds)
    else:
        bound = server.add_insecure_port(f"{host}:{port}")
    if bound == 0:
        raise OSError(f"cannot bind gRPC server to {host}:{port}")
    return bound
