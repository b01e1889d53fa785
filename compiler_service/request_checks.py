"""Bounds on every field of a compile request, checked before a job exists (a job record and its
events must stay small whatever a client sends)."""

from __future__ import annotations

from compiler_service.jobs import JobRequest
from compiler_service.quality import MAX_PROMPTS
from shared.errors import InvalidArgument
from shared.model_registry import check_name

MAX_PATH_CHARS = 4096
MAX_HUB_ID_CHARS = 200
MAX_UPLOAD_ID_CHARS = 64
MAX_RECIPE_CHARS = 32
MAX_POOL_CHARS = 32
MAX_SEQUENCE_LENGTH = 1 << 20
MAX_BATCH = 4096
MAX_PROMPT_CHARS = 16_384
MAX_PROMPTS_TOTAL_CHARS = 1 << 20


def _chars(name: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(f"{name}: at most {limit} characters, got {len(value)}")


def check_prompts(prompts: list[str], name: str = "quality.eval_prompts") -> None:
    if len(prompts) > MAX_PROMPTS:
        raise InvalidArgument(f"{name}: at most {MAX_PROMPTS} prompts, got {len(prompts)}")
    total = 0
    for i, p in enumerate(prompts):
        if len(p) > MAX_PROMPT_CHARS:
            raise InvalidArgument(f"{name}[{i}]: at most {MAX_PROMPT_CHARS} characters, got {len(p)}")
        total += len(p)
    if total > MAX_PROMPTS_TOTAL_CHARS:
        raise InvalidArgument(f"{name}: at most {MAX_PROMPTS_TOTAL_CHARS} characters in all, got {total}")


def check_bounds(req: JobRequest) -> None:
    """InvalidArgument for the first field out of bounds (the model name's syntax included)."""
    check_name(req.model_name, "model_name")
    _chars("checkpoint_path", req.checkpoint_path, MAX_PATH_CHARS)
    _chars("hub_id", req.hub_id, MAX_HUB_ID_CHARS)
    _chars("upload_id", req.upload_id, MAX_UPLOAD_ID_CHARS)
    _chars("recipe", req.recipe, MAX_RECIPE_CHARS)
    _chars("target_pool", req.target_pool, MAX_POOL_CHARS)
    if not 16 <= req.max_sequence_length <= MAX_SEQUENCE_LENGTH:
        raise InvalidArgument(f"max_sequence_length: must be in 16..{MAX_SEQUENCE_LENGTH}, got {req.max_sequence_length}")
    if not 1 <= req.max_batch <= MAX_BATCH:
        raise InvalidArgument(f"max_batch: must be in 1..{MAX_BATCH}, got {req.max_batch}")
    check_prompts(req.quality.get("eval_prompts", []))
    sampled = req.quality.get("sampled_prompts_of", "")
    if sampled:
        check_name(sampled, "quality.sampled_prompts_of")
