"""OpenAI request bodies to GenRequests: every field supported or refused by name; answers' shapes."""

from __future__ import annotations

import json

import pytest

from gateway.http.errors import RequestError, error_body
from gateway.http.schemas import REFUSED, Answer, parse
from shared.errors import FailedPrecondition, InvalidArgument, NotFound, ResourceExhausted
from shared.generation import Chunk


def test_completion_parameters_map_onto_the_request():
    p = parse({"model": "m", "prompt": ["hi"], "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "seed": 3,
               "stop": "\n", "stream": True, "stream_options": {"include_usage": True}, "user": "t",
               "top_k": 40, "n": 1, "logprobs": None}, "completion", "rid")
    r = p.req
    assert (r.request_id, r.model, r.prompt, r.max_tokens, r.temperature, r.top_p, r.seed, r.stop, r.top_k) == \
        ("rid", "m", "hi", 7, 0.5, 0.9, 3, ["\n"], 40)
    assert p.stream and p.include_usage and p.user == "t"


def test_chat_parameters_map_onto_the_request():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    p = parse({"model": "m", "messages": [{"role": "system", "content": "s"},
                                          {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                       {"type": "text", "text": "b"}]}],
               "max_completion_tokens": 5, "response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "x", "schema": schema}}},
              "chat", "rid")
    assert p.req.messages == [{"role": "system", "content": "s"}, {"role": "user", "content": "ab"}]
    assert p.req.prompt == "" and p.req.max_tokens == 5 and p.req.temperature == 1.0  # OpenAI's default
    assert p.req.response_format == "json_schema" and json.loads(p.req.json_schema) == schema
    assert parse({"model": "m", "messages": [{"role": "user", "content": "x"}],
                  "response_format": {"type": "json_object"}}, "chat", "r").req.response_format == "json_object"


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_every_refused_parameter_is_named_when_it_asks_for_something(name):
    with pytest.raises(RequestError) as info:
        parse({"model": "m", "prompt": "p", name: ["x"] if name != "n" else 3}, "completion", "r")
    assert info.value.param == name and name in info.value.message


@pytest.mark.parametrize("body, param", [
    ({"prompt": "p"}, "model"), ({"model": "m"}, "prompt"), ({"model": "m", "prompt": [1, 2]}, "prompt"),
    ({"model": "m", "prompt": "p", "messages": []}, "messages"), ({"model": "m", "prompt": "p", "max_tokens": 1.5},
                                                                  "max_tokens"),
    ({"model": "m", "prompt": "p", "stream_options": {"include_usage": True}}, "stream_options"),
    ({"model": "m", "prompt": "p", "max_completion_tokens": 3}, "max_completion_tokens"),
])
def test_bad_completion_bodies(body, param):
    with pytest.raises(RequestError) as info:
        parse(body, "completion", "r")
    assert info.value.param == param


def test_bad_chat_bodies():
    for body, param in [({"model": "m", "messages": [{"role": "tool", "content": "x"}]}, "messages[0].role"),
                        ({"model": "m", "messages": [{"role": "user", "content": "x", "name": "bob"}]},
                         "messages[0].name"),
                        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2,
                          "max_completion_tokens": 3}, "max_completion_tokens"),
                        ({"model": "m", "messages": [{"role": "user", "content": "x"}], "prompt": "p"}, "prompt")]:
        with pytest.raises(RequestError) as info:
            parse(body, "chat", "r")
        assert info.value.param == param, body


def test_errors_in_openai_shape():
    status, body = error_body(NotFound("model 'x' not found"))
    assert status == 404 and body["error"]["code"] == "model_not_found"
    status, body = error_body(ResourceExhausted("full", retry_after_s=1.0))
    assert status == 429 and body["error"]["type"] == "rate_limit_error"
    assert error_body(FailedPrecondition("the build has no chat template"))[0] == 400
    status, body = error_body(RequestError("n: only n=1", "n", "unsupported_parameter"))
    assert (status, body["error"]["param"], body["error"]["type"]) == (400, "n", "invalid_request_error")


def test_answer_shapes():
    end = Chunk("end", finish_reason="eos", prompt_tokens=3, completion_tokens=2)
    whole = Answer("chat", "rid", "m").whole("hi", end)
    assert whole["id"] == "chatcmpl-rid" and whole["choices"][0]["message"] == {"role": "assistant", "content": "hi"}
    assert whole["choices"][0]["finish_reason"] == "stop" and whole["usage"]["total_tokens"] == 5
    first = Answer("chat", "rid", "m").piece("h", None, True, first=True)
    assert first["choices"][0]["delta"] == {"role": "assistant", "content": "h"} and first["usage"] is None
    assert Answer("completion", "rid", "m").usage_piece(end)["choices"] == []


def _request(headers: dict[str, str]):
    from starlette.requests import Request

    return Request({"type": "http", "method": "POST", "path": "/v1/completions",
                    "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()]})


def test_bearer_keys_scopes_and_acting_for_a_tenant(tmp_path):
    from gateway.auth import KeyStore, create_key
    from gateway.http.app import acting_as, caller_of
    from gateway.http.errors import Unauthenticated
    from shared.errors import PermissionDenied
    from shared.tenancy import OPEN, Caller

    path = tmp_path / "keys.json"
    gen, comp, admin = create_key(path, "acme", ["generate"]), create_key(path, "acme", ["compile"]), \
        create_key(path, "ops", ["admin"])
    keys = KeyStore.load(path)
    assert caller_of(None, _request({}), "generate") == OPEN  # no keys configured: the open tenant
    assert caller_of(keys, _request({"Authorization": f"Bearer {gen}"}), "generate") == Caller("acme", admin=False)
    for headers in ({}, {"Authorization": "Bearer lsk_nope"}, {"Authorization": gen}):
        with pytest.raises(Unauthenticated):
            caller_of(keys, _request(headers), None)
    with pytest.raises(PermissionDenied):
        caller_of(keys, _request({"Authorization": f"Bearer {comp}"}), "generate")
    assert caller_of(keys, _request({"Authorization": f"Bearer {comp}"}), None).tenant == "acme"  # /v1/models
    ops = caller_of(keys, _request({"Authorization": f"Bearer {admin}"}), "generate")
    assert acting_as(ops, "acme") == Caller("acme", admin=True) and acting_as(ops, "") == ops
    assert acting_as(OPEN, "end-user-7").tenant == "end-user-7"  # an open gateway: any name, all models
    with pytest.raises(InvalidArgument):
        acting_as(ops, "no spaces allowed")
    acme = Caller("acme", admin=False)
    assert acting_as(acme, "acme") == acme
    with pytest.raises(PermissionDenied):
        acting_as(acme, "beta")
