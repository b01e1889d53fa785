"""Structured output over gRPC on both decode engines: json_schema and json_object, greedy and
sampled, alone and in a batch beside unconstrained rows. The output parses and validates; the
unconstrained rows beside it are exactly what they are alone."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import grpc
import jsonschema
import pytest

from shared.proto_gen.llamaship.gateway.v1 import gateway_pb2 as pb
from serving_service.constraints import Constraint, guidance_options
from shared import json_output
from tests.engine_switch import start_stack, use_engine

pytestmark = pytest.mark.integration
# a tiny model trained on Python sources closes JSON it can copy; "any object" has no bound of its own
PROMPT = 'admin = {"name": "ada", "age": 36, "role": "admin"}\nguest = {"name": "bob", "age": 7, "role": "guest"}\nuser = '

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "role": {"enum": ["admin", "user", "guest"]},
    },
    "required": ["name", "age", "role"],
    "additionalProperties": False,
}
AS_SCHEMA = pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA, json_schema=json.dumps(SCHEMA))
AS_OBJECT = pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_OBJECT)
SAMPLED = {"temperature": 0.9, "top_p": 0.95, "seed": 11}


@pytest.fixture(scope="module")
def structured_stack(tmp_path_factory, demo_model):
    stack, client = start_stack(tmp_path_factory.mktemp("structured"), demo_model)
    yield stack, client
    client.close()
    stack.stop()


@pytest.fixture(scope="module", params=["genai", "iteration"])
def client(request, structured_stack):
    stack, client = structured_stack
    use_engine(stack, client, request.param)
    return client


def _check(out, fmt, demo_model) -> None:
    """json_schema (bounded by its schema): complete, then only the end of sequence. json_object
    has no bound, and the tiny demo model rarely closes a string it opened: output cut by
    max_tokens must be a prefix the JSON grammar accepts token by token (checked by llguidance
    apart from the replica), and complete output parses."""
    if fmt is AS_SCHEMA or out.finish_reason == "eos":
        assert out.finish_reason == "eos"
        value = json.loads(out.text)
        assert isinstance(value, dict)
        if fmt is AS_SCHEMA:
            jsonschema.validate(value, SCHEMA)
        return
    assert out.finish_reason == "length" and out.text.startswith("{")
    text = json_output.schema_text("json_object", "")
    matcher = Constraint(guidance_options(text, str(demo_model / "tokenizer.json"), 2048, frozenset({2}))).matcher
    assert matcher.consume_tokens(list(out.token_ids)), matcher.get_error()


@pytest.mark.parametrize("fmt", [AS_SCHEMA, AS_OBJECT], ids=["json_schema", "json_object"])
@pytest.mark.parametrize("options", [{}, SAMPLED], ids=["greedy", "sampled"])
def test_output_validates(client, demo_model, fmt, options):
    out = client.generate("demo", PROMPT, 96, response_format=fmt, **options)
    _check(out, fmt, demo_model)
    again = client.generate("demo", PROMPT, 96, response_format=fmt, **options)
    assert again.token_ids == out.token_ids  # greedy, or sampled with a seed: reproducible


def test_constrained_and_free_rows_together(client, demo_model):
    """Constrained rows (greedy, sampled; both formats) and free rows (greedy, sampled) at once."""
    jobs = [dict(response_format=AS_SCHEMA), dict(response_format=AS_SCHEMA, **SAMPLED),
            dict(response_format=AS_OBJECT), {}, dict(SAMPLED)]
    alone = [client.generate("demo", PROMPT, 96, **job) for job in jobs]
    with ThreadPoolExecutor(len(jobs) * 2) as pool:
        together = list(pool.map(lambda job: client.generate("demo", PROMPT, 96, **job), jobs * 2))
    for i, out in enumerate(together):
        job = jobs[i % len(jobs)]
        assert out.token_ids == alone[i % len(jobs)].token_ids
        if "response_format" in job:
            _check(out, job["response_format"], demo_model)


def test_a_schema_llguidance_cannot_compile_is_invalid_argument(client):
    bad = pb.ResponseFormat(type=pb.ResponseFormat.TYPE_JSON_SCHEMA,
                            json_schema=json.dumps({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}))
    with pytest.raises(grpc.RpcError) as err:
        client.generate("demo", PROMPT, 8, response_format=bad)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "json_schema" in err.value.details()
