"""gRPC servicer of a replica: converts protos, calls the engine, converts back."""

from __future__ import annotations

import asyncio
import uuid
from typing import AsyncIterator

import grpc

from shared.generation import FINISH_EOS, FINISH_LENGTH, FINISH_STOP, Chunk, GenRequest
from shared.proto_gen.llamaship.serving.v1 import serving_pb2 as pb
from shared.proto_gen.llamaship.serving.v1 import serving_pb2_grpc as pb_grpc
from shared.telemetry import request_id_var
from serving_service.engine import Engine

FINISH_TO_PROTO = {
    FINISH_LENGTH: pb.FINISH_REASON_LENGTH,
    FINISH_EOS: pb.FINISH_REASON_EOS,
    FINISH_STOP: pb.FINISH_REASON_STOP,
}


def request_from_proto(m: pb.GenerateRequest) -> GenRequest:
    return GenRequest(
        request_id=m.request_id or uuid.uuid4().hex,
        model=m.model,
        prompt=m.prompt,
        max_tokens=m.max_tokens,
        temperature=m.temperature,
        top_p=m.top_p or 1.0,
        top_k=m.top_k,
        seed=m.seed if m.has_seed else None,
        stop=list(m.stop),
    )


def chunk_to_proto(c: Chunk) -> pb.GenerateChunk:
    out = pb.GenerateChunk(text=c.text, token_ids=c.token_ids, build_id=c.build_id)
    if c.kind == "end":
        out.finish_reason = FINISH_TO_PROTO[c.finish_reason]
        out.usage.prompt_tokens = c.prompt_tokens
        out.usage.completion_tokens = c.completion_tokens
    return out


class ServingServicer(pb_grpc.ServingServicer):
    def __init__(self, engine: Engine, replica_id: str):
        self.engine = engine
        self.replica_id = replica_id

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        req = request_from_proto(request)
        request_id_var.set(req.request_id)
        stream = self.engine.stream(req)
        try:
            async for chunk in stream:
                yield chunk_to_proto(chunk)
        except (asyncio.CancelledError, GeneratorExit):
            raise  # the finally below frees the slot and stops the decode thread
        finally:
            await stream.aclose()

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaStatus:
        status = pb.ReplicaStatus(
            replica_id=self.replica_id, pool=self.engine.pool, slots=self.engine.slots, active=self.engine.active
        )
        for name, b in sorted(self.engine.builds.items()):
            status.builds.add(model=name, build_id=b.build_id, recipe=b.manifest.recipe,
                              context_length=b.context_length, max_batch=b.manifest.max_batch)
        return status
