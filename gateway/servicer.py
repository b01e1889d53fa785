"""gRPC servicer of the gateway: converts protos, calls the queue/catalog/compiler, converts back."""

from __future__ import annotations

import asyncio
import logging
import secrets
import math
import re
import time
import uuid
from typing import AsyncIterator

import grpc
import redis.asyncio as aioredis

from gateway import metrics
from gateway.auth import KeyStore, bearer_key
from gateway.gen_queue import GenerationQueue
from shared import catalog, prompt_samples
from shared.prompt_samples import PromptSampler
from shared import redis_keys as keys
from shared.fair_queue import DEFAULT_TENANT
from shared.errors import InvalidArgument, LlamashipError, NotFound, Unavailable, from_code_name
from shared.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, GenRequest, validate
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2, compiler_pb2_grpc
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2 as pb
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2_grpc as pb_grpc
from shared.telemetry import request_id_var

log = logging.getLogger("llamaship.gateway")
FINISH_TO_PROTO = {FINISH_LENGTH: pb.FINISH_REASON_LENGTH, FINISH_EOS: pb.FINISH_REASON_EOS, FINISH_STOP: pb.FINISH_REASON_STOP}
MAX_REQUEST_ID = 128
_CURSOR = re.compile(r"\d{1,20}-\d{1,20}")
PRIORITY_FROM_PROTO = {pb.PRIORITY_UNSPECIFIED: "interactive", pb.PRIORITY_INTERACTIVE: "interactive",
                       pb.PRIORITY_BATCH: "batch"}


def request_from_proto(m: pb.GenerateRequest, request_id: str) -> GenRequest:
    for name in ("temperature", "top_p"):
        if m.HasField(name) and not math.isfinite(getattr(m, name)):
            raise InvalidArgument(f"{name}: must be finite")
    return GenRequest(
        request_id=request_id,
        model=m.model,
        prompt=m.prompt,
        max_tokens=m.max_tokens,
        temperature=m.temperature if m.HasField("temperature") else 0.0,
        top_p=m.top_p if m.HasField("top_p") else 1.0,
        top_k=m.top_k if m.HasField("top_k") else 0,
        seed=m.seed if m.HasField("seed") else None,
        stop=list(m.stop),
        priority=PRIORITY_FROM_PROTO[m.priority],
    )


def _request_id(m: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> str:
    rid = m.request_id or dict(context.invocation_metadata() or ()).get("x-request-id", "")
    if len(rid) > MAX_REQUEST_ID or any(c.isspace() for c in rid):
        raise InvalidArgument("request_id: at most 128 characters, no spaces")
    return rid or uuid.uuid4().hex


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, r: aioredis.Redis, queue: GenerationQueue, compiler: compiler_pb2_grpc.CompilerStub,
                 replica_stale_s: float, keys: KeyStore | None = None):
        self.r = r
        self.keys = keys
        self.sampler = PromptSampler(r)
        self._background: set[asyncio.Task] = set()
        self.queue = queue
        self.compiler = compiler
        self.replica_stale_s = replica_stale_s

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async for chunk in self._generate(request, context):
                yield chunk
        except LlamashipError as exc:
            metrics.REJECTS.labels(exc.code.name).inc()
            raise

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        rid = _request_id(request, context)
        request_id_var.set(rid)
        if request.resume_cursor:
            async for out in self._resume(request, rid, context):
                yield out
            return
        if request.priority not in PRIORITY_FROM_PROTO:
            raise InvalidArgument(f"priority: unknown value {request.priority}")
        req = request_from_proto(request, rid)
        req.tenant = self._tenant(context)
        if not req.model:
            raise InvalidArgument("model: required")
        alias, replicas = await catalog.alias_and_replicas(self.r, req.model, self.replica_stale_s)
        if alias is None:
            raise NotFound(f"model {req.model!r} not found; `llamaship models` lists what is served")
        validate(req, alias.context_length)
        if not req.greedy and req.seed is None:
            # A fixed seed makes a sampled stream replayable: a replica that takes it over after
            # a failure continues it exactly.
            req.seed = secrets.randbits(31)
        remaining = context.time_remaining()
        if remaining is not None:
            req.deadline = time.time() + remaining
        if not [hb for hb in replicas if hb.pool == alias.pool]:
            raise Unavailable(f"no live replica in the {alias.pool} pool; the request may be retried")
        entry = await self.queue.enqueue(req, alias.pool, alias.context_length)
        metrics.REQUESTS.labels(alias.pool, req.priority).inc()
        self._sample(req.model, req.prompt)
        async for out in self._relay(rid, alias.pool, entry, "0-0"):
            yield out

    async def _resume(self, request: pb.GenerateRequest, rid: str, context) -> AsyncIterator[pb.GenerateChunk]:
        if not request.request_id or not _CURSOR.fullmatch(request.resume_cursor):
            raise InvalidArgument("resume_cursor: needs the request_id and a cursor from one of its chunks")
        entry = await self.queue.find(rid, self._tenant(context))
        if entry is None:
            raise NotFound(f"no stream of request {rid!r} to resume: unknown, finished, or stopped unrelayed")
        log.info("resuming the stream after %s", request.resume_cursor)
        async for out in self._relay(rid, keys.gen_stream_pool(entry.stream), entry, request.resume_cursor):
            yield out

    async def _relay(self, rid: str, pool: str, entry, after: str) -> AsyncIterator[pb.GenerateChunk]:
        t0 = time.perf_counter()
        finished = False
        first = True
        last_at = t0
        try:
            async for cursor, chunk in self.queue.responses(rid, pool, entry, after):
                if chunk.kind == "error":
                    finished = True
                    raise from_code_name(chunk.error_code, chunk.error_message)
                now = time.perf_counter()
                if first:
                    metrics.TTFT.labels(pool).observe(now - t0)
                    first = False
                elif chunk.token_ids:
                    per_token = (now - last_at) / len(chunk.token_ids)
                    for _ in chunk.token_ids:
                        metrics.INTER_TOKEN.labels(pool).observe(per_token)
                last_at = now
                out = pb.GenerateChunk(request_id=rid, text=chunk.text, token_ids=chunk.token_ids,
                                       build_id=chunk.build_id, cursor=cursor)
                if chunk.kind == "end":
                    finished = True
                    out.finish_reason = FINISH_TO_PROTO[chunk.finish_reason]
                    out.usage.prompt_tokens = chunk.prompt_tokens
                    out.usage.completion_tokens = chunk.completion_tokens
                    metrics.TOKENS.labels(pool).inc(chunk.completion_tokens)
                if out.text or out.token_ids or chunk.kind == "end":
                    yield out
        except (asyncio.CancelledError, GeneratorExit):
            log.info("client went away; cancelling the request")
            raise
        finally:
            if not finished:
                await asyncio.shield(self.queue.abandon(rid, entry))
            depth = await asyncio.shield(self.queue.depth(pool))
            for priority, n in depth.items():
                metrics.QUEUE_DEPTH.labels(pool, priority).set(n)

    def _sample(self, model: str, prompt: str) -> None:
        """Offer the prompt to the model's sample (if it opted in), off the request's path."""
        async def offer() -> None:
            try:
                await self.sampler.offer(model, prompt, time.monotonic())
            except Exception as exc:  # noqa: BLE001 - sampling must never fail a request; the prompt is not logged
                log.warning("prompt sampling failed: %s", type(exc).__name__)

        task = asyncio.get_running_loop().create_task(offer())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def SetPromptSampling(self, request: pb.PromptSampling, context) -> pb.PromptSampling:
        if await catalog.get_alias(self.r, request.model) is None:
            raise NotFound(f"model {request.model!r} not found")
        settings = prompt_samples.SamplingSettings(
            enabled=request.enabled, rate=request.rate or 1.0, max_prompts=request.max_prompts or 256,
            max_chars=request.max_chars or 4000)
        await prompt_samples.set_settings(self.r, request.model, settings, clear=request.clear and not request.enabled)
        log.info("prompt sampling for %s: %s", request.model, "on" if settings.enabled else "off")
        return await self.GetPromptSampling(pb.GetPromptSamplingRequest(model=request.model), context)

    async def GetPromptSampling(self, request: pb.GetPromptSamplingRequest, context) -> pb.PromptSampling:
        s = await prompt_samples.get_settings(self.r, request.model)
        kept, seen = await prompt_samples.counts(self.r, request.model)
        return pb.PromptSampling(model=request.model, enabled=s.enabled, rate=s.rate, max_prompts=s.max_prompts,
                                 max_chars=s.max_chars, kept=kept, seen=seen)

    def _tenant(self, context: grpc.aio.ServicerContext) -> str:
        """The caller's tenant (the auth interceptor has already checked the key)."""
        if self.keys is None:
            return DEFAULT_TENANT
        tenant = self.keys.tenant_for(bearer_key(context.invocation_metadata()))
        return tenant.name if tenant else DEFAULT_TENANT

    async def CancelGeneration(self, request: pb.CancelGenerationRequest, context) -> pb.CancelGenerationResponse:
        if not request.request_id:
            raise InvalidArgument("request_id: required")
        await self.queue.cancel(request.request_id)
        found = bool(await self.r.exists(keys.response_stream(request.request_id)))
        return pb.CancelGenerationResponse(found=found)

    async def SubmitCompile(self, request: compiler_pb2.CompileRequest, context) -> compiler_pb2.CompileJob:
        return await self._call_compiler(self.compiler.SubmitCompile, request, context)

    async def CancelCompile(self, request: compiler_pb2.CancelCompileRequest, context) -> compiler_pb2.CompileJob:
        return await self._call_compiler(self.compiler.CancelCompile, request, context)

    async def WatchCompile(self, request: compiler_pb2.WatchCompileRequest, context) -> AsyncIterator[compiler_pb2.CompileEvent]:
        call = self.compiler.WatchCompile(request)
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            await context.abort(exc.code(), exc.details() or "compiler error")
        finally:
            call.cancel()

    async def GetBuild(self, request: compiler_pb2.GetBuildRequest, context) -> compiler_pb2.BuildInfo:
        return await self._call_compiler(self.compiler.GetBuild, request, context)

    async def CreateUpload(self, request: compiler_pb2.CreateUploadRequest, context) -> compiler_pb2.Upload:
        return await self._call_compiler(self.compiler.CreateUpload, request, context)

    async def GetUpload(self, request: compiler_pb2.GetUploadRequest, context) -> compiler_pb2.Upload:
        return await self._call_compiler(self.compiler.GetUpload, request, context)

    async def UploadFiles(self, request_iterator, context) -> compiler_pb2.Upload:
        """Relays the chunks to the compiler as they arrive (a client-streaming call)."""
        try:
            return await self.compiler.UploadFiles(request_iterator, timeout=3600)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable("the compiler service is unreachable; resume the upload later (GetUpload)") from None
            await context.abort(exc.code(), exc.details() or "compiler error")

    async def _call_compiler(self, method, request, context):
        try:
            return await method(request, timeout=30)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            if code == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable("the compiler service is unreachable; retry later") from None
            await context.abort(code, exc.details() or "compiler error")

    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        replicas = await catalog.live_replicas(self.r, self.replica_stale_s)
        out = pb.ListModelsResponse()
        for a in await catalog.list_aliases(self.r):
            m = out.models.add(name=a.name, build_id=a.build_id, recipe=a.recipe, pool=a.pool,
                               context_length=a.context_length, max_batch=a.max_batch, published_at=a.published_at)
            for hb in replicas:
                if a.name in hb.builds:
                    m.replicas.add(replica_id=hb.replica_id, pool=hb.pool, address=hb.address,
                                   build_id=hb.builds[a.name], slots=hb.slots, active=hb.active)
        return out
