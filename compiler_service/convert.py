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


GATE_THRESHOLDS = ("min_top1_agreement", "max_mean_kl", "max_perplexity_increase_pct")


def quality_from_proto(q: pb.QualityGate) -> dict:
    out: dict = {name: getattr(q, name) for name in GATE_THRESHOLDS if q.HasField(name)}
    if q.force_publish:
        out["force_publish"] = True
    if q.eval_prompts:
        out["eval_prompts"] = list(q.eval_prompts)
    if q.sampled_prompts_of:
        out["sampled_prompts_of"] = q.sampled_prompts_of
    return out


def quality_to_proto(d: dict) -> pb.QualityGate:
    q = pb.QualityGate(force_publish=bool(d.get("force_publish")), eval_prompts=d.get("eval_prompts", []),
                       sampled_prompts_of=d.get("sampled_prompts_of", ""))
    for name in GATE_THRESHOLDS:
        if d.get(name) is not None:
            setattr(q, name, d[name])
    return q


def report_to_proto(d: dict) -> pb.QualityReport:
    if not d:
        return pb.QualityReport(skipped_reason="no quality report (built before the gate existed)")
    m, t = d.get("metrics", {}), d.get("thresholds", {})
    return pb.QualityReport(
        passed=d.get("passed", False), failures=d.get("failures", []),
        top1_agreement=m.get("top1_agreement", 0.0), mean_kl=m.get("mean_kl", 0.0),
        max_abs_logit_diff=m.get("max_abs_logit_diff", 0.0), perplexity_reference=m.get("perplexity_reference", 0.0),
        perplexity_build=m.get("perplexity_build", 0.0), prompt_source=d.get("prompt_source", ""),
        prompts=d.get("prompts", 0), tokens=m.get("tokens", 0), forced=d.get("forced", False),
        skipped_reason=d.get("skipped_reason", ""), **{k: t[k] for k in GATE_THRESHOLDS if k in t},
    )


def build_to_proto(manifest) -> pb.BuildInfo:
    return pb.BuildInfo(
        build_id=manifest.build_id, model_name=manifest.model_name, recipe=manifest.recipe,
        target_pool=manifest.target_pool, total_bytes=manifest.total_bytes, context_length=manifest.context_length,
        max_batch=manifest.max_batch, quality=report_to_proto(manifest.quality), manifest_json=manifest.to_json(),
    )


def request_from_proto(m: pb.CompileRequest) -> JobRequest:
    return JobRequest(
        checkpoint_path=m.checkpoint_path,
        model_name=m.model_name,
        recipe=m.recipe,
        target_pool=m.target_pool or "cpu",
        max_sequence_length=m.max_sequence_length,
        max_batch=m.max_batch,
        quality=quality_from_proto(m.quality),
        hub_id=m.hub_id,
        upload_id=m.upload_id,
        allow_pickle=m.allow_pickle,
    )


def upload_to_proto(state) -> pb.Upload:
    return pb.Upload(
        upload_id=state.upload_id, complete=state.complete, total_bytes=state.total_bytes,
        received_bytes=state.received_bytes, expires_at=state.expires_at,
        files=[pb.UploadFile(path=f.path, size=f.size, sha256=f.sha256, received=f.received, verified=f.verified)
               for f in state.files],
    )


def job_to_proto(job: Job) -> pb.CompileJob:
    r = job.request
    return pb.CompileJob(
        job_id=job.job_id,
        state=STATE_TO_PROTO[job.state],
        request=pb.CompileRequest(
            checkpoint_path=r.checkpoint_path, model_name=r.model_name, recipe=r.recipe,
            target_pool=r.target_pool, max_sequence_length=r.max_sequence_length, max_batch=r.max_batch,
            quality=quality_to_proto(r.quality or {}), hub_id=r.hub_id, upload_id=r.upload_id,
            allow_pickle=r.allow_pickle,
        ),
        build_id=job.build_id,
        stage=job.stage,
        progress=job.progress,
        message=job.message,
        reused=job.reused,
        created_at=job.created_at,
        updated_at=job.updated_at,
        attempts=job.attempts,
        tenant=job.tenant,
    )
