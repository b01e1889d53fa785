"""Generation requests and chunks as they cross Redis, and the validation both ends apply."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

from shared import json_output, wire
from shared.errors import InvalidArgument

FINISH_LENGTH, FINISH_EOS, FINISH_STOP = "length", "eos", "stop"
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
SEED_LIMIT = 2**31  # seeds are in [0, 2^31)
MAX_PROMPT_CHARS = 1_000_000
MAX_MESSAGES = 256
MAX_ROLE_CHARS = 32
MAX_SCHEMA_CHARS = 64 * 1024
TEMPLATE_BYTES_PER_MESSAGE = 128
FORMAT_TEXT = "text"
FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA = json_output.FORMAT_JSON_OBJECT, json_output.FORMAT_JSON_SCHEMA


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
    # A chat to render with the build's chat template, instead of prompt: [{"role", "content"}].
    messages: list[dict[str, str]] = field(default_factory=list)
    # FORMAT_TEXT (free), FORMAT_JSON_OBJECT, or FORMAT_JSON_SCHEMA with json_schema (JSON text).
    response_format: str = FORMAT_TEXT
    json_schema: str = ""

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def text_for_cost(self) -> str:
        """What bounds the prompt's tokens before it is tokenized (request_protocol.cost_tokens): the
        prompt, or the messages' contents with room for what a chat template writes around each
        (headers, markers, a dated system turn); the replica knows the exact count once it renders."""
        if not self.messages:
            return self.prompt
        room = TEMPLATE_BYTES_PER_MESSAGE * (len(self.messages) + 1)
        return "".join(m.get("content", "") for m in self.messages) + " " * room

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
    if req.messages and req.prompt:
        raise InvalidArgument("prompt, messages: set one of them, not both")
    if req.messages:
        _validate_messages(req.messages)
    elif not req.prompt:
        raise InvalidArgument("prompt: must not be empty (or send messages)")
    if len(req.prompt) > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"prompt: longer than {MAX_PROMPT_CHARS} characters")
    _validate_format(req)
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


def _validate_messages(messages: list[dict[str, str]]) -> None:
    if len(messages) > MAX_MESSAGES:
        raise InvalidArgument(f"messages: at most {MAX_MESSAGES}")
    total = 0
    for i, m in enumerate(messages):
        role = m.get("role", "")
        if not role or len(role) > MAX_ROLE_CHARS:
            raise InvalidArgument(f"messages[{i}].role: required, at most {MAX_ROLE_CHARS} characters")
        total += len(m.get("content", ""))
    if total > MAX_PROMPT_CHARS:
        raise InvalidArgument(f"messages: contents longer than {MAX_PROMPT_CHARS} characters in all")


def _validate_format(req: GenRequest) -> None:
    if req.response_format not in (FORMAT_TEXT, FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA):
        raise InvalidArgument(f"response_format: unknown type {req.response_format!r}")
    if req.response_format == FORMAT_JSON_SCHEMA:
        if not req.json_schema:
            raise InvalidArgument("response_format.json_schema: required for a json_schema format")
        if len(req.json_schema) > MAX_SCHEMA_CHARS:
            raise InvalidArgument(f"response_format.json_schema: longer than {MAX_SCHEMA_CHARS} characters")
        try:
            schema = json.loads(req.json_schema)
        except ValueError as exc:
            raise InvalidArgument(f"response_format.json_schema: not JSON ({exc})") from None
        if not isinstance(schema, (dict, bool)):
            raise InvalidArgument("response_format.json_schema: must be a JSON object")
        json_output.grammar(json_output.schema_text(req.response_format, req.json_schema))
    elif req.json_schema:
        raise InvalidArgument("response_format.json_schema: only with a json_schema format")


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
    # On the end chunk: where the request's time went, in milliseconds.
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0

    def to_fields(self) -> dict[str, str]:
        # Only the fields set: one is written per token or few, and a reader defaults the rest (shared.wire).
        return {"c": json.dumps({k: v for k, v in self.__dict__.items() if v or k == "kind"})}

    @classmethod
    def from_fields(cls, fields: dict[str, str]) -> "Chunk":
        return wire.from_json(cls, fields.get("c", ""))
