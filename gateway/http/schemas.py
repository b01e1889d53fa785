"""OpenAI request bodies to GenRequests, and GenRequest outcomes to OpenAI response bodies.

Every parameter of OpenAI's API is either supported, or refused with a 400 naming it (a value that
asks for nothing, such as `n: 1` or `logprobs: false`, is accepted: clients send defaults). A
field OpenAI does not define is refused too: nothing a client sends is ignored silently.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from typing import Any

from gateway.http.errors import RequestError
from shared.generation import (FINISH_EOS, FINISH_LENGTH, FINISH_STOP, FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA,
                               FORMAT_TEXT, Chunk, GenRequest)

FINISH = {FINISH_LENGTH: "length", FINISH_EOS: "stop", FINISH_STOP: "stop"}
DEFAULT_MAX_TOKENS = 256  # when the client gives neither max_tokens nor max_completion_tokens

SUPPORTED_COMMON = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options",
                    "user", "top_k"}
SUPPORTED = {
    "chat": SUPPORTED_COMMON | {"messages", "max_completion_tokens", "response_format"},
    "completion": SUPPORTED_COMMON | {"prompt", "response_format"},
}


def _none(v: Any) -> bool:
    return v is None


def _zero(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool) and v == 0)


def _one(v: Any) -> bool:
    return v is None or (isinstance(v, int) and not isinstance(v, bool) and v == 1)


def _false(v: Any) -> bool:
    return v is None or v is False


def _empty(v: Any) -> bool:
    return v is None or v == [] or v == {}


# OpenAI parameters Llamaship does not implement: accepted only with a value that asks for nothing.
REFUSED: dict[str, tuple[Any, str]] = {
    "n": (_one, "only n=1 (one choice per request)"),
    "best_of": (_one, "only best_of=1"),
    "logit_bias": (_empty, "logit_bias is not supported"),
    "logprobs": (lambda v: v is None or v is False or v == 0, "logprobs are not supported"),
    "top_logprobs": (_zero, "top_logprobs is not supported"),
    "echo": (_false, "echo is not supported"),
    "suffix": (_none, "suffix (insertion) is not supported"),
    "presence_penalty": (_zero, "presence_penalty is not supported"),
    "frequency_penalty": (_zero, "frequency_penalty is not supported"),
    "tools": (_empty, "tools (function calling) are not supported"),
    "tool_choice": (lambda v: v is None or v == "none", "tool_choice is not supported"),
    "parallel_tool_calls": (_none, "parallel_tool_calls is not supported"),
    "functions": (_empty, "functions (function calling) are not supported"),
    "function_call": (lambda v: v is None or v == "none", "function_call is not supported"),
    "store": (_false, "store is not supported"),
    "metadata": (_empty, "metadata is not supported"),
    "service_tier": (lambda v: v is None or v == "auto", "service_tier is not supported"),
    "modalities": (lambda v: v is None or v == ["text"], "only the text modality"),
    "audio": (_none, "audio output is not supported"),
    "prediction": (_none, "predicted outputs are not supported"),
    "reasoning_effort": (_none, "reasoning_effort is not supported"),
    "web_search_options": (_none, "web search is not supported"),
    "verbosity": (_none, "verbosity is not supported"),
    "prompt_cache_key": (_none, "prompt_cache_key is not supported"),
    "safety_identifier": (_none, "safety_identifier is not supported"),
}


@dataclass
class Parsed:
    """A request body, checked: what to generate and how to answer."""

    req: GenRequest
    stream: bool = False
    include_usage: bool = False
    user: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _number(body: dict, name: str, default: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise RequestError(f"{name}: must be a number", name)
    return float(v)


def _int(body: dict, name: str) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise RequestError(f"{name}: must be an integer", name)
    return v


def _string(v: Any, name: str) -> str:
    if not isinstance(v, str):
        raise RequestError(f"{name}: must be a string", name)
    return v


def _check_fields(body: dict, kind: str) -> None:
    for name, value in body.items():
        if name in SUPPORTED[kind]:
            continue
        if name in REFUSED:
            ok, why = REFUSED[name]
            if not ok(value):
                raise RequestError(f"{name}: {why} by Llamaship", name, "unsupported_parameter")
            continue
        raise RequestError(f"{name}: unknown parameter", name, "unknown_parameter")


def _stop(v: Any) -> list[str]:
    if v is None:
        return []
    if isinstance(v, str):
        return [v]
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return list(v)
    raise RequestError("stop: must be a string or a list of strings", "stop")


def _prompt(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        return v[0]
    if isinstance(v, list) and v and all(isinstance(p, str) for p in v):
        raise RequestError("prompt: one prompt per request (a list of several is not supported)", "prompt",
                           "unsupported_parameter")
    raise RequestError("prompt: must be a string (token-id prompts are not supported)", "prompt")


def _content(v: Any, i: int) -> str:
    where = f"messages[{i}].content"
    if v is None:
        return ""
    if isinstance(v, str):
        return v
    if isinstance(v, list):
        parts = []
        for j, part in enumerate(v):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError(f"{where}[{j}]: only text parts are supported", where, "unsupported_parameter")
            parts.append(part["text"])
        return "".join(parts)
    raise RequestError(f"{where}: must be a string or a list of text parts", where)


ROLES = ("system", "developer", "user", "assistant")


def _messages(v: Any) -> list[dict[str, str]]:
    if not isinstance(v, list) or not v:
        raise RequestError("messages: must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict):
            raise RequestError(f"messages[{i}]: must be an object", "messages")
        for k, val in m.items():
            if k in ("role", "content"):
                continue
            if k in ("tool_calls", "function_call", "refusal", "audio", "name") and val in (None, [], ""):
                continue
            raise RequestError(f"messages[{i}].{k}: not supported by Llamaship", f"messages[{i}].{k}",
                               "unsupported_parameter")
        role = m.get("role")
        if role not in ROLES:
            raise RequestError(f"messages[{i}].role: must be one of {', '.join(ROLES)} (tool messages are not "
                               "supported)", f"messages[{i}].role")
        out.append({"role": role, "content": _content(m.get("content"), i)})
    return out


def _response_format(v: Any) -> tuple[str, str]:
    if v is None:
        return FORMAT_TEXT, ""
    if not isinstance(v, dict) or v.get("type") not in (FORMAT_TEXT, FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA):
        raise RequestError("response_format: must be {\"type\": \"text\" | \"json_object\" | \"json_schema\"}",
                           "response_format")
    kind = v["type"]
    extra = set(v) - {"type", "json_schema"}
    if extra:
        raise RequestError(f"response_format.{sorted(extra)[0]}: unknown field", "response_format")
    if kind != FORMAT_JSON_SCHEMA:
        if "json_schema" in v:
            raise RequestError("response_format.json_schema: only with type json_schema", "response_format")
        return kind, ""
    spec = v.get("json_schema")
    if not isinstance(spec, dict) or "schema" not in spec:
        raise RequestError("response_format.json_schema: must be {\"name\", \"schema\", \"strict\"?}", "response_format")
    unknown = set(spec) - {"name", "schema", "strict", "description"}
    if unknown:
        raise RequestError(f"response_format.json_schema.{sorted(unknown)[0]}: unknown field", "response_format")
    return kind, json.dumps(spec["schema"])


def parse(body: Any, kind: str, request_id: str) -> Parsed:
    """`kind` is "chat" or "completion"."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    _check_fields(body, kind)
    model = _string(body.get("model"), "model") if body.get("model") is not None else ""
    if not model:
        raise RequestError("model: required", "model")
    if kind == "chat":
        messages, prompt = _messages(body.get("messages")), ""
        mt, mct = _int(body, "max_tokens"), _int(body, "max_completion_tokens")
        if mt is not None and mct is not None and mt != mct:
            raise RequestError("max_tokens, max_completion_tokens: give one (or equal values)", "max_completion_tokens")
        max_tokens = mct if mct is not None else mt
    else:
        if "prompt" not in body:
            raise RequestError("prompt: required", "prompt")
        messages, prompt = [], _prompt(body["prompt"])
        max_tokens = _int(body, "max_tokens")
    fmt, schema = _response_format(body.get("response_format"))
    top_k = _int(body, "top_k")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError("stream: must be true or false", "stream")
    opts = body.get("stream_options")
    include_usage = False
    if opts is not None:
        if not stream:
            raise RequestError("stream_options: only with stream: true", "stream_options")
        if not isinstance(opts, dict) or set(opts) - {"include_usage"} or \
                not isinstance(opts.get("include_usage", False), bool):
            raise RequestError("stream_options: only {\"include_usage\": true|false} is supported", "stream_options")
        include_usage = opts.get("include_usage", False)
    user = body.get("user")
    if user is not None:
        _string(user, "user")
    req = GenRequest(
        request_id=request_id, model=model, prompt=prompt, messages=messages,
        max_tokens=DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", 1.0), top_p=_number(body, "top_p", 1.0),
        top_k=top_k or 0, seed=_int(body, "seed"), stop=_stop(body.get("stop")),
        response_format=fmt, json_schema=schema)
    return Parsed(req, stream=bool(stream), include_usage=include_usage, user=user or "")


# -- answers -------------------------------------------------------------------------------------
def usage(end: Chunk) -> dict[str, int]:
    return {"prompt_tokens": end.prompt_tokens, "completion_tokens": end.completion_tokens,
            "total_tokens": end.prompt_tokens + end.completion_tokens}


def timings(end: Chunk) -> dict[str, float]:
    return {"queue_ms": round(end.queue_ms, 1), "prefill_ms": round(end.prefill_ms, 1),
            "decode_ms": round(end.decode_ms, 1)}


class Answer:
    """The OpenAI objects of one request (ids, timestamps, shapes for chat or completion)."""

    def __init__(self, kind: str, request_id: str, model: str):
        self.kind = kind
        self.id = ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id
        self.model = model
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def whole(self, text: str, end: Chunk) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": FINISH[end.finish_reason]}
            return self._base("chat.completion") | {"choices": [choice], "usage": usage(end)}
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": FINISH[end.finish_reason]}
        return self._base("text_completion") | {"choices": [choice], "usage": usage(end)}

    def piece(self, text: str, finish: str | None, include_usage: bool, first: bool = False) -> dict[str, Any]:
        if self.kind == "chat":
            delta: dict[str, Any] = {}
            if first:
                delta["role"] = "assistant"
            if text or (first and finish is None):
                delta["content"] = text
            out = self._base("chat.completion.chunk") | {
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        else:
            out = self._base("text_completion") | {
                "choices": [{"index": 0, "text": text, "logprobs": None, "finish_reason": finish}]}
        if include_usage:
            out["usage"] = None
        return out

    def usage_piece(self, end: Chunk) -> dict[str, Any]:
        obj = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return self._base(obj) | {"choices": [], "usage": usage(end)}
