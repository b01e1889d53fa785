from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class CompileRequest(_message.Message):
    __slots__ = ("checkpoint_path", "model_name", "recipe", "target_pool", "max_sequence_length", "max_batch", "quality", "hub_id", "upload_id", "allow_pickle")
    CHECKPOINT_PATH_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_POOL_FIELD_NUMBER: _ClassVar[int]
    MAX_SEQUENCE_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    HUB_ID_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    ALLOW_PICKLE_FIELD_NUMBER: _ClassVar[int]
    checkpoint_path: str
    model_name: str
    recipe: str
    target_pool: str
    max_sequence_length: int
    max_batch: int
    quality: QualityGate
    hub_id: str
    upload_id: str
    allow_pickle: bool
    def __init__(self, checkpoint_path: _Optional[str] = ..., model_name: _Optional[str] = ..., recipe: _Optional[str] = ..., target_pool: _Optional[str] = ..., max_sequence_length: _Optional[int] = ..., max_batch: _Optional[int] = ..., quality: _Optional[_Union[QualityGate, _Mapping]] = ..., hub_id: _Optional[str] = ..., upload_id: _Optional[str] = ..., allow_pickle: _Optional[bool] = ...) -> None: ...

class UploadFile(_message.Message):
    __slots__ = ("path", "size", "sha256", "received", "verified")
    PATH_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    VERIFIED_FIELD_NUMBER: _ClassVar[int]
    path: str
    size: int
    sha256: str
    received: int
    verified: bool
    def __init__(self, path: _Optional[str] = ..., size: _Optional[int] = ..., sha256: _Optional[str] = ..., received: _Optional[int] = ..., verified: _Optional[bool] = ...) -> None: ...

class CreateUploadRequest(_message.Message):
    __slots__ = ("files",)
    FILES_FIELD_NUMBER: _ClassVar[int]
    files: _containers.RepeatedCompositeFieldContainer[UploadFile]
    def __init__(self, files: _Optional[_Iterable[_Union[UploadFile, _Mapping]]] = ...) -> None: ...

class UploadChunk(_message.Message):
    __slots__ = ("upload_id", "path", "offset", "data")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    path: str
    offset: int
    data: bytes
    def __init__(self, upload_id: _Optional[str] = ..., path: _Optional[str] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GetUploadRequest(_message.Message):
    __slots__ = ("upload_id",)
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    def __init__(self, upload_id: _Optional[str] = ...) -> None: ...

class Upload(_message.Message):
    __slots__ = ("upload_id", "files", "complete", "total_bytes", "received_bytes", "expires_at")
    UPLOAD_ID_FIELD_NUMBER: _ClassVar[int]
    FILES_FIELD_NUMBER: _ClassVar[int]
    COMPLETE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_BYTES_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_FIELD_NUMBER: _ClassVar[int]
    upload_id: str
    files: _containers.RepeatedCompositeFieldContainer[UploadFile]
    complete: bool
    total_bytes: int
    received_bytes: int
    expires_at: float
    def __init__(self, upload_id: _Optional[str] = ..., files: _Optional[_Iterable[_Union[UploadFile, _Mapping]]] = ..., complete: _Optional[bool] = ..., total_bytes: _Optional[int] = ..., received_bytes: _Optional[int] = ..., expires_at: _Optional[float] = ...) -> None: ...

class QualityGate(_message.Message):
    __slots__ = ("min_top1_agreement", "max_mean_kl", "max_perplexity_increase_pct", "force_publish", "eval_prompts", "sampled_prompts_of")
    MIN_TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_MEAN_KL_FIELD_NUMBER: _ClassVar[int]
    MAX_PERPLEXITY_INCREASE_PCT_FIELD_NUMBER: _ClassVar[int]
    FORCE_PUBLISH_FIELD_NUMBER: _ClassVar[int]
    EVAL_PROMPTS_FIELD_NUMBER: _ClassVar[int]
    SAMPLED_PROMPTS_OF_FIELD_NUMBER: _ClassVar[int]
    min_top1_agreement: float
    max_mean_kl: float
    max_perplexity_increase_pct: float
    force_publish: bool
    eval_prompts: _containers.RepeatedScalarFieldContainer[str]
    sampled_prompts_of: str
    def __init__(self, min_top1_agreement: _Optional[float] = ..., max_mean_kl: _Optional[float] = ..., max_perplexity_increase_pct: _Optional[float] = ..., force_publish: _Optional[bool] = ..., eval_prompts: _Optional[_Iterable[str]] = ..., sampled_prompts_of: _Optional[str] = ...) -> None: ...

class QualityReport(_message.Message):
    __slots__ = ("passed", "failures", "top1_agreement", "mean_kl", "max_abs_logit_diff", "perplexity_reference", "perplexity_build", "prompt_source", "prompts", "tokens", "min_top1_agreement", "max_mean_kl", "max_perplexity_increase_pct", "forced", "skipped_reason")
    PASSED_FIELD_NUMBER: _ClassVar[int]
    FAILURES_FIELD_NUMBER: _ClassVar[int]
    TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MEAN_KL_FIELD_NUMBER: _ClassVar[int]
    MAX_ABS_LOGIT_DIFF_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_REFERENCE_FIELD_NUMBER: _ClassVar[int]
    PERPLEXITY_BUILD_FIELD_NUMBER: _ClassVar[int]
    PROMPT_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PROMPTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_TOP1_AGREEMENT_FIELD_NUMBER: _ClassVar[int]
    MAX_MEAN_KL_FIELD_NUMBER: _ClassVar[int]
    MAX_PERPLEXITY_INCREASE_PCT_FIELD_NUMBER: _ClassVar[int]
    FORCED_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_REASON_FIELD_NUMBER: _ClassVar[int]
    passed: bool
    failures: _containers.RepeatedScalarFieldContainer[str]
    top1_agreement: float
    mean_kl: float
    max_abs_logit_diff: float
    perplexity_reference: float
    perplexity_build: float
    prompt_source: str
    prompts: int
    tokens: int
    min_top1_agreement: float
    max_mean_kl: float
    max_perplexity_increase_pct: float
    forced: bool
    skipped_reason: str
    def __init__(self, passed: _Optional[bool] = ..., failures: _Optional[_Iterable[str]] = ..., top1_agreement: _Optional[float] = ..., mean_kl: _Optional[float] = ..., max_abs_logit_diff: _Optional[float] = ..., perplexity_reference: _Optional[float] = ..., perplexity_build: _Optional[float] = ..., prompt_source: _Optional[str] = ..., prompts: _Optional[int] = ..., tokens: _Optional[int] = ..., min_top1_agreement: _Optional[float] = ..., max_mean_kl: _Optional[float] = ..., max_perplexity_increase_pct: _Optional[float] = ..., forced: _Optional[bool] = ..., skipped_reason: _Optional[str] = ...) -> None: ...

class GetBuildRequest(_message.Message):
    __slots__ = ("build_id",)
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    def __init__(self, build_id: _Optional[str] = ...) -> None: ...

class BuildInfo(_message.Message):
    __slots__ = ("build_id", "model_name", "recipe", "target_pool", "total_bytes", "context_length", "max_batch", "quality", "manifest_json")
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    RECIPE_FIELD_NUMBER: _ClassVar[int]
    TARGET_POOL_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    QUALITY_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_JSON_FIELD_NUMBER: _ClassVar[int]
    build_id: str
    model_name: str
    recipe: str
    target_pool: str
    total_bytes: int
    context_length: int
    max_batch: int
    quality: QualityReport
    manifest_json: str
    def __init__(self, build_id: _Optional[str] = ..., model_name: _Optional[str] = ..., recipe: _Optional[str] = ..., target_pool: _Optional[str] = ..., total_bytes: _Optional[int] = ..., context_length: _Optional[int] = ..., max_batch: _Optional[int] = ..., quality: _Optional[_Union[QualityReport, _Mapping]] = ..., manifest_json: _Optional[str] = ...) -> None: ...

class CompileJob(_message.Message):
    __slots__ = ("job_id", "state", "request", "build_id", "stage", "progress", "message", "reused", "created_at", "updated_at", "attempts", "tenant")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_FIELD_NUMBER: _ClassVar[int]
    BUILD_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REUSED_FIELD_NUMBER: _ClassVar[int]
    CREATED_AT_FIELD_NUMBER: _ClassVar[int]
    UPDATED_AT_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    request: CompileRequest
    build_id: str
    stage: str
    progress: float
    message: str
    reused: bool
    created_at: float
    updated_at: float
    attempts: int
    tenant: str
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., request: _Optional[_Union[CompileRequest, _Mapping]] = ..., build_id: _Optional[str] = ..., stage: _Optional[str] = ..., progress: _Optional[float] = ..., message: _Optional[str] = ..., reused: _Optional[bool] = ..., created_at: _Optional[float] = ..., updated_at: _Optional[float] = ..., attempts: _Optional[int] = ..., tenant: _Optional[str] = ...) -> None: ...

class WatchCompileRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CompileEvent(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: CompileJob
    def __init__(self, job: _Optional[_Union[CompileJob, _Mapping]] = ...) -> None: ...

class CancelCompileRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class GetCompileRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...
