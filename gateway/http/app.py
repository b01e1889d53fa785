"""The HTTP front's routes (Starlette): a thin layer over gateway.generation, as the gRPC servicer is.

Streams: the first chunk is awaited before the response starts, so that what fails before any
token (a bad request, a full queue, no replica, a prompt too long for the build) is answered with
its HTTP status; what fails later ends the stream with an OpenAI error event. A client that
disconnects, streamed or not, cancels its generation.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from typing import Any, AsyncIterator, Awaitable, TypeVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway import metrics
from gateway.admission import check_request_id, unknown_model
from gateway.auth import KeyStore
from gateway.generation import GenerationCore
from gateway.http.errors import RequestError, Unauthenticated, error_body, error_response
from gateway.http.schemas import FINISH, Answer, Parsed, parse, timings
from shared.errors import Cancelled, LlamashipError, PermissionDenied
from shared.generation import Chunk
from shared.telemetry import request_id_var
from shared.tenancy import OPEN, Caller

log = logging.getLogger("llamaship.gateway.http")
T = TypeVar("T")
MAX_BODY = 8 * 1024 * 1024
TIMING_HEADERS = ("x-llamaship-queue-ms", "x-llamaship-prefill-ms", "x-llamaship-decode-ms")


class ClientGone(Exception):
    pass


def caller_of(keys: KeyStore | None, request: Request, scope: str | None) -> Caller:
    """The key's tenant (as for gRPC: `Authorization: Bearer <key>`, with `scope`)."""
    if keys is None:
        return OPEN
    auth = request.headers.get("authorization", "")
    tenant = keys.tenant_for(auth[len("Bearer "):].strip()) if auth.startswith("Bearer ") else None
    if tenant is None:
        raise Unauthenticated("missing or unknown API key (send 'Authorization: Bearer <key>')")
    if not tenant.allows(scope):
        raise PermissionDenied(f"tenant {tenant.name} lacks the '{scope}' scope")
    return Caller(tenant.name, admin="admin" in tenant.scopes)


def acting_as(caller: Caller, user: str) -> Caller:
    """OpenAI's `user` names the tenant the request is queued and counted under (tenant queue
    limit, fair share of slots, request-id scope): an admin key (or an open gateway, whose one
    caller is admin) may name any tenant, any other key only its own. Model access stays the key's."""
    if not user or user == caller.tenant:
        return caller
    if not caller.admin:
        raise PermissionDenied(f"user: this key may act only for its own tenant {caller.tenant!r} "
                               "(acting for another tenant needs an admin key)")
    check_request_id(user, "user")  # bounded, printable, no spaces: it names Redis keys
    return Caller(user, admin=caller.admin)


async def until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """`work`, unless the client disconnects first: then it is cancelled and ClientGone raised."""
    task = asyncio.ensure_future(work)

    async def gone() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watch = asyncio.ensure_future(gone())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        task.cancel()
        raise
    finally:
        watch.cancel()
    if not task.done():
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):  # noqa: BLE001 - the client is gone; the work stops
            pass
        raise ClientGone()
    return task.result()


def sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


class HttpFront:
    def __init__(self, core: GenerationCore, keys: KeyStore | None):
        self.core = core
        self.keys = keys

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/models", self.models, methods=["GET"]),
            Route("/v1/models/{model:path}", self.model, methods=["GET"]),
            Route("/v1/completions", self.completions, methods=["POST"]),
            Route("/v1/chat/completions", self.chat_completions, methods=["POST"]),
        ], exception_handlers={404: _not_found, 405: _not_allowed})

    # -- models ----------------------------------------------------------------------------
    async def _model_objects(self, request: Request) -> list[dict[str, Any]]:
        views = await self.core.models(caller_of(self.keys, request, None))
        return [{"id": v.alias.name, "object": "model", "created": int(v.alias.published_at),
                 "owned_by": v.access.owner or "llamaship"} for v in views]

    async def models(self, request: Request) -> Response:
        try:
            return JSONResponse({"object": "list", "data": await self._model_objects(request)})
        except LlamashipError as exc:
            return error_response(exc)

    async def model(self, request: Request) -> Response:
        name = request.path_params["model"]
        try:
            for m in await self._model_objects(request):
                if m["id"] == name:
                    return JSONResponse(m)
            raise unknown_model(name)
        except LlamashipError as exc:
            return error_response(exc)

    # -- generation ------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        return await self._generate(request, "completion")

    async def chat_completions(self, request: Request) -> Response:
        return await self._generate(request, "chat")

    async def _generate(self, request: Request, kind: str) -> Response:
        try:
            rid = check_request_id(request.headers.get("x-request-id", "")) or uuid.uuid4().hex
            request_id_var.set(rid)
            caller = caller_of(self.keys, request, "generate")
            parsed = parse(await _json(request), kind, rid)
            caller = acting_as(caller, parsed.user)
            chunks = self.core.generate(parsed.req, caller, None)
            answer = Answer(kind, rid, parsed.req.model)
            try:
                first = await until_disconnect(request, _next(chunks))
            except ClientGone:
                log.info("client went away before the first token; request cancelled")
                return Response(status_code=499)
            if parsed.stream:
                return StreamingResponse(self._events(answer, parsed, first, chunks), media_type="text/event-stream",
                                         headers={"x-request-id": rid, "cache-control": "no-cache"})
            try:
                text, end = await until_disconnect(request, _collect(first, chunks))
            except ClientGone:
                log.info("client went away; request cancelled")
                return Response(status_code=499)
            headers = {"x-request-id": rid} | dict(zip(TIMING_HEADERS, (f"{v:.1f}" for v in timings(end).values())))
            return JSONResponse(answer.whole(text, end), headers=headers)
        except LlamashipError as exc:
            metrics.REJECTS.labels(exc.code.name).inc()
            return error_response(exc)

    async def _events(self, answer: Answer, parsed: Parsed, first: tuple[str, Chunk],
                      chunks: AsyncIterator[tuple[str, Chunk]]) -> AsyncIterator[bytes]:
        """SSE: text pieces, a piece with finish_reason and the request's `timings` (an extension),
        the usage piece if asked for, then [DONE]. A client that disconnects cancels the generation
        (Starlette cancels this iterator; the core's relay withdraws the request)."""
        usage_on = parsed.include_usage
        try:
            chunk = first[1]
            opened = False
            while True:
                if chunk.kind == "end":
                    if chunk.text or not opened:
                        yield sse(answer.piece(chunk.text, None, usage_on, first=not opened))
                    last = answer.piece("", FINISH[chunk.finish_reason], usage_on)
                    last["timings"] = timings(chunk)
                    yield sse(last)
                    if usage_on:
                        yield sse(answer.usage_piece(chunk))
                    yield b"data: [DONE]\n\n"
                    return
                yield sse(answer.piece(chunk.text, None, usage_on, first=not opened))
                opened = True
                chunk = (await anext(chunks))[1]
        except LlamashipError as exc:
            metrics.REJECTS.labels(exc.code.name).inc()
            yield sse(error_body(exc)[1])
        finally:
            await chunks.aclose()


async def _collect(first: tuple[str, Chunk], chunks: AsyncIterator[tuple[str, Chunk]]) -> tuple[str, Chunk]:
    parts = [first[1].text]
    end = first[1]
    async for _, chunk in chunks:
        parts.append(chunk.text)
        end = chunk
    if end.kind != "end":  # the relay ends with the end chunk or raises; this is a broken invariant
        raise Cancelled("the stream ended without its end chunk")
    return "".join(parts), end


async def _json(request: Request) -> Any:
    if "json" not in request.headers.get("content-type", "application/json"):
        raise RequestError("the request body must be JSON (Content-Type: application/json)")
    body = await request.body()
    if len(body) > MAX_BODY:
        raise RequestError(f"the request body is larger than {MAX_BODY >> 20} MiB")
    try:
        return json.loads(body)
    except ValueError as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})") from None


async def _not_found(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": {"message": f"no route {request.url.path}", "type": "invalid_request_error",
                                   "param": None, "code": "unknown_url"}}, status_code=404)


async def _not_allowed(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": {"message": f"{request.method} is not allowed on {request.url.path}",
                                   "type": "invalid_request_error", "param": None, "code": "method_not_allowed"}},
                        status_code=405)


async def _next(chunks: AsyncIterator[tuple[str, Chunk]]) -> tuple[str, Chunk]:
    return await anext(chunks)
