"""Tolerant decoding of records that cross Redis (rolling upgrades)."""

from dataclasses import dataclass, field

import pytest

from shared.wire import WireError, from_json


@dataclass
class Rec:
    a: str
    b: int = 3
    c: list = field(default_factory=list)


def test_unknown_fields_are_ignored_and_missing_ones_default():
    assert from_json(Rec, '{"a": "x", "new_field": 1}') == Rec("x", 3, [])


def test_a_record_without_a_required_field_or_not_json_is_a_wire_error():
    with pytest.raises(WireError):
        from_json(Rec, '{"b": 1}')
    with pytest.raises(WireError):
        from_json(Rec, "not json")
    with pytest.raises(WireError):
        from_json(Rec, "[1, 2]")
