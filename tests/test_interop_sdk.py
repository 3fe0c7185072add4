"""Interop with the official CloudEvents SDK (`cloudevents` 2.2.0, `cloudevents.core`), both ways.

For the HTTP binary mode, the structured mode and JSON batches:

- ours → SDK: whatever we encode, the SDK decodes to an event equal to ours;
- SDK → ours: whatever the SDK encodes, we decode to an event equal to the one the SDK itself decodes
  from the same message and, wherever the SDK round-trips its own event, equal to the SDK's original.

The SDK has no batch API, so a batch is compared item by item with the SDK's JSON format: our batch
array is split and each member read by `JSONFormat.read`; the SDK's "batch" is the JSON array of its
`JSONFormat.write` outputs.

Representation differences are normalised in exactly one place, `assert_same`; see its docstring for
the SDK quirks it absorbs. Quirks that change the *value* are not absorbed: the tests show them.
"""

from __future__ import annotations

import base64
import json
import string
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import http as sdk_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umcef.fabric.bindings import http
from umcef.fabric.errors import InvalidAttribute
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

pytestmark = pytest.mark.pure_twin  # CI runs this file again on the pure-Python validator
SDK_JSON = JSONFormat()


# ---------------------------------------------------------------------------------------------------
# The one normalisation helper.


def assert_same(ours: Event, sdk: BaseCloudEvent, *, binary: bool) -> None:
    """Assert that our event and the SDK's are the same CloudEvent, modulo representation.

    What is normalised, and why (each is how the SDK represents a value, not a different value):

    - `time`: the SDK holds a `datetime`, we hold the RFC 3339 string. Both become (instant, UTC
      offset) at microsecond precision: the SDK's datetime cannot hold nanoseconds.
    - The SDK's `CloudEvent()` stamps `time` with "now" when an event has none (also when *decoding*
      one without it), so when our event has no `time`, the SDK's must be such a stamp and is dropped.
    - Binary mode (`binary=True`) carries every attribute as its canonical string (spec §Type System):
      values compare as those strings (True → "true", bytes → base64, 42 → "42").
    - JSON carries no binary type: a Binary attribute compares as its base64 string in JSON too.
    - Data. Binary mode: the SDK parses a body under a JSON media type (or none: JSON is the default)
      into a value, else falls back to text, else bytes; we keep the body's bytes. Both sides compare
      by that same rule, and an empty body is no data. Under a non-JSON type, text and bytes compare
      as bytes (UTF-8). JSON `null` data is no data in both.
    """
    mine, theirs = _attributes(ours.attributes, binary), _attributes(sdk.get_attributes(), binary)
    if "time" not in ours.attributes and "time" in theirs:
        assert isinstance(sdk.get_attributes()["time"], datetime), "SDK time is not a stamped datetime"
        del theirs["time"]
    assert mine == theirs
    content_type = ours.attributes.get("datacontenttype")
    assert _data(ours.data, content_type, binary) == _data(sdk.get_data(), content_type, binary)


def _attributes(attributes: Mapping[str, Any], binary: bool) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, value in attributes.items():
        if name == "time":
            stamp = value if isinstance(value, datetime) else _parse_time(value)
            out[name] = (stamp.replace(tzinfo=UTC) - stamp.utcoffset(), stamp.utcoffset())  # type: ignore[operator]
        elif isinstance(value, datetime):  # an SDK extension holding a datetime: its RFC 3339 form
            out[name] = value.isoformat().replace("+00:00", "Z")
        elif isinstance(value, bytes):
            out[name] = base64.b64encode(value).decode()
        elif binary and not isinstance(value, str):
            out[name] = http.attribute_to_string(value)
        else:
            out[name] = value
    return out


def _parse_time(value: str) -> datetime:
    head, dot, rest = value.upper().partition(".")
    if dot:  # cut the fraction to microseconds, keep the offset
        digits = len(rest) - len(rest.lstrip(string.digits))
        rest = rest[: min(digits, 6)] + rest[digits:]
    return datetime.fromisoformat(head + dot + rest)


def _data(data: Any, content_type: str | None, binary: bool) -> Any:
    if isinstance(data, bytearray):
        data = bytes(data)
    if data is None or (binary and data == b""):  # an empty body is no data
        return None
    if json_format.is_json_media_type(content_type):
        if isinstance(data, bytes):  # the SDK's read_data rule: JSON, else text, else bytes
            try:
                return json.loads(data)
            except ValueError:
                try:
                    return data.decode("utf-8")
                except UnicodeDecodeError:
                    return data
        return data
    raw = data.encode("utf-8") if isinstance(data, str) else data
    return None if binary and raw == b"" else raw


# ---------------------------------------------------------------------------------------------------
# Moving events across.


def ours_to_sdk(event: Event, mode: str) -> BaseCloudEvent:
    """Encode with our binding, decode with the SDK's."""
    if mode == "binary":
        headers, body = http.encode_binary(event)
        return sdk_http.from_binary(sdk_http.HTTPMessage(headers, body), SDK_JSON)
    if mode == "structured":
        headers, body = http.encode_structured(event)
        assert headers == {"content-type": SDK_JSON.get_content_type()}
        return sdk_http.from_structured(sdk_http.HTTPMessage(headers, body), SDK_JSON)
    (decoded,) = ours_batch_to_sdk([event])
    return decoded


def ours_batch_to_sdk(events: list[Event]) -> list[BaseCloudEvent]:
    headers, body = http.encode_batch(events)
    assert headers == {"content-type": "application/cloudevents-batch+json"}
    items = json.loads(body)
    assert isinstance(items, list)
    return [SDK_JSON.read(None, json.dumps(item).encode()) for item in items]


def sdk_message(event: BaseCloudEvent, mode: str) -> sdk_http.HTTPMessage:
    if mode == "binary":
        return sdk_http.to_binary(event, SDK_JSON)
    return sdk_http.to_structured(event, SDK_JSON)


def sdk_to_ours(event: BaseCloudEvent, mode: str) -> tuple[Event, BaseCloudEvent]:
    """Encode with the SDK; decode with ours and with the SDK itself (same message)."""
    if mode == "batch":
        body = b"[" + SDK_JSON.write(event) + b"]"
        (decoded,) = http.decode_request({"content-type": "application/cloudevents-batch+json"}, body)
        return decoded, SDK_JSON.read(None, SDK_JSON.write(event))
    message = sdk_message(event, mode)
    (decoded,) = http.decode_request(message.headers, message.body)
    return decoded, sdk_http.from_http(message, SDK_JSON)


def to_sdk(event: Event, mode: str) -> BaseCloudEvent:
    """The SDK event a user would build for `event`: `time` as a datetime (the SDK requires it).

    The SDK writes a bool extension as "True" and bytes as "b'...'" in binary mode, and cannot write
    bytes at all in JSON, so a careful SDK user passes those as their canonical strings; we do too
    (test_sdk_quirk_* shows the raw behaviour)."""
    attrs: dict[str, Any] = {}
    for name, value in event.attributes.items():
        if name == "time":
            attrs[name] = datetime.fromisoformat(value.upper())
        elif isinstance(value, bytes) or (mode == "binary" and isinstance(value, bool)):
            attrs[name] = http.attribute_to_string(value)
        else:
            attrs[name] = value
    return SdkEvent(attrs, event.data)


def sdk_round_trips(event: BaseCloudEvent, mode: str) -> bool:
    """Whether the SDK decodes its own message back to its event (else it loses something itself)."""
    if mode == "batch":
        again = SDK_JSON.read(None, SDK_JSON.write(event))
    else:
        again = sdk_http.from_http(sdk_message(event, mode), SDK_JSON)
    binary = mode == "binary"
    content_type = event.get_datacontenttype()
    return _attributes(again.get_attributes(), binary) == _attributes(event.get_attributes(), binary) and (
        _data(again.get_data(), content_type, binary) == _data(event.get_data(), content_type, binary)
    )


def check_both_ways(event: Event, mode: str) -> None:
    assert_same(event, ours_to_sdk(event, mode), binary=mode == "binary")
    original = to_sdk(event, mode)
    decoded, sdk_decoded = sdk_to_ours(original, mode)
    assert_same(decoded, sdk_decoded, binary=mode == "binary")
    if sdk_round_trips(original, mode):
        assert_same(decoded, original, binary=mode == "binary")


MODES = ["binary", "structured", "batch"]


def ev(data: Any = None, **attrs: Any) -> Event:
    base = {"specversion": "1.0", "id": "ord-1", "source": "https://shop.example.com/orders",
            "type": "com.example.order.placed", "time": "2025-03-14T09:26:53.589+01:00"}  # fmt: skip
    base.update(attrs)
    return Event({k: v for k, v in base.items() if v is not None}, data)


ORDER = {"orderId": "ORD-1", "items": [{"sku": "A", "qty": 2, "price": 9.95}], "paid": True, "note": None}
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7F))  # every printable ASCII character incl. ' ', '"', '%'

CASES: dict[str, Event] = {
    "json order": ev(ORDER, datacontenttype="application/json", partitionkey="c-4711",
                     traceparent="00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    "json data, no datacontenttype": ev(ORDER),
    "binary data, all byte values": ev(bytes(range(256)), datacontenttype="application/octet-stream"),
    "json body kept as bytes": ev(b'{"a": [1, 2.5, "\\u00fc"]}', datacontenttype="application/json"),
    "unicode attributes": ev(id="ünï-😀-€", type="com.例え.order", subject="Grüße/東京/😀",
                             note="ünï ✓ 😀 \u00a0 \ufffd \U0010fffd"),
    "unicode text data": ev("Grüße, 東京 😀\n", datacontenttype="text/plain; charset=utf-8"),
    "unicode json data": ev({"k": "Grüße 😀", "ü": ["東京"]}, datacontenttype="application/json"),
    "string extension, percent edge cases": ev(pct=PRINTABLE, pct2="100%", pct3="%41", q='"quoted"'),
    "int extensions at the 32-bit edges": ev(imax=2**31 - 1, imin=-(2**31), izero=0),
    "bool extensions": ev(yes=True, no=False),
    "binary extension": ev(blob=b"\x00\x01\xfe\xff", empty=b""),
    "uri and uri-reference extensions": ev(schemaref="https://example.com/s.json#/defs/Order", rel="../a?b=c"),
    "timestamp extension": ev(expirytime="2025-03-15T00:00:00Z"),
    "all optional attributes": ev({"a": 1}, datacontenttype="application/vnd.example+json; v=2",
                                  dataschema="https://example.com/order.json", subject="orders/1"),
    "no optional attributes at all": ev(time=None),
    "no time, binary data": ev(b"\x00", time=None, datacontenttype="application/octet-stream"),
    "empty bytes data": ev(b"", datacontenttype="application/octet-stream"),
    "empty text data": ev("", datacontenttype="text/plain"),
    "json object": ev({"a": {"b": {}}, "c": []}, datacontenttype="application/json"),
    "json array": ev([1, "two", 3.5, None, True, [], {}], datacontenttype="application/json"),
    "json string": ev("just a string", datacontenttype="application/json"),
    "json string that looks like a number": ev("42", datacontenttype="application/json"),
    "json integer": ev(42, datacontenttype="application/json"),
    "json big integer": ev({"n": 123456789012345678901234567890, "m": -(2**70)}, datacontenttype="application/json"),
    "json float": ev(-1.25e-7, datacontenttype="application/json"),
    "json true": ev(True, datacontenttype="application/json"),
    "json false": ev(False, datacontenttype="application/json"),
    "json zero": ev(0, datacontenttype="application/json"),
    "text/json media type": ev({"a": 1}, datacontenttype="text/json"),
    "xml text data": ev("<a>ü</a>", datacontenttype="application/xml"),
    "time with nanoseconds": ev(time="2025-03-14T09:26:53.123456789Z"),
    "time, negative offset, no fraction": ev(time="1996-12-19T16:39:57-08:00"),
    "time on a leap day": ev(time="2024-02-29T23:59:59.5+14:00"),
}  # fmt: skip


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
def test_spec_cases_both_ways(case: str, mode: str) -> None:
    check_both_ways(CASES[case], mode)


def test_batch_of_many_both_ways() -> None:
    events = list(CASES.values())
    for ours, theirs in zip(events, ours_batch_to_sdk(events), strict=True):
        assert_same(ours, theirs, binary=False)
    originals = [to_sdk(e, "batch") for e in events]
    body = b"[" + b",".join(SDK_JSON.write(e) for e in originals) + b"]"
    decoded = json_format.decode_batch(body)
    for mine, original in zip(decoded, originals, strict=True):
        assert_same(mine, SDK_JSON.read(None, SDK_JSON.write(original)), binary=False)


# ---------------------------------------------------------------------------------------------------
# What the SDK does differently, shown rather than hidden.


def test_sdk_quirk_binary_bool_and_bytes_extensions_are_not_canonical() -> None:
    """The SDK writes `str(value)`: "True" and "b'\\x00'" instead of the spec's "true" and base64.
    We decode those headers exactly as the SDK itself does (as strings)."""
    original = SdkEvent({"id": "1", "source": "/s", "type": "t", "flag": True, "blob": b"\x00"})
    message = sdk_http.to_binary(original, SDK_JSON)
    assert (message.headers["ce-flag"], message.headers["ce-blob"]) == ("True", "b'\\x00'")
    (decoded,) = http.decode_request(message.headers, message.body)
    assert decoded.attributes["flag"] == "True"
    assert decoded.attributes["blob"] == "b'\\x00'"
    assert_same(decoded, sdk_http.from_binary(message, SDK_JSON), binary=True)
    # Ours writes the canonical strings, which the SDK reads back as such.
    headers, _ = http.encode_binary(Event({**decoded.attributes, "flag": True, "blob": b"\x00"}))
    assert (headers["ce-flag"], headers["ce-blob"]) == ("true", "AA==")


def test_sdk_quirk_binary_json_string_data_is_sent_unquoted() -> None:
    """Under a JSON media type the SDK sends a `str` as raw text, so "42" comes back as the number 42
    (from the SDK itself too). We send JSON text ("\\"42\\""), which both read back as the string."""
    original = SdkEvent({"id": "1", "source": "/s", "type": "t", "datacontenttype": "application/json"}, "42")
    message = sdk_http.to_binary(original, SDK_JSON)
    assert message.body == b"42"
    read_back: Any = sdk_http.from_binary(message, SDK_JSON).get_data()
    assert read_back == 42
    (decoded,) = http.decode_request(message.headers, message.body)
    assert_same(decoded, sdk_http.from_binary(message, SDK_JSON), binary=True)
    ours = Event(dict(decoded.attributes), "42")
    assert http.encode_binary(ours)[1] == b'"42"'
    assert ours_to_sdk(ours, "binary").get_data() == "42"


def test_sdk_quirk_binary_json_non_objects_are_written_as_python_repr() -> None:
    """In binary mode the SDK JSON-encodes only dicts; a list, bool or number goes out as `str(data)`,
    e.g. "[1, True, None]", which is not JSON, so the SDK itself reads it back as that text."""
    data: Any = [1, True, None]  # the SDK's type hint says dict; JSON data can be any JSON value
    original = SdkEvent({"id": "1", "source": "/s", "type": "t", "datacontenttype": "application/json"}, data)
    message = sdk_http.to_binary(original, SDK_JSON)
    assert message.body == b"[1, True, None]"
    (decoded,) = http.decode_request(message.headers, message.body)
    assert_same(decoded, sdk_http.from_binary(message, SDK_JSON), binary=True)
    ours = Event(dict(decoded.attributes), [1, True, None])
    assert http.encode_binary(ours)[1] == b"[1,true,null]"
    read_back: Any = ours_to_sdk(ours, "binary").get_data()
    assert read_back == [1, True, None]


def test_sdk_quirk_structured_cannot_write_bytes_extensions() -> None:
    with pytest.raises(TypeError):
        sdk_http.to_structured(SdkEvent({"id": "1", "source": "/s", "type": "t", "blob": b"\x00"}), SDK_JSON)
    assert ours_to_sdk(ev(blob=b"\x00"), "structured").get_extension("blob") == "AA=="


def test_sdk_quirk_leap_second_is_ours_only() -> None:
    """RFC 3339 allows second 60; Python's datetime (and so the SDK) cannot represent it."""
    event = ev(time="2016-12-31T23:59:60Z")
    headers, body = http.encode_binary(event)
    assert http.decode_binary(headers, body) == event
    with pytest.raises(ValueError):
        sdk_http.from_binary(sdk_http.HTTPMessage(headers, body), SDK_JSON)


def test_sdk_accepts_what_the_spec_forbids_and_we_reject() -> None:
    """The SDK validates little (no URI syntax, no forbidden characters, no 32-bit range); we answer
    such events with a precise error rather than passing them on."""
    bad = {"id": "1", "source": "not a uri", "type": "t\x01", "big": 2**40}
    message = sdk_http.to_structured(SdkEvent(dict(bad)), SDK_JSON)
    with pytest.raises(InvalidAttribute) as caught:
        http.decode_request(message.headers, message.body)
    assert caught.value.attribute == "source"


# ---------------------------------------------------------------------------------------------------
# Generated events.

valid_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Cn"]), max_size=24)
nonempty_text = valid_text.filter(bool)
uri_ref = st.text(st.sampled_from(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;="), min_size=1,
                  max_size=30)  # fmt: skip
CORE = {"id", "source", "type", "specversion", "time", "datacontenttype", "dataschema", "subject", "data"}
ext_names = st.text(st.sampled_from(string.ascii_lowercase + string.digits), min_size=1, max_size=12).filter(
    lambda n: n not in CORE
)
ext_values = st.one_of(valid_text, st.integers(-(2**31), 2**31 - 1), st.booleans(), st.binary(max_size=24), uri_ref)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), valid_text),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(valid_text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def times(draw: st.DrawFn) -> str:
    """RFC 3339 timestamps the SDK can hold too: no leap second, offsets in whole minutes."""
    m = draw(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30)))
    text = f"{m.year:04d}-{m.month:02d}-{m.day:02d}T{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    digits = draw(st.sampled_from([0, 1, 3, 6, 9]))
    if digits:
        text += "." + f"{m.microsecond:06d}{draw(st.integers(0, 999)):03d}"[:digits]
    minutes = draw(st.integers(-(23 * 60 + 59), 23 * 60 + 59))
    if minutes == 0 and draw(st.booleans()):
        return text + "Z"
    return text + f"{'-' if minutes < 0 else '+'}{abs(minutes) // 60:02d}:{abs(minutes) % 60:02d}"


@st.composite
def events(draw: st.DrawFn) -> Event:
    attrs: dict[str, Any] = {
        "specversion": "1.0",
        "id": draw(nonempty_text),
        "source": draw(uri_ref),
        "type": draw(nonempty_text),
    }
    if draw(st.booleans()):
        attrs["time"] = draw(times())
    if draw(st.booleans()):
        attrs["subject"] = draw(nonempty_text)
    if draw(st.booleans()):
        attrs["dataschema"] = "https://example.com/" + draw(uri_ref)
    attrs.update(draw(st.dictionaries(ext_names, ext_values, max_size=5)))
    content_type = draw(st.sampled_from([None, "application/json", "application/vnd.example.order+json",
                                         "text/plain; charset=utf-8", "application/octet-stream"]))  # fmt: skip
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    data: Any
    if content_type == "application/octet-stream":
        data = draw(st.one_of(st.none(), st.binary(max_size=64)))
    elif content_type is not None and content_type.startswith("text/"):
        data = draw(st.one_of(st.none(), valid_text))
    else:  # JSON: a value, or its text as bytes (what the binary mode hands us)
        value = draw(json_values)
        data = json.dumps(value).encode() if draw(st.booleans()) and value is not None else value
    order = draw(st.permutations(list(attrs)))
    return Event({name: attrs[name] for name in order}, data)


@settings(max_examples=2000, deadline=None)
@given(text=st.text(st.one_of(st.characters(exclude_categories=["Cs"]), st.sampled_from(' "%\x7f\x00~')), max_size=12))
def test_header_values_percent_encode_exactly_like_the_sdk(text: str) -> None:
    """Our fast path skips `quote()` for values that need no encoding; the result must not change."""
    sdk_encode = sdk_http._encode_header_value  # private, but it is the SDK's binary-mode encoder
    assert http.header_value(text) == sdk_encode(text)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events(), mode=st.sampled_from(MODES))
def test_generated_events_both_ways(event: Event, mode: str) -> None:
    check_both_ways(event, mode)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(batch=st.lists(events(), min_size=0, max_size=8))
def test_generated_batches(batch: list[Event]) -> None:
    for ours, theirs in zip(batch, ours_batch_to_sdk(batch), strict=True):
        assert_same(ours, theirs, binary=False)
    body = b"[" + b",".join(SDK_JSON.write(to_sdk(e, "batch")) for e in batch) + b"]"
    assert len(json_format.decode_batch(body)) == len(batch)
