"""The error interceptor maps every kind of call (unary or streaming either way) the same way:
domain errors to their status, undecodable requests to INVALID_ARGUMENT, anything else to INTERNAL,
never with class names, tracebacks or server paths."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from shared.errors import AlreadyExists, NotFound
from shared.grpc_server import create_server
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2 as pb

SERVICE = "llamaship.test.v1.Probe"
REQ, RESP = pb.GenerateRequest, pb.GenerateChunk


def _outcome(request_model: str) -> pb.GenerateChunk:
    if request_model == "conflict":
        raise AlreadyExists("upload conflict")
    if request_model == "crash":
        raise RuntimeError("/srv/secret/path exploded")
    if request_model == "long":
        raise NotFound(f"model {'x' * 100_000} not found")  # a message that forgot shown()
    return RESP(text="ok:" + request_model)


async def _uu(request, context):
    return _outcome(request.model)


async def _us(request, context):
    yield RESP(text="first")
    yield _outcome(request.model)


async def _su(requests, context):
    last = None
    async for request in requests:
        last = _outcome(request.model)
    return last


async def _ss(requests, context):
    async for request in requests:
        yield _outcome(request.model)


def _handler() -> grpc.GenericRpcHandler:
    des, ser = REQ.FromString, RESP.SerializeToString
    return grpc.method_handlers_generic_handler(SERVICE, {
        "UU": grpc.unary_unary_rpc_method_handler(_uu, des, ser),
        "US": grpc.unary_stream_rpc_method_handler(_us, des, ser),
        "SU": grpc.stream_unary_rpc_method_handler(_su, des, ser),
        "SS": grpc.stream_stream_rpc_method_handler(_ss, des, ser),
    })


async def _call(kind: str, payload: bytes) -> tuple[grpc.StatusCode, str]:
    server = create_server()
    server.add_generic_rpc_handlers((_handler(),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as ch:
            method = f"/{SERVICE}/{kind}"
            ok = REQ(model="fine").SerializeToString()
            try:
                if kind == "UU":
                    await ch.unary_unary(method)(payload)
                elif kind == "US":
                    async for _ in ch.unary_stream(method)(payload):
                        pass
                elif kind == "SU":
                    await ch.stream_unary(method)(iter([ok, payload]))
                else:
                    async for _ in ch.stream_stream(method)(iter([ok, payload])):
                        pass
            except grpc.aio.AioRpcError as exc:
                return exc.code(), exc.details() or ""
            return grpc.StatusCode.OK, ""
    finally:
        await server.stop(0)


KINDS = ("UU", "US", "SU", "SS")


@pytest.mark.parametrize("kind", KINDS)
def test_domain_errors_keep_their_status_on_every_kind_of_call(kind):
    code, details = asyncio.run(_call(kind, REQ(model="conflict").SerializeToString()))
    assert (code, details) == (grpc.StatusCode.ALREADY_EXISTS, "upload conflict")


@pytest.mark.parametrize("kind", KINDS)
def test_unexpected_errors_are_internal_without_class_or_path(kind):
    code, details = asyncio.run(_call(kind, REQ(model="crash").SerializeToString()))
    assert code == grpc.StatusCode.INTERNAL
    assert "RuntimeError" not in details and "/srv/secret" not in details and "class" not in details


@pytest.mark.parametrize("kind", KINDS)
def test_corrupt_protobuf_is_invalid_argument_without_class_names(kind):
    code, details = asyncio.run(_call(kind, b"\xff\xff\xff\xff"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "class" not in details and "DecodeError" not in details and "protobuf" in details


def test_a_long_message_is_cut_instead_of_changing_the_status():
    code, details = asyncio.run(_call("UU", REQ(model="long").SerializeToString()))
    assert code == grpc.StatusCode.NOT_FOUND and len(details) <= 1000
