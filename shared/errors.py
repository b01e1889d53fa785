"""Domain errors and their one mapping to gRPC status codes.

Core modules raise these; servicers let them propagate, and `ErrorInterceptor` turns them into
the right status. Anything else becomes INTERNAL with the traceback logged, never sent.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Awaitable, Callable

import grpc
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

log = logging.getLogger("llamaship.errors")


class LlamashipError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, *, retry_after_s: float | None = None):
        super().__init__(message)
        self.message = message
        self.retry_after_s = retry_after_s


class InvalidArgument(LlamashipError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(LlamashipError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(LlamashipError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LlamashipError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(LlamashipError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class AlreadyExists(LlamashipError):
    code = grpc.StatusCode.ALREADY_EXISTS


class Cancelled(LlamashipError):
    code = grpc.StatusCode.CANCELLED


class PermissionDenied(LlamashipError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(LlamashipError):
    code = grpc.StatusCode.FAILED_PRECONDITION


def shown(value: object, limit: int = 80) -> str:
    """A caller's input as an error message may echo it: repr, cut to `limit` characters."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


_BY_CODE_NAME = {cls.code.name: cls for cls in LlamashipError.__subclasses__()}


def from_code_name(name: str, message: str) -> LlamashipError:
    """Rebuild an error that crossed Redis as (code name, message)."""
    return _BY_CODE_NAME.get(name, LlamashipError)(message)


def trailing_metadata(err: LlamashipError) -> tuple[tuple[str, str], ...]:
    if err.retry_after_s is None:
        return ()
    return (("retry-after-ms", str(int(err.retry_after_s * 1000))),)


MAX_DETAILS = 1000


class _Undecodable:
    """What a request that is not a valid protobuf of its method's type decodes to."""


_UNDECODABLE = _Undecodable()


def _tolerant(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    """grpc answers a deserializer's exception with UNKNOWN and the exception's class: decode to a
    marker instead, which the handler turns into INVALID_ARGUMENT."""
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception:  # noqa: BLE001 - any decoding failure is the caller's bad bytes
            return _UNDECODABLE

    return decode


def _check(request: Any) -> None:
    if request is _UNDECODABLE:
        raise InvalidArgument("the request is not a valid protobuf message of this method's type")


async def _checked(requests: AsyncIterator[Any]) -> AsyncIterator[Any]:
    async for request in requests:
        _check(request)
        yield request


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        log.warning("%s: Redis unreachable: %s", method, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the queue (Redis) is unreachable; the request may be retried")
    if isinstance(exc, LlamashipError):
        md = trailing_metadata(exc)
        if md:
            context.set_trailing_metadata(md)
        message = exc.message if len(exc.message) <= MAX_DETAILS else exc.message[: MAX_DETAILS - 1] + "…"
        await context.abort(exc.code, message)
    log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


_PASS = (grpc.aio.AbortError, grpc.aio.UsageError)


def _wrap(handler: grpc.RpcMethodHandler, method: str) -> grpc.RpcMethodHandler:
    decode, encode = _tolerant(handler.request_deserializer), handler.response_serializer
    if handler.unary_unary:
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            try:
                _check(request)
                return await inner_uu(request, context)
            except _PASS:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the last resort
                await _abort(context, exc, method)

        return grpc.unary_unary_rpc_method_handler(unary_unary, decode, encode)
    if handler.unary_stream:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            try:
                _check(request)
                async for item in inner_us(request, context):
                    yield item
            except _PASS:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the last resort
                await _abort(context, exc, method)

        return grpc.unary_stream_rpc_method_handler(unary_stream, decode, encode)
    if handler.stream_unary:
        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            try:
                return await inner_su(_checked(requests), context)
            except _PASS:
                raise
            except Exception as exc:  # noqa: BLE001 - this is the last resort
                await _abort(context, exc, method)

        return grpc.stream_unary_rpc_method_handler(stream_unary, decode, encode)
    inner_ss = handler.stream_stream

    async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in inner_ss(_checked(requests), context):
                yield item
        except _PASS:
            raise
        except Exception as exc:  # noqa: BLE001 - this is the last resort
            await _abort(context, exc, method)

    return grpc.stream_stream_rpc_method_handler(stream_stream, decode, encode)


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The last-resort mapping, for every kind of call: domain errors to their status, requests that
    do not decode to INVALID_ARGUMENT, everything else to INTERNAL (no class names, no paths)."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/llamaship."):
            return handler
        return _wrap(handler, method)
