"""Grain iterator states that survive a JSON round trip exactly.

Grain's checkpoint handler stores ``get_state()`` as JSON, which turns tuples into lists; grain
0.2.18's ConcatThenSplit packer compares its remainder slices with the tuple ``(-1, -1)``, so a
restored state wrongly claims a remainder and resumes on a different row. Tagging tuples on the
way out and rebuilding them on the way in makes resume exact whatever the packer compares.
"""

from __future__ import annotations

from typing import Any

_TUPLE = "__tuple__"


def encode(value: Any) -> Any:
    if isinstance(value, tuple):
        return {_TUPLE: [encode(v) for v in value]}
    if isinstance(value, list):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {k: encode(v) for k, v in value.items()}
    return value


def decode(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {_TUPLE}:
            return tuple(decode(v) for v in value[_TUPLE])
        return {k: decode(v) for k, v in value.items()}
    if isinstance(value, list):
        return [decode(v) for v in value]
    return value
