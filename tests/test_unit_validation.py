import math

import pytest

from shared.errors import InvalidArgument
from shared.generation import Chunk, GenRequest, validate


def _req(**kw):
    base = dict(request_id="r", model="m", prompt="hi", max_tokens=4)
    base.update(kw)
    return GenRequest(**base)


def test_valid_request_passes_and_round_trips():
    r = _req(temperature=0.7, top_p=0.9, top_k=5, seed=3, stop=["\n"])
    validate(r, 16)
    assert GenRequest.from_json(r.to_json()) == r
    c = Chunk("end", finish_reason="eos", completion_tokens=3)
    assert Chunk.from_fields(c.to_fields()) == c


@pytest.mark.parametrize("kw, field", [
    (dict(model=""), "model"), (dict(prompt=""), "prompt"), (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=17), "max_tokens"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.01), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(stop=[""]), "stop"), (dict(stop=["x"] * 17), "stop"),
    (dict(stop=["x" * 257]), "stop"), (dict(seed=2**31), "seed"), (dict(seed=2**64 - 1), "seed"), (dict(seed=-1), "seed"),
])
def test_each_bad_field_is_named(kw, field):
    with pytest.raises(InvalidArgument) as info:
        validate(_req(**kw), 16)
    assert info.value.message.startswith(field)


def test_limits_are_inclusive():
    validate(_req(stop=["x" * 256] * 16, seed=2**31 - 1, temperature=1.0), 16)
