"""python -m llamaship.healthcheck [--internal-tls] HOST:PORT — exit 0 when the service reports SERVING
(grpc.health.v1). --internal-tls: call a compiler or replica over mTLS with the LLAMASHIP_INTERNAL_TLS_* files."""

from __future__ import annotations

import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    internal = "--internal-tls" in args
    args = [a for a in args if a != "--internal-tls"]
    if len(args) != 1:
        print("usage: python -m llamaship.healthcheck [--internal-tls] HOST:PORT", file=sys.stderr)
        return 2
    if internal:
        from shared import config, internal_tls

        tls = internal_tls.from_settings(config.resolve(config.INTERNAL_TLS))
        if tls is None:
            print("--internal-tls needs LLAMASHIP_INTERNAL_TLS_CA, _CERT and _KEY", file=sys.stderr)
            return 2
        channel = grpc.secure_channel(args[0], tls.channel_credentials(), options=tls.channel_options())
    else:
        channel = grpc.insecure_channel(args[0])
    try:
        with channel as ch:
            resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=3)
    except grpc.RpcError as exc:
        print(f"{args[0]}: {exc.code().name}", file=sys.stderr)
        return 1
    ok = resp.status == health_pb2.HealthCheckResponse.SERVING
    print(f"{args[0]}: {health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
