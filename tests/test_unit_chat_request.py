"""GenRequest's chat messages and response format: what validate() refuses (naming the field),
and the prompt-size bound a messages request is admitted with before the replica renders it."""

from __future__ import annotations

import json

import pytest

from shared.errors import InvalidArgument
from shared.generation import MAX_MESSAGES, MAX_PROMPT_CHARS, MAX_SCHEMA_CHARS, GenRequest, validate
from shared.request_protocol import cost_tokens

SCHEMA = json.dumps({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]})


def _req(**kw) -> GenRequest:
    base = dict(request_id="r", model="m", prompt="", max_tokens=8,
                messages=[{"role": "user", "content": "hi"}])
    base.update(kw)
    return GenRequest(**base)


def test_valid_requests_pass():
    validate(_req())
    validate(_req(messages=[], prompt="hello"))
    validate(_req(response_format="json_object"))
    validate(_req(response_format="json_schema", json_schema=SCHEMA))
    validate(_req(response_format="json_schema", json_schema="true"))


@pytest.mark.parametrize("kw, field", [
    (dict(prompt="x"), "prompt, messages"),
    (dict(messages=[]), "prompt: must not be empty"),
    (dict(messages=[{"role": "", "content": "x"}]), r"messages\[0\].role"),
    (dict(messages=[{"role": "user", "content": "a"}, {"content": "b"}]), r"messages\[1\].role"),
    (dict(messages=[{"role": "r" * 33, "content": "x"}]), r"messages\[0\].role"),
    (dict(messages=[{"role": "user", "content": "x"}] * (MAX_MESSAGES + 1)), "messages: at most"),
    (dict(messages=[{"role": "user", "content": "x" * (MAX_PROMPT_CHARS // 2 + 1)}] * 2), "in all"),
    (dict(response_format="xml"), "response_format: unknown type"),
    (dict(response_format="json_schema"), "json_schema: required"),
    (dict(response_format="json_schema", json_schema="{nope"), "not JSON"),
    (dict(response_format="json_schema", json_schema="[1]"), "must be a JSON object"),
    (dict(response_format="json_schema", json_schema=" " * (MAX_SCHEMA_CHARS + 1)), "longer than"),
    (dict(response_format="json_object", json_schema=SCHEMA), "only with a json_schema format"),
    (dict(response_format="text", json_schema=SCHEMA), "only with a json_schema format"),
    (dict(response_format="json_schema", json_schema='{"type": "foo"}'), "cannot be compiled"),
    (dict(response_format="json_schema", json_schema='{"$ref": "#/missing"}'), "cannot be compiled"),
    (dict(response_format="json_schema", json_schema="false"), "admits no output"),
])
def test_refused_naming_the_field(kw, field):
    with pytest.raises(InvalidArgument, match=field):
        validate(_req(**kw))


def test_wire_round_trip():
    req = _req(response_format="json_schema", json_schema=SCHEMA,
               messages=[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}])
    assert GenRequest.from_json(req.to_json()) == req


def test_messages_are_admitted_with_room_for_the_template():
    """The queue's KV bound for a messages request covers its contents plus what a chat template
    adds around each message, so admission does not undercount before the replica renders."""
    req = _req(messages=[{"role": "user", "content": "abc"}, {"role": "assistant", "content": "de"}])
    assert req.text_for_cost.startswith("abcde") and len(req.text_for_cost) >= 5 + 3 * 100
    assert cost_tokens(req.text_for_cost, 8, 10_000) > cost_tokens("abcde", 8, 10_000) + 300
    assert _req(messages=[], prompt="xyz").text_for_cost == "xyz"
