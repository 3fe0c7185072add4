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
# parser, keeps them exact), so a body holding such a number -- it has a run of 20+ digits, found by a
# compiled skip-scan in ~50 ns per KB (pure twin: translate + substring search, ~0.6 µs per KB) -- is
# re-read with the stdlib parser after orjson has vetted its syntax; `dumps` falls back to the stdlib
# writer for such values.
_DIGITS_ONLY = bytes(0x30 if 0x30 <= b <= 0x39 else 0x2E for b in range(256))
_LONG_RUN = b"0" * 20


def _has_long_digit_run(raw: bytes | bytearray) -> bool:
    """20+ consecutive ASCII digits? Pure twin of `umcef._native._validate.has_long_digit_run`."""
    return _LONG_RUN in raw.translate(_DIGITS_ONLY)


has_long_digit_run: Callable[[bytes | bytearray], bool] = _has_long_digit_run
if accel.NATIVE:  # the compiled scan probes ~1 byte in 20 instead of copying the body
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
    """One structured-mode event."""
    return event_from_dict(loads(body), max_attributes, max_value_bytes)


def decode_batch(
    body: bytes | str, max_batch: int = 0, max_attributes: int = 0, max_value_bytes: int = 0
) -> list[Event]:
    """A JSON batch: an array of structured events. Errors name the index of the bad event."""
    items = loads(body)
    if type(items) is not list:
        raise InvalidAttribute(f"a batch must be a JSON array, got {_json_kind(items)}")
    if max_batch and len(items) > max_batch:
        raise LimitExceeded(f"batch of {len(items)} events exceeds the limit of {max_batch}")
    return events_from_list(items, max_attributes, max_value_bytes)


def encode(event: Event) -> bytes:
    return dumps(event_to_dict(event))


def encode_batch(events: list[Event]) -> bytes:
    try:
        return orjson.dumps([event_to_dict(e) for e in events])
    except TypeError:  # an event needs the stdlib writer (see `dumps`); the others keep orjson
        return b"[" + b",".join(encode(e) for e in events) + b"]"


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
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedBody(f"body is not valid JSON: {exc}") from None
    raw = body.encode("utf-8") if isinstance(body, str) else body
    if has_long_digit_run(raw):
        value = json.loads(raw)
    return value


def _json_kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number"
    )
