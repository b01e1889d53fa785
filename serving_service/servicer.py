"""gRPC servicer of a replica: status for the internal hop (generation arrives through the queue)."""

from __future__ import annotations

import grpc

from shared.proto_gen.llamaship.serving.v1 import serving_pb2 as pb
from shared.proto_gen.llamaship.serving.v1 import serving_pb2_grpc as pb_grpc
from serving_service.engine import Engine


class ServingServicer(pb_grpc.ServingServicer):
    def __init__(self, engine: Engine, replica_id: str):
        self.engine = engine
        self.replica_id = replica_id

    async def GetStatus(self, request: pb.GetStatusRequest, context: grpc.aio.ServicerContext) -> pb.ReplicaStatus:
        status = pb.ReplicaStatus(
            replica_id=self.replica_id, pool=self.engine.pool, slots=self.engine.slots, active=self.engine.active
        )
        for name, b in sorted(self.engine.builds.items()):
            status.builds.add(model=name, build_id=b.build_id, recipe=b.manifest.recipe,
                              context_length=b.context_length, max_batch=b.manifest.max_batch)
        return status
