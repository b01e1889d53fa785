"""Generation requests and chunks as they cross Redis, and the validation both ends apply."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from shared import wire
from shared.errors import InvalidArgument

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**31  # seeds are in [0, 2^31)
MAX_PROMPT_CHARS = 1_000_000


@dataclass
class GenRequest:
    request_id: str
    model: str
    prompt: str
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    deadline_s: float | None = None  # seconds the caller allows, counted from enqueue (Redis's clock)
    priority: str = "interactive"
    tenant: str = "default"

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "GenRequest":
        return wire.from_json(cls, text)


def validate(req: GenRequest, context_length: int | None = None) -> None:
    """Raise InvalidArgument naming the first bad field. Prompt length in tokens is checked
    where the tokenizer lives (the replica)."""
    if not req.model:
        raise InvalidArgument("model: required")
    if not req.prompt:
        raise InvalidArgument("prompt: must not be empty")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
    if req.max_tokens <= 0:
        raise InvalidArgument(f"max_tokens: must be > 0, got {req.max_tokens}")
    if context_length is not None and req.max_tokens > context_length:
        raise InvalidArgument(
            f"max_tokens: {req.max_tokens} exceeds the build's context length {context_length}"
        )
    if not math.isfinite(req.temperature) or req.temperature < 0:
        raise InvalidArgument(f"temperature: must be a finite number >= 0, got {req.temperature}")
    if not math.isfinite(req.top_p) or not 0 < req.top_p <= 1:
        raise InvalidArgument(f"top_p: must be in (0, 1], got {req.top_p}")
    if req.top_k < 0:
        raise InvalidArgument(f"top_k: must be >= 0, got {req.top_k}")
    if len(req.stop) > MAX_STOP_STRINGS:
        raise InvalidArgument(f"stop: at most {MAX_STOP_STRINGS} stop strings")
    if any(not s for s in req.stop):
        raise InvalidArgument("stop: stop strings must not be empty")
    if any(len(s) > MAX_STOP_CHARS for s in req.stop):
        raise InvalidArgument(f"stop: each stop string at most {MAX_STOP_CHARS} characters")
    if req.seed is not None and not 0 <= req.seed < SEED_LIMIT:
        raise InvalidArgument(f"seed: must be in [0, 2^31), got {req.seed}")


@dataclass
class Chunk:
    """One message on a request's response stream."""

    kind: str  # "tokens" | "end" | "error"
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    build_id: str = ""
    error_code: str = ""
    error_message: str = ""
    replica_id: str = ""

    def to_fields(self) -> dict[str, str]:
        return {"c": json.dumps(asdict(self))}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "Chunk":
        return wire.from_json(cls, fields.get("c", ""))
