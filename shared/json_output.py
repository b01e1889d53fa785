"""Structured output's JSON schema, as both ends see it: the gateway refuses a schema llguidance
cannot compile, the replica constrains decoding with it (serving_service.constraints).

JSON is generated compact (no free whitespace between tokens): a model may otherwise spend its
whole budget on newlines that the grammar allows, and the output never closes. A schema's own
"x-guidance" options take precedence.
"""

from __future__ import annotations

import json

from shared.errors import InvalidArgument

FORMAT_JSON_OBJECT, FORMAT_JSON_SCHEMA = "json_object", "json_schema"
COMPILE_DEFAULTS = {"whitespace_flexible": False}


def schema_text(response_format: str, json_schema: str) -> str | None:
    """The schema the output must satisfy, with llguidance's compile options, as JSON text;
    None for free text."""
    if response_format == FORMAT_JSON_OBJECT:
        schema: object = {"type": "object"}
    elif response_format == FORMAT_JSON_SCHEMA:
        schema = json.loads(json_schema)
    else:
        return None
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise InvalidArgument("response_format.json_schema: false admits no output")
    options = schema.get("x-guidance")
    schema = {**schema, "x-guidance": {**COMPILE_DEFAULTS, **(options if isinstance(options, dict) else {})}}
    return json.dumps(schema)


def grammar(schema: str) -> str:
    """llguidance's grammar for `schema` (from schema_text); InvalidArgument when it cannot compile."""
    from llguidance import LLMatcher

    try:
        text = LLMatcher.grammar_from_json_schema(schema)
    except ValueError as exc:
        raise InvalidArgument(f"response_format.json_schema: {exc}") from None
    is_error, messages = LLMatcher.validate_grammar_with_warnings(text)
    if is_error:
        raise InvalidArgument(f"response_format.json_schema: cannot be compiled: {messages[0][:500]}")
    return text
