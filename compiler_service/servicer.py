"""gRPC servicer of the compiler: converts protos, calls the job store, converts back."""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import grpc

from compiler_service.convert import build_to_proto, job_to_proto, request_from_proto, upload_to_proto
from compiler_service.uploads import UploadStore
from compiler_service.jobs import JobStore
from compiler_service.pipeline import CompileError, normalize
from compiler_service.quality import GateInputError
from shared.store import BuildStore
from shared.errors import InvalidArgument
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2 as pb
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2_grpc as pb_grpc


class CompilerServicer(pb_grpc.CompilerServicer):
    def __init__(self, jobs: JobStore, store: BuildStore):
        self.jobs = jobs
        self.store = store
        self.uploads = UploadStore(store.root)

    async def SubmitCompile(self, request: pb.CompileRequest, context: grpc.aio.ServicerContext) -> pb.CompileJob:
        req = request_from_proto(request)
        try:
            normalize(req)
        except (CompileError, GateInputError) as exc:
            raise InvalidArgument(str(exc)) from None
        if req.upload_id:  # unknown (NOT_FOUND) or incomplete (INVALID_ARGUMENT): say so now
            await asyncio.to_thread(self.uploads.checkpoint_dir, req.upload_id)
        return job_to_proto(await self.jobs.create(req))

    async def WatchCompile(self, request: pb.WatchCompileRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.CompileEvent]:
        job = await self.jobs.get(request.job_id)
        if job.terminal:
            yield pb.CompileEvent(job=job_to_proto(job))
            return
        last_id = "0-0"  # replay the job's history first: a watcher sees every stage
        while True:
            events = await self.jobs.events(request.job_id, last_id, block_ms=5000)
            for last_id, snapshot in events:
                yield pb.CompileEvent(job=job_to_proto(snapshot))
                if snapshot.terminal:
                    return
            if not events:  # quiet for a while: the event stream may have been trimmed
                job = await self.jobs.get(request.job_id)
                if job.terminal:
                    yield pb.CompileEvent(job=job_to_proto(job))
                    return

    async def CancelCompile(self, request: pb.CancelCompileRequest, context: grpc.aio.ServicerContext) -> pb.CompileJob:
        return job_to_proto(await self.jobs.cancel(request.job_id))

    async def GetCompile(self, request: pb.GetCompileRequest, context: grpc.aio.ServicerContext) -> pb.CompileJob:
        return job_to_proto(await self.jobs.get(request.job_id))

    async def GetBuild(self, request: pb.GetBuildRequest, context: grpc.aio.ServicerContext) -> pb.BuildInfo:
        if not request.build_id:
            raise InvalidArgument("build_id: required")
        manifest = await asyncio.to_thread(self.store.manifest, request.build_id)
        return build_to_proto(manifest)

    async def CreateUpload(self, request: pb.CreateUploadRequest, context: grpc.aio.ServicerContext) -> pb.Upload:
        files = [(f.path, f.size, f.sha256) for f in request.files]
        return upload_to_proto(await asyncio.to_thread(self.uploads.create, files))

    async def UploadFiles(self, request_iterator, context: grpc.aio.ServicerContext) -> pb.Upload:
        state = None
        async for chunk in request_iterator:
            state = await asyncio.to_thread(self.uploads.append, chunk.upload_id, chunk.path, chunk.offset, chunk.data)
        if state is None:
            raise InvalidArgument("UploadFiles: send at least one chunk")
        return upload_to_proto(state)

    async def GetUpload(self, request: pb.GetUploadRequest, context: grpc.aio.ServicerContext) -> pb.Upload:
        return upload_to_proto(await asyncio.to_thread(self.uploads.get, request.upload_id))
