"""Job records <-> compiler protos."""

from __future__ import annotations

from compiler_service.jobs import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, Job, JobRequest
from shared.proto_gen.llamaship.compiler.v1 import compiler_pb2 as pb

STATE_TO_PROTO = {
    QUEUED: pb.JOB_STATE_QUEUED,
    RUNNING: pb.JOB_STATE_RUNNING,
    SUCCEEDED: pb.JOB_STATE_SUCCEEDED,
    FAILED: pb.JOB_STATE_FAILED,
    CANCELLED: pb.JOB_STATE_CANCELLED,
}


def request_from_proto(m: pb.CompileRequest) -> JobRequest:
    return JobRequest(
        checkpoint_path=m.checkpoint_path,
        model_name=m.model_name,
        recipe=m.recipe,
        target_pool=m.target_pool or "cpu",
        max_sequence_length=m.max_sequence_length,
        max_batch=m.max_batch,
    )


def job_to_proto(job: Job) -> pb.CompileJob:
    r = job.request
    return pb.CompileJob(
        job_id=job.job_id,
        state=STATE_TO_PROTO[job.state],
        request=pb.CompileRequest(
            checkpoint_path=r.checkpoint_path, model_name=r.model_name, recipe=r.recipe,
            target_pool=r.target_pool, max_sequence_length=r.max_sequence_length, max_batch=r.max_batch,
        ),
        build_id=job.build_id,
        stage=job.stage,
        progress=job.progress,
        message=job.message,
        reused=job.reused,
        created_at=job.created_at,
        updated_at=job.updated_at,
        attempts=job.attempts,
    )
