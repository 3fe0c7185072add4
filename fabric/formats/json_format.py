"""The CloudEvents JSON format (structured mode and batches), on orjson."""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import re
from collections.abc import Callable
from typing import Any

import orjson

from umcef.fabric import accel
from umcef.fabric.accel import validate_attributes
from umcef.fabric.errors import EventError, InvalidAttribute, InvalidData, LimitExceeded, MalformedBody
from umcef.fabric.event import Event

CONTENT_TYPE = "application/cloudevents+json"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+json"

_JSON_MEDIA = re.compile(r"(application|text)/([A-Za-z0-9.\-]+\+)?json\s*(;.*)?\Z", re.I | re.S)
_JSON_CACHE: dict[str, bool] = {}
# orjson reads an integer beyond 64 bits as a float (precision silently lost) and refuses to write one.
# RFC 8259 allows any size and the gateway must pass payloads through unchanged (the SDK, on the stdlib
# parser, keeps them exact), so a body holding such a number -- it has a run of 20+ digits, or 19 after a
# minus sign (below -2**63; a positive 19-digit run such as a nanosecond timestamp fits), found by a
# compiled skip-scan in ~50 ns per KB (pure twin: translate + substring search, ~0.6 µs per KB) -- is
# re-read with the stdlib parser after orjson has vetted its syntax; `dumps` falls back to the stdlib
# writer for such values.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else b if b == 0x2D else 0x2E for b in range(256))
_LONG_RUN = b"0" * 20
_LONG_NEGATIVE = b"-" + b"0" * 19


def _has_long_digit_run(raw: bytes | bytearray) -> bool:
    """20+ consecutive ASCII digits, or 19 after '-'? Pure twin of
    `umcef._native._validate.has_long_digit_run`."""
    digits = raw.translate(_DIGITS_ONLY)
    return _LONG_RUN in digits or _LONG_NEGATIVE in digits


has_long_digit_run: Callable[[bytes | bytearray], bool] = _has_long_digit_run
if accel.NATIVE:  # the compiled scan probes ~1 byte in 19 instead of copying the body
    with contextlib.suppress(ImportError):  # an extension built before this function existed
        from umcef._native._validate import has_long_digit_run


def is_json_media_type(content_type: str | None) -> bool:
    """True for `application/json`, `text/json`, `*/*+json` (or no type: JSON is the default)."""
    if content_type is None:
        return True
    hit = _JSON_CACHE.get(content_type)
    if hit is None:
        hit = _JSON_MEDIA.match(content_type) is not None
        if len(_JSON_CACHE) < 1024:
            _JSON_CACHE[content_type] = hit
    return hit


def _event_from_dict(obj: Any, max_attributes: int = 0, max_value_bytes: int = 0) -> Event:
    """Build and validate an event from a decoded structured-mode JSON object.

    Pure twin of `umcef._native._validate.event_from_dict`; use `event_from_dict`."""
    if type(obj) is not dict:
        raise InvalidAttribute(f"a structured event must be a JSON object, got {_json_kind(obj)}")
    attrs = obj
    data: Any = None
    if "data" in attrs:
        data = attrs.pop("data")
        if "data_base64" in attrs:
            raise InvalidData("an event carries either 'data' or 'data_base64', not both", "data_base64")
    elif "data_base64" in attrs:
        encoded = attrs.pop("data_base64")
        if type(encoded) is not str:
            raise InvalidData("must be a base64 string", "data_base64")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidData("is not valid base64", "data_base64") from None
    if None in attrs.values():
        # JSON format §2.2: a null attribute value is the same as the attribute being absent.
        attrs = {k: v for k, v in attrs.items() if v is not None}
    validate_attributes(attrs, max_attributes, max_value_bytes)
    return Event(attrs, data)


def _events_from_list(items: list[Any], max_attributes: int = 0, max_value_bytes: int = 0) -> list[Event]:
    """`event_from_dict` for each item; an error names the item's index. Pure twin of
    `umcef._native._validate.events_from_list`; use `events_from_list`."""
    events = []
    for index, item in enumerate(items):
        try:
            events.append(_event_from_dict(item, max_attributes, max_value_bytes))
        except EventError as exc:
            raise exc.at(index) from None
    return events


# The compiled twins when built: they build the event without a Python frame per call and test for
# null attribute values by identity, which is a quarter of structured decoding.
event_from_dict = _event_from_dict
events_from_list = _events_from_list
if accel.NATIVE:
    with contextlib.suppress(ImportError):  # an extension built before these functions existed
        from umcef._native._validate import event_from_dict, events_from_list


# --- raw JSON text -----------------------------------------------------------------------------------
# A decoded event keeps the exact text it arrived in (`Event.raw`, and `Event.raw_data` for its `data`
# member) when that text is a faithful encoding of it, so that `encode` and the bindings' bodies reuse
# it instead of serializing again: the spool payload of an HTTP event is a slice of the request body.
# Faithful means: an object on one line (stored payloads are one event per line for `umcef tail
# --json`), no member name twice (parsers disagree on which one wins), no null attribute (dropped on
# decode). Positions come from a scanner over the body orjson has already validated, so it only needs
# to follow strings (quote and backslash aware) and nesting. Pure twins of `umcef._native._validate`'s
# `element_spans`, `object_span`, `events_from_array`, `event_from_object`: that one scans ~1 KB in
# 0.6 µs, this reference in ~25 µs -- far more than re-encoding costs (~2 µs) -- so the decoders keep
# raw text only with the compiled scanner (`KEEPS_RAW`); pure Python re-encodes, as it always did.

_STRING_RE = rb'"[^"\\]*+(?:\\.[^"\\]*+)*+"'
_WS = re.compile(rb"[ \t\n\r]*+")
_SCALAR = re.compile(rb"[^ \t\n\r,\]}]*+")  # number, true, false, null
_STRING = re.compile(_STRING_RE, re.S)
_MEMBER = re.compile(rb"(" + _STRING_RE + rb")[ \t\n\r]*+:[ \t\n\r]*+", re.S)  # a name and its colon
_NEXT_BRACKET = re.compile(rb'[^"\[\]{}]*+(?:' + _STRING_RE + rb'[^"\[\]{}]*+)*+[\[\]{}]', re.S)
_OPENERS = frozenset(b"[{")
# One element's position: (start, end, members, data_start, data_end); see `element_spans`.
Span = tuple[int, int, int, int, int]


def _value_end(body: bytes, i: int) -> int:
    """`i` at the first byte of a JSON value: the index after it, or -1."""
    first = body[i]
    if first == 0x22:
        match = _STRING.match(body, i)
        return -1 if match is None else match.end()
    if first in _OPENERS:  # valid JSON: each closer matches its opener's kind, counting is enough
        depth = 0
        while (match := _NEXT_BRACKET.match(body, i)) is not None:
            i = match.end()
            depth += 1 if body[i - 1] in _OPENERS else -1
            if depth == 0:
                return i
        return -1
    return _SCALAR.match(body, i).end()  # type: ignore[union-attr]  # matches the empty string


def _object_scan(body: bytes, i: int) -> Span | None:
    """`i` at '{': the object's span, its member count and where its `"data"` member's value is (the
    last one, as JSON parsers keep)."""
    n, members, data_start, data_end = len(body), 0, -1, -1
    pos = _WS.match(body, i + 1).end()  # type: ignore[union-attr]
    if pos < n and body[pos] == 0x7D:
        return i, pos + 1, 0, -1, -1
    while pos < n:
        member = _MEMBER.match(body, pos)
        if member is None or member.end() >= n:
            return None
        end = _value_end(body, member.end())
        if end < 0:
            return None
        members += 1
        if member.end(1) - member.start(1) == 6 and body.startswith(b'"data"', member.start(1)):
            data_start, data_end = member.end(), end
        pos = _WS.match(body, end).end()  # type: ignore[union-attr]
        if pos >= n:
            return None
        if body[pos] == 0x7D:
            return i, pos + 1, members, data_start, data_end
        if body[pos] != 0x2C:
            return None
        pos = _WS.match(body, pos + 1).end()  # type: ignore[union-attr]
    return None


def _scan_element(body: bytes, i: int) -> Span | None:
    if body[i] != 0x7B:
        end = _value_end(body, i)
        return (i, end, -1, -1, -1) if end > i else None
    span = _object_scan(body, i)
    if span is None:
        return None
    start, end = span[0], span[1]
    if body.find(b"\n", start, end) >= 0 or body.find(b"\r", start, end) >= 0:
        return start, end, -1, span[3], span[4]  # several lines: not reusable (see above)
    return span


def _element_spans(body: bytes | bytearray) -> list[Span] | None:
    """Where each element of the JSON array `body` is: (start, end, members, data_start, data_end)
    per element, or None when `body` is not an array. `members` counts the members of an element that
    is an object written on one line, else -1; data_start/data_end is the value of its `"data"` member
    (-1, -1 without one). `body` must be valid JSON (for anything else the result is unspecified).

    Pure twin of `umcef._native._validate.element_spans` (which `events_from_array` uses)."""
    text = bytes(body)
    n = len(text)
    pos = _WS.match(text).end()  # type: ignore[union-attr]
    if pos >= n or text[pos] != 0x5B:
        return None
    pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    spans: list[Span] = []
    if pos < n and text[pos] == 0x5D:
        return spans
    while pos < n:
        span = _scan_element(text, pos)
        if span is None:
            return None
        spans.append(span)
        pos = _WS.match(text, span[1]).end()  # type: ignore[union-attr]
        if pos >= n:
            return None
        if text[pos] == 0x5D:
            return spans
        if text[pos] != 0x2C:
            return None
        pos = _WS.match(text, pos + 1).end()  # type: ignore[union-attr]
    return None


def _object_span(body: bytes | bytearray) -> Span | None:
    """`element_spans` for a body holding one JSON object, or None when it is not an object.

    Pure twin of `umcef._native._validate.object_span` (which `event_from_object` uses)."""
    text = bytes(body)
    pos = _WS.match(text).end()  # type: ignore[union-attr]
    if pos >= len(text) or text[pos] != 0x7B:
        return None
    return _scan_element(text, pos)


def _attach(event: Event, item: Any, size: int, body: bytes, span: Span) -> None:
    """Give `event`, decoded from `item` (which had `size` members), its text when that is faithful;
    `event_from_dict` keeps `item` as the attributes unless it dropped null attributes."""
    start, end, members, data_start, data_end = span
    if members != size or event.attributes is not item:
        return
    event.raw = body[start:end]
    if data_start >= 0 and event.data is not None:
        event.raw_data = body[data_start:data_end]


def _events_from_array(
    items: list[Any], body: bytes | bytearray, max_attributes: int = 0, max_value_bytes: int = 0
) -> list[Event]:
    """`events_from_list`, each event with its raw text from `body`, the JSON text `items` was parsed
    from. Pure twin of `umcef._native._validate.events_from_array`; use `events_from_array`."""
    text = bytes(body)
    spans = _element_spans(text)
    events = []
    for index, item in enumerate(items):
        size = len(item) if type(item) is dict else -2  # before decoding pops `data`
        try:
            event = _event_from_dict(item, max_attributes, max_value_bytes)
        except EventError as exc:
            raise exc.at(index) from None
        if spans is not None and len(spans) == len(items):
            _attach(event, item, size, text, spans[index])
        events.append(event)
    return events


def _event_from_object(obj: Any, body: bytes | bytearray, max_attributes: int = 0, max_value_bytes: int = 0) -> Event:
    """`event_from_dict` with the event's raw text from `body`, the JSON text `obj` was parsed from.
    Pure twin of `umcef._native._validate.event_from_object`; use `event_from_object`."""
    text = bytes(body)
    size = len(obj) if type(obj) is dict else -2
    event = _event_from_dict(obj, max_attributes, max_value_bytes)
    span = _object_span(text)
    if span is not None:
        _attach(event, obj, size, text, span)
    return event


def _array_without_raw(items: list[Any], body: bytes, max_attributes: int = 0, max_value_bytes: int = 0) -> list[Event]:
    return events_from_list(items, max_attributes, max_value_bytes)


def _object_without_raw(obj: Any, body: bytes, max_attributes: int = 0, max_value_bytes: int = 0) -> Event:
    return event_from_dict(obj, max_attributes, max_value_bytes)


events_from_array = _events_from_array
event_from_object = _event_from_object
KEEPS_RAW = False  # whether `decode` / `decode_batch` keep raw text (see above)
_decode_array: Callable[[list[Any], bytes, int, int], list[Event]] = _array_without_raw
_decode_object: Callable[[Any, bytes, int, int], Event] = _object_without_raw
if accel.NATIVE:
    with contextlib.suppress(ImportError):  # an extension built before these functions existed
        from umcef._native._validate import event_from_object, events_from_array

        _decode_array, _decode_object, KEEPS_RAW = events_from_array, event_from_object, True


def event_to_dict(event: Event) -> dict[str, Any]:
    """The structured-mode JSON object for an event, ready for `orjson.dumps`.

    Binary attributes become base64 strings; JSON bytes are embedded as an `orjson.Fragment`.
    """
    out: dict[str, Any] = {}
    for name, value in event.attributes.items():
        out[name] = base64.b64encode(value).decode("ascii") if type(value) is bytes else value
    data = event.data
    if data is None:
        return out
    if type(data) is bytes or type(data) is bytearray:
        # Opaque bytes that are JSON text under a JSON content type embed as JSON, unparsed.
        if data and is_json_media_type(event.attributes.get("datacontenttype")) and _is_json(data):
            out["data"] = orjson.Fragment(data)
        else:
            out["data_base64"] = base64.b64encode(data).decode("ascii")
    else:
        out["data"] = data
    return out


def _is_json(raw: bytes | bytearray) -> bool:
    try:
        orjson.loads(raw)
    except orjson.JSONDecodeError:
        return False
    return True


def decode(body: bytes | str, max_attributes: int = 0, max_value_bytes: int = 0) -> Event:
    """One structured-mode event (keeping its text as `raw` when faithful)."""
    if UNREAD_DATA and type(body) is not str:  # (text may hold lone surrogates: orjson says what is wrong)
        text = _as_bytes(body)
        parsed = _parse_unread(text, False)
        if parsed is not None:
            return _unread_event(parsed[0], text, max_attributes, max_value_bytes)
    obj, text = _parse(body)
    return _decode_object(obj, text, max_attributes, max_value_bytes)


def decode_batch(
    body: bytes | str, max_batch: int = 0, max_attributes: int = 0, max_value_bytes: int = 0
) -> list[Event]:
    """A JSON batch: an array of structured events. Errors name the index of the bad event."""
    if UNREAD_DATA and type(body) is not str:  # (as in `decode`)
        text = _as_bytes(body)
        parsed = _parse_unread(text, True)
        if parsed is not None:
            if max_batch and len(parsed) > max_batch:
                raise LimitExceeded(f"batch of {len(parsed)} events exceeds the limit of {max_batch}")
            events = []
            for index, element in enumerate(parsed):
                try:
                    events.append(_unread_event(element, text, max_attributes, max_value_bytes))
                except EventError as exc:
                    raise exc.at(index) from None
            return events
    items, text = _parse(body)
    if type(items) is not list:
        raise InvalidAttribute(f"a batch must be a JSON array, got {_json_kind(items)}")
    if max_batch and len(items) > max_batch:
        raise LimitExceeded(f"batch of {len(items)} events exceeds the limit of {max_batch}")
    return _decode_array(items, text, max_attributes, max_value_bytes)


def encode(event: Event) -> bytes:
    """The structured-mode JSON text: the text the event arrived in when it has one (`Event.raw`)."""
    raw = event.raw
    return raw if raw is not None else dumps(event_to_dict(event))


def encode_batch(events: list[Event]) -> bytes:
    """A JSON batch; each event as `encode` writes it (its raw text when it has one)."""
    if not any(e.raw is not None for e in events):
        with contextlib.suppress(TypeError):  # an event needs the stdlib writer (see `dumps`)
            return orjson.dumps([event_to_dict(e) for e in events])
    return b"[" + b",".join([encode(e) for e in events]) + b"]"


def dumps(value: Any) -> bytes:
    """JSON text of a value: orjson, or the stdlib writer for integers beyond 64 bits."""
    try:
        return orjson.dumps(value)
    except TypeError as exc:
        try:
            text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
            return text.encode("utf-8")
        except (TypeError, ValueError):  # not a big-integer problem: report orjson's own error
            raise exc from None


def loads(body: bytes | str) -> Any:
    """Parse JSON (orjson), keeping integers beyond 64 bits exact; `MalformedBody` when invalid."""
    return _parse(body)[0]


def _as_bytes(body: bytes | str) -> bytes:
    return body.encode("utf-8") if isinstance(body, str) else bytes(body) if type(body) is not bytes else body


def _parse(body: bytes | str) -> tuple[Any, bytes]:
    """`loads`, and the body as bytes (what raw text is sliced from)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc}") from None
    text = _as_bytes(body)
    if has_long_digit_run(text):
        value = json.loads(text)
    return value, text


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )


# --- unread data -------------------------------------------------------------------------------------
# With the compiled parser (`umcef._native._jsonparse`), decoding builds each event's attributes and only
# validates its `data`: the event keeps that text (`Event.unread`) and parses it if something reads
# `data` (a filter on data, a binding that re-encodes it). Anything unusual -- invalid JSON, a body that
# is not an array of objects, integers beyond 64 bits, text that is not reusable -- takes the path
# above, so errors and values stay exactly what they were.

UNREAD_DATA = False
_parse_events: Callable[[bytes, bool], list[tuple[Any, int, int, int, int, bool]]] | None = None
if accel.NATIVE:
    with contextlib.suppress(ImportError):
        from umcef._native._jsonparse import parse_events as _parse_events

        UNREAD_DATA = True


def _parse_unread(text: bytes, batch: bool) -> list[tuple[Any, int, int, int, int, bool]] | None:
    """The parsed elements, or None when the body must take the full path."""
    if _parse_events is None or has_long_digit_run(text):
        return None
    try:
        return _parse_events(text, batch)
    except ValueError:  # the full path says what is wrong, as it always did
        return None


def _unread_event(element: tuple[Any, int, int, int, int, bool], text: bytes, max_attributes: int,
                  max_value_bytes: int) -> Event:
    attrs, start, end, data_start, data_end, faithful = element
    if faithful and data_start >= 0 and text[data_start] != 0x6E and type(attrs) is dict \
            and "data_base64" not in attrs:  # (0x6E: `"data": null` is no data)
        validate_attributes(attrs, max_attributes, max_value_bytes)
        whole = start == 0 and end == len(text)  # a body that is just the event (a spooled payload)
        return Event.unread(attrs, text if whole else text[start:end], text[data_start:data_end])
    # The rest as the full path decodes it: the element as orjson gives it, then its raw text if faithful.
    if type(attrs) is not dict:
        return event_from_dict(attrs, max_attributes, max_value_bytes)  # says what it is instead
    obj = {**attrs, "data": loads(text[data_start:data_end])} if data_start >= 0 else attrs
    event = event_from_dict(obj, max_attributes, max_value_bytes)
    if faithful:
        event.raw = text[start:end]
        if data_start >= 0 and event.data is not None:
            event.raw_data = text[data_start:data_end]
    return event
