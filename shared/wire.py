"""Records that cross Redis (JSON), decoded tolerantly so that services of different versions
can run side by side during a rolling upgrade: unknown fields are ignored, missing ones take
their defaults. A record that lacks a required field, or is not JSON, raises WireError."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class WireError(ValueError):
    """A record from Redis that cannot be decoded at all."""


def from_dict(cls: type[T], data: Any) -> T:
    """Build dataclass `cls` from `data`, keeping only the fields it declares."""
    if not isinstance(data, Mapping):
        raise WireError(f"{cls.__name__}: expected a JSON object, got {type(data).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    try:
        return cls(**{k: v for k, v in data.items() if k in known})
    except TypeError as exc:  # a required field is missing
        raise WireError(f"{cls.__name__}: {exc}") from None


def from_json(cls: type[T], text: str | bytes) -> T:
    try:
        data = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise WireError(f"{cls.__name__}: not JSON ({exc})") from None
    return from_dict(cls, data)
