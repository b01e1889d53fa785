"""python -m llamaship.healthcheck HOST:PORT — exit 0 when the service reports SERVING (grpc.health.v1)."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m llamaship.healthcheck HOST:PORT", file=sys.stderr)
        return 2
    try:
        with grpc.insecure_channel(args[0]) as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as exc:
        print(f"{args[0]}: {exc.code().name}", file=sys.stderr)
        return 1
    ok = resp.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{args[0]}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
