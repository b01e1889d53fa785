"""gRPC servicer of the gateway: converts protos, calls the generation core (gateway.generation) and the
compiler, converts back."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator

import grpc

from gateway import metrics
from gateway.admission import access_of, check_id, request_id, unknown_model
from gateway.auth import KeyStore, caller_for
from gateway.generation import GenerationCore
from shared import catalog, prompt_samples
from shared.errors import InvalidArgument, LlamashipError, Unavailable
from shared.generation import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP, FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA,
                               FORMAT_TEXT, Chunk, GenRequest)
from shared.model_registry import check_name
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2, compiler_pb2_grpc
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2 as pb
from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2_grpc as pb_grpc
from shared.telemetry import request_id_var
from shared.tenancy import Caller

log = logging.getLogger("llamaship.gateway")
FINISH_TO_PROTO = {FINISH_LENGTH: pb.FINISH_REASON_LENGTH, FINISH_EOS: pb.FINISH_REASON_EOS, FINISH_STOP: pb.FINISH_REASON_STOP}
PRIORITY_FROM_PROTO = {pb.PRIORITY_UNSPECIFIED: "interactive", pb.PRIORITY_INTERACTIVE: "interactive",
                       pb.PRIORITY_BATCH: "batch"}
MAX_COMPILER_DETAILS = 1000
FORMAT_FROM_PROTO = {pb.ResponseFormat.TYPE_UNSPECIFIED: FORMAT_TEXT, pb.ResponseFormat.TYPE_TEXT: FORMAT_TEXT,
                     pb.ResponseFormat.TYPE_JSON_OBJECT: FORMAT_JSON_OBJECT,
                     pb.ResponseFormat.TYPE_JSON_SCHEMA: FORMAT_JSON_SCHEMA}


def request_from_proto(m: pb.GenerateRequest, request_id: str) -> GenRequest:
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
        messages=[{"role": c.role, "content": c.content} for c in m.messages],
        response_format=FORMAT_FROM_PROTO.get(m.response_format.type, ""),
        json_schema=m.response_format.json_schema,
    )


def timing_metadata(end: Chunk) -> tuple[tuple[str, str], ...]:
    """Where the request's time went (milliseconds, from its end chunk), as trailing metadata."""
    return (("x-llamaship-queue-ms", f"{end.queue_ms:.1f}"), ("x-llamaship-prefill-ms", f"{end.prefill_ms:.1f}"),
            ("x-llamaship-decode-ms", f"{end.decode_ms:.1f}"))


def _metadata_request_id(context: grpc.aio.ServicerContext) -> str:
    return dict(context.invocation_metadata() or ()).get("x-request-id", "")


class GatewayServicer(pb_grpc.GatewayServicer):
    def __init__(self, core: GenerationCore, compiler: compiler_pb2_grpc.CompilerStub, keys: KeyStore | None = None):
        self.core = core
        self.r = core.r
        self.keys = keys
        self.compiler = compiler
        self.registry = core.registry

    def _caller(self, context: grpc.aio.ServicerContext) -> Caller:
        """The caller's identity (the auth interceptor has already checked the key)."""
        return caller_for(self.keys, context.invocation_metadata())

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        try:
            async for chunk in self._generate(request, context):
                yield chunk
        except LlamashipError as exc:
            metrics.REJECTS.labels(exc.code.name).inc()
            raise

    async def _generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        rid = request_id(request.request_id, _metadata_request_id(context))
        request_id_var.set(rid)
        caller = self._caller(context)
        if request.resume_cursor:
            chunks = self.core.resume(rid, request.resume_cursor, caller)
        else:
            if request.priority not in PRIORITY_FROM_PROTO:
                raise InvalidArgument(f"priority: unknown value {request.priority}")
            chunks = self.core.generate(request_from_proto(request, rid), caller, context.time_remaining())
        async for cursor, chunk in chunks:
            out = pb.GenerateChunk(request_id=rid, text=chunk.text, token_ids=chunk.token_ids,
                                   build_id=chunk.build_id, cursor=cursor)
            if chunk.kind == "end":
                out.finish_reason = FINISH_TO_PROTO[chunk.finish_reason]
                out.usage.prompt_tokens = chunk.prompt_tokens
                out.usage.completion_tokens = chunk.completion_tokens
                context.set_trailing_metadata(timing_metadata(chunk))
            yield out

    async def SetPromptSampling(self, request: pb.PromptSampling, context) -> pb.PromptSampling:
        check_name(request.model)
        if await catalog.get_alias(self.r, request.model) is None:
            raise unknown_model(request.model)
        settings = prompt_samples.SamplingSettings(
            enabled=request.enabled, rate=request.rate or 1.0, max_prompts=request.max_prompts or 256,
            max_chars=request.max_chars or 4000)
        await prompt_samples.set_settings(self.r, request.model, settings, clear=request.clear and not request.enabled)
        log.info("prompt sampling for %s: %s", request.model, "on" if settings.enabled else "off")
        return await self.GetPromptSampling(pb.GetPromptSamplingRequest(model=request.model), context)

    async def GetPromptSampling(self, request: pb.GetPromptSamplingRequest, context) -> pb.PromptSampling:
        check_name(request.model)
        s = await prompt_samples.get_settings(self.r, request.model)
        kept, seen = await prompt_samples.counts(self.r, request.model)
        return pb.PromptSampling(model=request.model, enabled=s.enabled, rate=s.rate, max_prompts=s.max_prompts,
                                 max_chars=s.max_chars, kept=kept, seen=seen)

    async def CancelGeneration(self, request: pb.CancelGenerationRequest, context) -> pb.CancelGenerationResponse:
        if not request.request_id:
            raise InvalidArgument("request_id: required")
        return pb.CancelGenerationResponse(found=await self.core.cancel(request.request_id, self._caller(context)))

    # -- models ----------------------------------------------------------------------------
    async def ListModels(self, request: pb.ListModelsRequest, context) -> pb.ListModelsResponse:
        out = pb.ListModelsResponse()
        for view in await self.core.models(self._caller(context)):
            a = view.alias
            m = out.models.add(name=a.name, build_id=a.build_id, recipe=a.recipe, pool=a.pool,
                               context_length=a.context_length, max_batch=a.max_batch, published_at=a.published_at,
                               owner=view.access.owner, readers=view.access.readers,
                               served_build_ids=view.served_build_ids)
            for hb in view.replicas:
                m.replicas.add(replica_id=hb.replica_id, pool=hb.pool, address=hb.address,
                               build_id=hb.builds[a.name], slots=hb.slots, active=hb.active)
        return out

    async def SetModelAccess(self, request: pb.ModelAccess, context) -> pb.ModelAccess:
        caller = self._caller(context)
        await access_of(self.registry, request.model, caller)
        access = await self.registry.set_readers(request.model, list(request.readers), caller)
        log.info("access to %s: readers %s", request.model, ", ".join(access.readers) or "none")
        return pb.ModelAccess(model=request.model, readers=access.readers, owner=access.owner)

    async def DeleteModel(self, request: pb.DeleteModelRequest, context) -> pb.DeleteModelResponse:
        caller = self._caller(context)
        await access_of(self.registry, request.model, caller)
        await self.registry.delete(request.model, caller)
        # its sampled prompts are the owner's data: they go with the name
        await prompt_samples.set_settings(self.r, request.model, prompt_samples.SamplingSettings(), clear=True)
        log.info("model %s deleted", request.model)
        return pb.DeleteModelResponse(deleted=True)

    # -- compiler proxy: every call carries the caller's identity --------------------------------
    async def SubmitCompile(self, request: compiler_pb2.CompileRequest, context) -> compiler_pb2.CompileJob:
        check_name(request.model_name, "model_name")
        if request.quality.sampled_prompts_of:
            check_name(request.quality.sampled_prompts_of, "quality.sampled_prompts_of")
        check_id(request.upload_id, "upload_id")
        return await self._call_compiler(self.compiler.SubmitCompile, request, context)

    async def CancelCompile(self, request: compiler_pb2.CancelCompileRequest, context) -> compiler_pb2.CompileJob:
        check_id(request.job_id, "job_id")
        return await self._call_compiler(self.compiler.CancelCompile, request, context)

    async def WatchCompile(self, request: compiler_pb2.WatchCompileRequest, context) -> AsyncIterator[compiler_pb2.CompileEvent]:
        check_id(request.job_id, "job_id")
        call = self.compiler.WatchCompile(request, metadata=self._caller(context).metadata())
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as exc:
            await _abort_with(context, exc)
        finally:
            call.cancel()

    async def GetBuild(self, request: compiler_pb2.GetBuildRequest, context) -> compiler_pb2.BuildInfo:
        check_id(request.build_id, "build_id")
        return await self._call_compiler(self.compiler.GetBuild, request, context)

    async def CreateUpload(self, request: compiler_pb2.CreateUploadRequest, context) -> compiler_pb2.Upload:
        return await self._call_compiler(self.compiler.CreateUpload, request, context)

    async def GetUpload(self, request: compiler_pb2.GetUploadRequest, context) -> compiler_pb2.Upload:
        check_id(request.upload_id, "upload_id")
        return await self._call_compiler(self.compiler.GetUpload, request, context)

    async def UploadFiles(self, request_iterator, context) -> compiler_pb2.Upload:
        """Relays the chunks to the compiler as they arrive (a client-streaming call)."""
        refused: list[LlamashipError] = []

        async def relay():
            try:
                async for chunk in request_iterator:
                    yield chunk
            except LlamashipError as exc:  # e.g. an undecodable chunk: the compiler call is cancelled
                refused.append(exc)
                raise

        try:
            return await self.compiler.UploadFiles(relay(), timeout=3600, metadata=self._caller(context).metadata())
        except (grpc.aio.AioRpcError, asyncio.CancelledError) as exc:
            if refused:
                raise refused[0] from None
            if isinstance(exc, asyncio.CancelledError):
                raise
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable("the compiler service is unreachable; resume the upload later (GetUpload)") from None
            await _abort_with(context, exc)

    async def _call_compiler(self, method, request, context):
        try:
            return await method(request, timeout=30, metadata=self._caller(context).metadata())
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.UNAVAILABLE:
                raise Unavailable("the compiler service is unreachable; retry later") from None
            await _abort_with(context, exc)


async def _abort_with(context: grpc.aio.ServicerContext, exc: grpc.aio.AioRpcError) -> None:
    """Pass the compiler's answer on, its details bounded."""
    details = (exc.details() or "compiler error")[:MAX_COMPILER_DETAILS]
    await context.abort(exc.code(), details)
