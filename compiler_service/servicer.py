"""gRPC servicer of the compiler: converts protos, calls the job and upload stores, converts back.

Every call acts for the caller the gateway names in its metadata (shared.tenancy): jobs, uploads
and builds of another tenant answer NOT_FOUND, as if they did not exist.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import AsyncIterator

import grpc

from compiler_service import sources
from compiler_service.convert import build_to_proto, job_to_proto, request_from_proto, upload_to_proto
from compiler_service.failures import CompileError
from compiler_service.jobs import JobStore
from compiler_service.pipeline import normalize
from compiler_service.quality import GateInputError
from compiler_service.uploads import UploadStore
from shared import catalog
from shared.errors import InvalidArgument, NotFound, shown
from shared.model_registry import ModelRegistry
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2 as pb
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2_grpc as pb_grpc
from shared.store import BuildStore, Manifest
from shared.tenancy import Caller, caller_from_metadata

WATCH_POLL_MS = 5000  # a quiet watch re-reads the job this often (its event stream may be trimmed)


def _caller(context: grpc.aio.ServicerContext) -> Caller:
    return caller_from_metadata(context.invocation_metadata())


class CompilerServicer(pb_grpc.CompilerServicer):
    def __init__(self, jobs: JobStore, store: BuildStore, uploads: UploadStore, checkpoint_roots: tuple[Path, ...] = ()):
        self.jobs = jobs
        self.store = store
        self.uploads = uploads
        self.roots = checkpoint_roots
        self.registry = ModelRegistry(jobs.r)

    async def SubmitCompile(self, request: pb.CompileRequest, context: grpc.aio.ServicerContext) -> pb.CompileJob:
        caller = _caller(context)
        req = request_from_proto(request)
        try:
            normalize(req)
            if req.checkpoint_path:
                await asyncio.to_thread(sources.checkpoint_location, req.checkpoint_path, self.roots)
        except (CompileError, GateInputError, sources.SourceError) as exc:
            raise InvalidArgument(str(exc)) from None
        if req.upload_id:  # unknown (NOT_FOUND) or incomplete (INVALID_ARGUMENT): say so now
            await asyncio.to_thread(self.uploads.checkpoint_dir, req.upload_id, caller)
        sampled = req.quality.get("sampled_prompts_of")
        if sampled:
            access = await self.registry.access(sampled)
            if access is None or not caller.owns(access.owner):
                raise NotFound(f"quality.sampled_prompts_of: no model {shown(sampled)}")
        await self.registry.claim(req.model_name, caller)
        return job_to_proto(await self.jobs.create(req, caller))

    async def WatchCompile(self, request: pb.WatchCompileRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CompileEvent]:
        caller = _caller(context)
        job = await self.jobs.get(request.job_id, caller)
        if job.terminal:
            yield pb.CompileEvent(job=job_to_proto(job))
            return
        last_id = "0-0"  # replay the job's history first: a watcher sees every stage
        while True:
            events = await self.jobs.events(job.job_id, last_id, block_ms=WATCH_POLL_MS)
            for last_id, snapshot in events:
                yield pb.CompileEvent(job=job_to_proto(snapshot))
                if snapshot.terminal:
                    return
            if not events:  # quiet for a while: the event stream may have been trimmed
                job = await self.jobs.get(job.job_id, caller)
                if job.terminal:
                    yield pb.CompileEvent(job=job_to_proto(job))
                    return

    async def CancelCompile(self, request: pb.CancelCompileRequest, context: grpc.aio.ServicerContext) -> pb.CompileJob:
        return job_to_proto(await self.jobs.cancel(request.job_id, _caller(context)))

    async def GetCompile(self, request: pb.GetCompileRequest, context: grpc.aio.ServicerContext) -> pb.CompileJob:
        return job_to_proto(await self.jobs.get(request.job_id, _caller(context)))

    async def GetBuild(self, request: pb.GetBuildRequest, context: grpc.aio.ServicerContext) -> pb.BuildInfo:
        if not request.build_id:
            raise InvalidArgument("build_id: required")
        manifest = await asyncio.to_thread(self.store.manifest, request.build_id)
        if not await self._may_see(manifest, _caller(context)):
            raise NotFound(f"build {shown(request.build_id)} not found")
        return build_to_proto(manifest)

    async def _may_see(self, manifest: Manifest, caller: Caller) -> bool:
        """An admin, a tenant that built it, or one that may generate from a model pointing at it."""
        if caller.admin or caller.tenant in manifest.tenants:
            return True
        for alias in await catalog.list_aliases(self.jobs.r):
            if alias.build_id == manifest.build_id:
                access = await self.registry.access(alias.name)
                if access is not None and access.may_generate(caller):
                    return True
        return False

    async def CreateUpload(self, request: pb.CreateUploadRequest, context: grpc.aio.ServicerContext) -> pb.Upload:
        files = [(f.path, f.size, f.sha256) for f in request.files]
        return upload_to_proto(await asyncio.to_thread(self.uploads.create, files, _caller(context)))

    async def UploadFiles(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.Upload:
        caller = _caller(context)
        state = None
        async for chunk in request_iterator:
            state = await asyncio.to_thread(self.uploads.append, chunk.upload_id, chunk.path, chunk.offset,
                                            chunk.data, caller)
        if state is None:
            raise InvalidArgument("UploadFiles: send at least one chunk")
        return upload_to_proto(state)

    async def GetUpload(self, request: pb.GetUploadRequest, context: grpc.aio.ServicerContext) -> pb.Upload:
        return upload_to_proto(await asyncio.to_thread(self.uploads.get, request.upload_id, _caller(context)))
