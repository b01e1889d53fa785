"""Llamaship's errors as OpenAI-shaped HTTP answers: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import math

import grpc
from starlette.responses import JSONResponse

from shared.errors import MAX_DETAILS, LlamashipError

# gRPC status -> (HTTP status, OpenAI error type)
STATUS: dict[grpc.StatusCode, tuple[int, str]] = {
    grpc.StatusCode.INVALID_ARGUMENT: (400, "invalid_request_error"),
    grpc.StatusCode.FAILED_PRECONDITION: (400, "invalid_request_error"),  # e.g. chat with a build without a template
    grpc.StatusCode.UNAUTHENTICATED: (401, "authentication_error"),
    grpc.StatusCode.PERMISSION_DENIED: (403, "permission_error"),
    grpc.StatusCode.NOT_FOUND: (404, "not_found_error"),
    grpc.StatusCode.ALREADY_EXISTS: (409, "conflict_error"),
    grpc.StatusCode.RESOURCE_EXHAUSTED: (429, "rate_limit_error"),
    grpc.StatusCode.CANCELLED: (499, "cancelled"),
    grpc.StatusCode.UNAVAILABLE: (503, "service_unavailable"),
    grpc.StatusCode.DEADLINE_EXCEEDED: (504, "timeout"),
}


class Unauthenticated(LlamashipError):
    code = grpc.StatusCode.UNAUTHENTICATED


class RequestError(LlamashipError):
    """A bad request body: 400 naming the parameter (OpenAI's `param`)."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.param = param
        self.error_code = code


def error_body(exc: LlamashipError) -> tuple[int, dict]:
    status, kind = STATUS.get(exc.code, (500, "server_error"))
    message = exc.message if len(exc.message) <= MAX_DETAILS else exc.message[: MAX_DETAILS - 1] + "…"
    code = getattr(exc, "error_code", None)
    if code is None and status == 404 and message.startswith("model "):
        code = "model_not_found"
    return status, {"error": {"message": message, "type": kind, "param": getattr(exc, "param", None),
                              "code": code or exc.code.name.lower()}}


def error_response(exc: LlamashipError) -> JSONResponse:
    status, body = error_body(exc)
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
        headers["retry-after-ms"] = str(int(exc.retry_after_s * 1000))
    return JSONResponse(body, status_code=status, headers=headers)
