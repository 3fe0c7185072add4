"""One-pass decoding of CloudEvents JSON bodies that builds the attributes and only validates `data`.

The gateway forwards an event's `data` as the exact text it arrived in, so building it into Python
objects (what `orjson.loads` does: ~40 objects for a 1 KB order, most of decoding time and GC work)
is wasted. `parse_events` gives, per event, its attributes, where its text and its `data` text are in
the body, and whether that text may be reused as is.

Contract (tested against orjson in tests/test_jsonparse.py): for any bytes, `parse_events` raises
`ValueError` iff `orjson.loads` rejects them -- the same grammar, strict UTF-8 everywhere, lone
`\\u` surrogates rejected, a UTF-8 BOM rejected, at most 1024 nested arrays/objects, a number that
would be infinite as a double rejected -- and otherwise the values are orjson's, with one intended
difference: integers beyond 64 bits in attributes are exact (orjson rounds them to floats; the
stdlib parser, which the SDK uses, keeps them), as the gateway passes payloads through unchanged.

The compiled twin (`umcef._native._jsonparse`) is used when built; `_parse_events_pure` is the
reference: orjson, then a scanner over the validated body for the positions.
"""

from __future__ import annotations

import contextlib
import importlib
import json
from collections.abc import Callable
from typing import Any

import orjson

from umcef.fabric import accel
from umcef.fabric.formats.json_format import _MEMBER, _WS, _value_end, has_long_digit_run

# (attributes, start, end, data_start, data_end, faithful); for a non-object element the decoded
# value instead of the attributes, and (-1, -1, False).
Parsed = tuple[Any, int, int, int, int, bool]

_KINDS: dict[type, str] = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}


def _loads(text: bytes) -> Any:
    """orjson's verdict and values; the stdlib's values when an integer may exceed 64 bits."""
    value = orjson.loads(text)  # orjson.JSONDecodeError is a ValueError
    if has_long_digit_run(text):  # an integer orjson may have read as a float
        with contextlib.suppress(RecursionError):  # nested deeper than the stdlib recurses: keep orjson's
            value = json.loads(text)
    return value


def _members(text: bytes, start: int) -> tuple[int, int, int, int]:
    """`start` at the '{' of a valid object: (end, member count, data_start, data_end) of its last
    member whose name decodes to "data" ((-1, -1) without one)."""
    members, data_start, data_end = 0, -1, -1
    pos = _WS.match(text, start + 1).end()  # type: ignore[union-attr]
    if text[pos] == 0x7D:
        return pos + 1, 0, -1, -1
    while True:
        member = _MEMBER.match(text, pos)
        assert member is not None  # valid JSON
        end = _value_end(text, member.end())
        members += 1
        if orjson.loads(member.group(1)) == "data":
            data_start, data_end = member.end(), end
        pos = _WS.match(text, end).end()  # type: ignore[union-attr]
        if text[pos] == 0x7D:
            return pos + 1, members, data_start, data_end
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]  # after the comma


def _element(text: bytes, start: int, item: Any) -> Parsed:
    """The tuple for the element `item` decoded from the text at `start`."""
    if type(item) is not dict:
        return item, start, _value_end(text, start), -1, -1, False
    end, members, data_start, data_end = _members(text, start)
    attrs = {name: value for name, value in item.items() if name != "data"}
    faithful = (
        members == len(item)
        and None not in attrs.values()
        and text.find(b"\n", start, end) < 0
        and text.find(b"\r", start, end) < 0
    )
    return attrs, start, end, data_start, data_end, faithful


def _as_bytes(body: Any) -> bytes:
    if type(body) is bytes:
        return body
    if isinstance(body, bytearray | memoryview):
        return bytes(body)
    raise TypeError(f"body must be bytes, not {type(body).__name__}")


def _parse_events_pure(body: bytes | bytearray | memoryview, batch: bool) -> list[Parsed]:
    """Pure twin of `umcef._native._jsonparse.parse_events`; use `parse_events`."""
    text = _as_bytes(body)
    value = _loads(text)
    pos = _WS.match(text).end()  # type: ignore[union-attr]
    if not batch:
        return [_element(text, pos, value)]
    if type(value) is not list:
        raise ValueError(f"a batch must be a JSON array, got {_KINDS.get(type(value), 'number')}")
    out: list[Parsed] = []
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    for item in value:
        parsed = _element(text, pos, item)
        out.append(parsed)
        pos = _WS.match(text, parsed[2]).end()  # type: ignore[union-attr]  # at the comma or ']'
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    return out


parse_events: Callable[[bytes | bytearray | memoryview, bool], list[Parsed]] = _parse_events_pure
"""Decode a structured event (`batch=False`) or a batch (`batch=True`, a JSON array) from `body`.

One tuple per event: `(attrs, start, end, data_start, data_end, faithful)`. `attrs` holds every
member except "data" (text order; a repeated name keeps its last value, as orjson does);
`body[start:end]` is the event's text and `body[data_start:data_end]` its (last) `data` value's text,
validated but not decoded ((-1, -1) without one); `faithful` is True when that text can stand for
the event: one line, no member name twice, no null attribute (nulls are dropped on decode). An
element that is not an object gives `(its decoded value, start, end, -1, -1, False)`.

Raises `ValueError` (with the byte position) for anything orjson rejects, and for a batch body that
is valid JSON but not an array ("a batch must be a JSON array, got <kind>", after validating it all:
a malformed body always gets its syntax error); `TypeError` for a body that is not bytes, bytearray
or memoryview (those two are copied).
"""
if accel.NATIVE:
    with contextlib.suppress(ImportError):  # an extension built before this module existed
        parse_events = importlib.import_module("umcef._native._jsonparse").parse_events
