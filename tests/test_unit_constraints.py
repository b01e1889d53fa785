"""Structured output's token mask (serving_service.constraints) and the iteration sampler with it:
whatever the logits, greedy or sampled, the tokens picked spell JSON that validates against the
schema, and once it is complete only the end-of-sequence tokens remain."""

from __future__ import annotations

import json

import jsonschema
import numpy as np
import pytest
from tokenizers import Tokenizer

from serving_service.constraints import Constraint, guidance_options
from serving_service.iteration.sampler import Sampler
from shared import json_output
from shared.errors import InvalidArgument

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "color"],
    "additionalProperties": False,
}
VOCAB, EOS = 2048, 2


def _guidance(demo_model, fmt: str, schema: dict | None = None) -> dict:
    text = json_output.schema_text(fmt, json.dumps(schema) if schema is not None else "")
    return guidance_options(text, str(demo_model / "tokenizer.json"), VOCAB, frozenset({EOS}))


def _run(sampler: Sampler, rng: np.random.Generator, bias: dict[int, float] | None = None, steps: int = 400):
    out = []
    for _ in range(steps):
        logits = rng.normal(size=VOCAB).astype(np.float32)
        for token, b in (bias or {}).items():
            logits[token] += b
        token = sampler(logits)
        if token == EOS:
            return out
        out.append(token)
    raise AssertionError(f"no end of sequence after {steps} tokens")


@pytest.mark.parametrize("options", [{"do_sample": False},
                                     {"do_sample": True, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "random_seed": 3},
                                     {"do_sample": True, "temperature": 0.7, "top_k": 40, "top_p": 0.9, "random_seed": 5}])
@pytest.mark.parametrize("seed", range(3))
def test_any_logits_give_valid_json(demo_model, options, seed):
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    sampler = Sampler({**options, "guidance": _guidance(demo_model, "json_schema", SCHEMA)})
    ids = _run(sampler, np.random.default_rng(seed))
    value = json.loads(tok.decode(ids))
    jsonschema.validate(value, SCHEMA)
    assert " " not in tok.decode(ids).replace(value["name"], "")  # compact: no free whitespace


def test_json_object(demo_model):
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    close = tok.token_to_id("}")
    sampler = Sampler({"do_sample": True, "temperature": 1.0, "random_seed": 1,
                       "guidance": _guidance(demo_model, "json_object")})
    ids = _run(sampler, np.random.default_rng(0), bias={close: 4.0}, steps=2000)
    assert isinstance(json.loads(tok.decode(ids)), dict)


def test_complete_output_allows_only_eos(demo_model):
    tok = Tokenizer.from_file(str(demo_model / "tokenizer.json"))
    c = Constraint(_guidance(demo_model, "json_schema", {"enum": ["ok"]}))
    first = c.allowed(VOCAB)
    assert not first[EOS] and first.sum() >= 1
    for token in tok.encode('"ok"', add_special_tokens=False).ids:
        assert c.allowed(VOCAB)[token]
        c.consume(token)
    assert np.flatnonzero(c.allowed(VOCAB)).tolist() == [EOS]
    masked = c.mask(np.zeros(VOCAB + 8, np.float32))  # logits wider than the tokenizer: padding is never allowed
    assert np.flatnonzero(np.isfinite(masked)).tolist() == [EOS]


def test_unconstrained_sampler_is_unchanged():
    logits = np.log(np.array([0.05, 0.4, 0.3, 0.15, 0.1]))
    assert Sampler({"do_sample": False})(logits) == 1
    assert Sampler({"do_sample": False, "guidance": None})(logits) == 1


@pytest.mark.parametrize("schema, why", [
    ({"type": "foo"}, "Invalid type"),
    ({"type": "object", "properties": {"a": {"$ref": "#/nope"}}}, "does not exist"),
    ({"type": "string", "pattern": "(("}, "regex"),
    (False, "admits no output"),
])
def test_schemas_llguidance_cannot_compile_are_invalid_argument(schema, why):
    with pytest.raises(InvalidArgument, match=why):
        json_output.grammar(json_output.schema_text("json_schema", json.dumps(schema)))


def test_schema_text_is_compact_unless_the_schema_says():
    assert json.loads(json_output.schema_text("json_object", ""))["x-guidance"] == {"whitespace_flexible": False}
    own = json.loads(json_output.schema_text("json_schema", json.dumps(
        {"type": "object", "x-guidance": {"whitespace_flexible": True}})))
    assert own["x-guidance"] == {"whitespace_flexible": True}
    assert json_output.schema_text("text", "") is None


def test_genai_cohorts_keep_a_constrained_row_alone():
    """onnxruntime-genai's guidance constrains a whole generator: a constrained row gets a cohort of
    its own, and its guidance leaves the search options (set_guidance takes it)."""
    from serving_service.cohorts import Waiting, plan_cohorts

    guided = {"schema": '{"type": "object"}', "tokenizer": "t.json", "vocab_size": VOCAB, "eos": [EOS]}
    rows = [Waiting("a", [1, 5], 8, {"do_sample": False}, 10),
            Waiting("b", [1, 6], 8, {"do_sample": False, "guidance": guided}, 10),
            Waiting("c", [1, 7], 8, {"do_sample": False}, 10)]
    assert rows[1].guidance == guided and "guidance" not in rows[1].options
    plans = plan_cohorts(rows, max_rows=4, pad_token_id=0, context_length=64)
    assert sorted(sorted(w.rid for w in p.rows) for p in plans) == [["a", "c"], ["b"]]


def test_a_prewarmed_tokenizer_is_the_one_a_constrained_row_uses(tmp_path, demo_model):
    """The decode worker builds the tokenizer at load (constraints.prewarm), under the path
    spelling it has; a request names the same file its own way and must not build it again."""
    import shutil

    from serving_service import constraints

    path = tmp_path / "build" / "tokenizer.json"
    path.parent.mkdir()
    shutil.copy(demo_model / "tokenizer.json", path)
    constraints.prewarm(str(path), VOCAB, frozenset({EOS})).join(60)
    before = constraints._tokenizer.cache_info()
    guidance = guidance_options(json.dumps(SCHEMA), f"{tmp_path}/build/../build/tokenizer.json", VOCAB, frozenset({EOS}))
    Constraint(guidance)
    after = constraints._tokenizer.cache_info()
    assert (after.hits, after.misses) == (before.hits + 1, before.misses)
