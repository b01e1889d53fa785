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


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException, method: str) -> None:
    if isinstance(exc, (RedisConnectionError, RedisTimeoutError)):
        log.warning("%s: Redis unreachable: %s", method, exc)
        await context.abort(grpc.StatusCode.UNAVAILABLE, "the queue (Redis) is unreachable; the request may be retried")
    if isinstance(exc, LlamashipError):
        md = trailing_metadata(exc)
        if md:
            context.set_trailing_metadata(md)
        await context.abort(exc.code, exc.message)
    log.error("unhandled error in %s", method, exc_info=exc)
    await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}; see the server log")


class ErrorInterceptor(grpc.aio.ServerInterceptor):
    """The last-resort mapping: domain errors to their status, everything else to INTERNAL."""

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith("/llamaship."):
            return handler
        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                try:
                    return await inner_uu(request, context)
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as exc:  # noqa: BLE001 - this is the last resort
                    await _abort(context, exc, method)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                try:
                    async for item in inner_us(request, context):
                        yield item
                except (grpc.aio.AbortError, grpc.aio.UsageError):
                    raise
                except Exception as exc:  # noqa: BLE001 - this is the last resort
                    await _abort(context, exc, method)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
