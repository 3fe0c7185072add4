"""The protobuf event format against messages built by hand with the classes generated from the
official `cloudevents.proto`, both directions, plus round trips and the official SDK via JSON."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from cloudevents.core.formats.json import JSONFormat
from google.protobuf.any_pb2 import Any as AnyMessage
from google.protobuf.timestamp_pb2 import Timestamp
from hypothesis import given
from hypothesis import strategies as st

from umcef.fabric.bindings import http as http_binding
from umcef.fabric.errors import EventError, InvalidAttribute, InvalidData, LimitExceeded, MalformedBody
from umcef.fabric.event import Event, now_rfc3339
from umcef.fabric.formats import json_format
from umcef.fabric.formats import protobuf_format as pf
from umcef.fabric.formats.proto.cloudevents_pb2 import CloudEvent, CloudEventBatch
from umcef.fabric.validation import _BAD_CHARS

pytestmark = pytest.mark.pure_twin

Value = CloudEvent.CloudEventAttributeValue
REQUIRED = {"specversion": "1.0", "id": "evt-1", "source": "/orders/eu", "type": "com.example.created"}


def event(data: Any = None, **attrs: Any) -> Event:
    return Event({**REQUIRED, **attrs}, data)


def message(**attributes: Value) -> CloudEvent:
    msg = CloudEvent(id="evt-1", source="/orders/eu", spec_version="1.0", type="com.example.created")
    for name, value in attributes.items():
        msg.attributes[name].CopyFrom(value)
    return msg


def ts(seconds: int, nanos: int = 0) -> Value:
    return Value(ce_timestamp=Timestamp(seconds=seconds, nanos=nanos))


# -- hand-built messages → Event (every attribute type) ---------------------------------------------


def test_decodes_every_attribute_type_from_a_hand_built_message() -> None:
    msg = message(
        flag=Value(ce_boolean=True),
        off=Value(ce_boolean=False),
        count=Value(ce_integer=-(2**31)),
        top=Value(ce_integer=2**31 - 1),
        zero=Value(ce_integer=0),
        note=Value(ce_string="héllo wörld ✓ 🚀"),
        blob=Value(ce_bytes=bytes(range(256))),
        link=Value(ce_uri="https://example.com/a?b=c#d"),
        ref=Value(ce_uri_ref="/relative/path"),
        time=ts(1714566896, 123456789),
        expirytime=ts(0),
        datacontenttype=Value(ce_string="application/octet-stream"),
        dataschema=Value(ce_uri="https://schemas.example.com/order.json"),
        subject=Value(ce_string="order-42"),
    )
    msg.binary_data = b"\x00\x01\xff"
    got = pf.decode(msg.SerializeToString())
    assert got == event(
        b"\x00\x01\xff",
        flag=True, off=False, count=-(2**31), top=2**31 - 1, zero=0, note="héllo wörld ✓ 🚀",
        blob=bytes(range(256)), link="https://example.com/a?b=c#d", ref="/relative/path",
        time="2024-05-01T12:34:56.123456789Z", expirytime="1970-01-01T00:00:00Z",
        datacontenttype="application/octet-stream", dataschema="https://schemas.example.com/order.json",
        subject="order-42",
    )
    assert type(got.attributes["flag"]) is bool and type(got.attributes["count"]) is int


def test_accepts_time_sent_as_a_string() -> None:
    got = pf.decode(message(time=Value(ce_string="2024-05-01T12:00:00+02:00")).SerializeToString())
    assert got.attributes["time"] == "2024-05-01T12:00:00+02:00"


def test_minimal_event_has_only_required_attributes_and_no_data() -> None:
    got = pf.decode(message().SerializeToString())
    assert got.attributes == REQUIRED
    assert got.data is None


@pytest.mark.parametrize("name", ["id", "source", "type", "specversion"])
def test_missing_required_attribute_is_named(name: str) -> None:
    msg = message()
    msg.ClearField({"specversion": "spec_version"}.get(name, name))
    with pytest.raises(InvalidAttribute) as err:
        pf.decode(msg.SerializeToString())
    assert err.value.attribute == name
    assert "required" in str(err.value)


def test_unsupported_specversion_is_named() -> None:
    msg = message()
    msg.spec_version = "0.3"
    with pytest.raises(InvalidAttribute) as err:
        pf.decode(msg.SerializeToString())
    assert err.value.attribute == "specversion"


def test_required_attribute_inside_the_map_is_rejected() -> None:
    with pytest.raises(InvalidAttribute) as err:
        pf.decode(message(id=Value(ce_string="other")).SerializeToString())
    assert err.value.attribute == "id"
    assert "own message field" in str(err.value)


def test_attribute_without_a_value_is_named() -> None:
    msg = message()
    msg.attributes["empty"].SetInParent()
    with pytest.raises(InvalidAttribute) as err:
        pf.decode(msg.SerializeToString())
    assert err.value.attribute == "empty"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("link", Value(ce_uri="no-scheme/path")),
        ("ref", Value(ce_uri_ref="has space")),
        ("dataschema", Value(ce_string="relative/only")),
        ("time", Value(ce_string="yesterday")),
        ("time", Value(ce_integer=5)),
        ("time", ts(-62135596801)),  # before 0001-01-01
        ("time", ts(0, 1_000_000_000)),  # nanos out of range
        ("datacontenttype", Value(ce_string="not a media type")),
        ("subject", Value(ce_string="")),
        ("Bad_Name", Value(ce_string="x")),
        ("ctl", Value(ce_string="bell\x07")),
    ],
)
def test_invalid_attribute_values_are_named(name: str, value: Value) -> None:
    with pytest.raises(InvalidAttribute) as err:
        pf.decode(message(**{name: value}).SerializeToString())
    assert err.value.attribute == name


def test_limits_on_attribute_count_and_value_size() -> None:
    body = message(a=Value(ce_string="x" * 100), b=Value(ce_bytes=b"y" * 10)).SerializeToString()
    assert pf.decode(body, max_attributes=6, max_value_bytes=100)
    with pytest.raises(InvalidAttribute, match="too many attributes"):
        pf.decode(body, max_attributes=5)
    with pytest.raises(InvalidAttribute) as err:
        pf.decode(body, max_value_bytes=99)
    assert err.value.attribute == "a"


@pytest.mark.parametrize(
    "body",
    [
        b"\xff\xff\xff",  # invalid tag
        message(note=Value(ce_string="x" * 50)).SerializeToString()[:-10],  # truncated
        b"\x0a\x02\xc3\x28",  # field `id` holding invalid UTF-8
        b"\x0a\x05ab",  # length beyond the end
    ],
)
def test_malformed_bytes_raise_malformed_body(body: bytes) -> None:
    with pytest.raises(MalformedBody):
        pf.decode(body)
    with pytest.raises(MalformedBody):
        pf.decode_batch(body)


def test_empty_body_is_an_event_without_required_attributes() -> None:
    # Zero bytes are a valid (empty) protobuf message; validation then names what is missing.
    with pytest.raises(InvalidAttribute) as err:
        pf.decode(b"")
    assert err.value.attribute == "specversion"


# -- data ------------------------------------------------------------------------------------------


def test_text_data_without_json_type_is_a_string() -> None:
    msg = message(datacontenttype=Value(ce_string="text/plain; charset=utf-8"))
    msg.text_data = "Grüße, 世界 🌍"
    assert pf.decode(msg.SerializeToString()).data == "Grüße, 世界 🌍"


def test_text_data_under_a_json_type_is_the_json_value() -> None:
    msg = message(datacontenttype=Value(ce_string="application/cloudevents-payload+json"))
    msg.text_data = '{"a": [1, 2.5, "ü"], "b": null}'
    assert pf.decode(msg.SerializeToString()).data == {"a": [1, 2.5, "ü"], "b": None}


def test_text_data_that_is_not_json_despite_a_json_type_is_kept_as_bytes() -> None:
    msg = message(datacontenttype=Value(ce_string="application/json"))
    msg.text_data = "{not json"
    got = pf.decode(msg.SerializeToString())
    assert got.data == b"{not json"
    assert pf.decode(pf.encode(got)) == got  # and goes out as the same text


def test_binary_data_keeps_every_byte_and_the_empty_payload() -> None:
    for payload in (bytes(range(256)), b""):
        msg = message()
        msg.binary_data = payload
        got = pf.decode(msg.SerializeToString())
        assert got.data == payload and type(got.data) is bytes


def test_proto_data_is_the_serialized_any_and_goes_back_out_as_proto_data() -> None:
    packed = AnyMessage()
    packed.Pack(Timestamp(seconds=42, nanos=7))
    msg = message(dataschema=Value(ce_uri="https://type.googleapis.com/google.protobuf.Timestamp"))
    msg.proto_data.CopyFrom(packed)
    got = pf.decode(msg.SerializeToString())
    assert got.attributes["datacontenttype"] == "application/protobuf"
    assert AnyMessage.FromString(got.data) == packed
    again = CloudEvent.FromString(pf.encode(got))
    assert again.WhichOneof("data") == "proto_data"
    unpacked = Timestamp()
    assert again.proto_data.Unpack(unpacked) and unpacked == Timestamp(seconds=42, nanos=7)


def test_protobuf_bytes_that_are_no_any_stay_binary() -> None:
    encoded = CloudEvent.FromString(pf.encode(event(b"\x08\x96\x01", datacontenttype="application/protobuf")))
    assert encoded.WhichOneof("data") == "binary_data"


# -- Event → message, checked with the generated classes ---------------------------------------------


def test_encode_uses_the_spec_types() -> None:
    ev = event(
        {"total": 12.5},
        time="2024-05-01T14:34:56.5+02:00", expirytime="2024-06-01T00:00:00Z",
        dataschema="https://schemas.example.com/v1", subject="s", datacontenttype="application/json",
        flag=True, count=7, blob=b"\x00", note="ü",
    )
    msg = CloudEvent.FromString(pf.encode(ev))
    assert (msg.id, msg.source, msg.spec_version, msg.type) == ("evt-1", "/orders/eu", "1.0",
                                                               "com.example.created")
    kinds = {name: value.WhichOneof("attr") for name, value in msg.attributes.items()}
    assert kinds == {
        "time": "ce_timestamp", "expirytime": "ce_timestamp", "dataschema": "ce_uri", "subject": "ce_string",
        "datacontenttype": "ce_string", "flag": "ce_boolean", "count": "ce_integer", "blob": "ce_bytes",
        "note": "ce_string",
    }
    assert msg.attributes["time"].ce_timestamp == Timestamp(seconds=1714566896, nanos=500_000_000)
    assert msg.attributes["flag"].ce_boolean is True
    assert msg.attributes["count"].ce_integer == 7
    assert msg.attributes["blob"].ce_bytes == b"\x00"
    assert msg.WhichOneof("data") == "text_data"
    assert msg.text_data == '{"total":12.5}'
    for name in ("id", "source", "type", "specversion"):
        assert name not in msg.attributes


def test_encode_matches_a_hand_built_message() -> None:
    expected = message(
        time=ts(1714566896, 123456000), note=Value(ce_string="x"), n=Value(ce_integer=-1),
        datacontenttype=Value(ce_string="text/plain"),
    )
    expected.text_data = "hi"
    got = CloudEvent.FromString(pf.encode(event(
        "hi", time="2024-05-01T12:34:56.123456Z", note="x", n=-1, datacontenttype="text/plain")))
    assert got == expected


@pytest.mark.parametrize(
    ("data", "content_type", "field", "wire"),
    [
        ({"a": 1}, None, "text_data", '{"a":1}'),  # JSON value, no type: JSON text + application/json
        ([1, "two"], "application/json", "text_data", '[1,"two"]'),
        ("hello", "application/json", "text_data", '"hello"'),  # a JSON string value
        ("hello", "text/plain", "text_data", "hello"),
        ("hello", None, "text_data", "hello"),
        (b"<a/>", "application/xml", "text_data", "<a/>"),  # text media types go to text_data
        (b"plain", "text/plain", "text_data", "plain"),
        (b"\xff\xfe", "text/plain", "binary_data", b"\xff\xfe"),  # not UTF-8: stays binary
        (b"\x00raw", "application/octet-stream", "binary_data", b"\x00raw"),
        (b"\x00raw", None, "binary_data", b"\x00raw"),
    ],
)
def test_data_placement(data: Any, content_type: str | None, field: str, wire: Any) -> None:
    extra = {"datacontenttype": content_type} if content_type else {}
    msg = CloudEvent.FromString(pf.encode(event(data, **extra)))
    assert msg.WhichOneof("data") == field
    assert getattr(msg, field) == wire
    if content_type is None and field == "text_data" and not isinstance(data, str):
        assert msg.attributes["datacontenttype"].ce_string == "application/json"


@pytest.mark.parametrize(
    ("attrs", "data", "culprit"),
    [
        ({"big": 2**31}, None, "big"),
        ({"small": -(2**31) - 1}, None, "small"),
        ({"ratio": 1.5}, None, "ratio"),
        ({"none": None}, None, "none"),
        ({"time": "not a time"}, None, "time"),
        ({"lone": "\ud800"}, None, "lone"),
        ({"id": 5}, None, "id"),
        ({}, {1, 2}, "data"),
        ({}, "\udc00", "data"),
    ],
)
def test_unencodable_values_are_named(attrs: dict[str, Any], data: Any, culprit: str) -> None:
    with pytest.raises(EventError) as err:
        pf.encode(event(data, **attrs))
    assert err.value.attribute == culprit
    assert isinstance(err.value, InvalidData if culprit == "data" else InvalidAttribute)
    with pytest.raises(EventError) as err:
        pf.encode_batch([event(), event(data, **attrs)])
    assert (err.value.attribute, err.value.index) == (culprit, 1)


def test_a_non_timestamp_expirytime_extension_still_encodes() -> None:
    msg = CloudEvent.FromString(pf.encode(event(expirytime="never")))
    assert msg.attributes["expirytime"].ce_string == "never"


# -- round trips -----------------------------------------------------------------------------------

ROUND_TRIPS = [
    event(),
    event(flag=True, off=False),
    event(count=2**31 - 1, low=-(2**31), zero=0),
    event(note="ünïcödé ✓ 🚀 \u200b", emoji="👩‍👩‍👧"),
    event(blob=bytes(range(256)), empty=b""),
    event(time=now_rfc3339()),
    event(time="2024-05-01T12:34:56Z"),
    event(time="2024-05-01T12:34:56.123456789Z"),
    event(dataschema="https://example.com/s.json", subject="ß", datacontenttype="text/plain"),
    event({"a": [1, 2, {"b": None}], "c": "ü"}, datacontenttype="application/json"),
    event(["list", 1, 2.5, True, None], datacontenttype="application/json"),
    event("plain text ✓", datacontenttype="text/plain"),
    event("no content type"),
    event(bytes(range(256)), datacontenttype="application/octet-stream"),
    event(b"", datacontenttype="application/octet-stream"),
    event(b"\x00\x01", partitionkey="k",
          traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"),
]


@pytest.mark.parametrize("ev", ROUND_TRIPS, ids=lambda e: repr(e)[:60])
def test_round_trip(ev: Event) -> None:
    assert pf.decode(pf.encode(ev)) == ev
    assert pf.from_message(pf.to_message(ev)) == ev


def test_batch_round_trip_and_order() -> None:
    events = [event(count=i, time=now_rfc3339()) for i in range(50)] + ROUND_TRIPS
    for i, ev in enumerate(events):
        ev.attributes["id"] = f"id-{i}"
    assert pf.decode_batch(pf.encode_batch(events)) == events
    assert pf.decode_batch(pf.encode_batch([])) == []
    assert pf.decode_batch(b"") == []


def test_batch_is_the_official_envelope() -> None:
    batch = CloudEventBatch(events=[message(a=Value(ce_integer=1)), message(b=Value(ce_boolean=True))])
    decoded = pf.decode_batch(batch.SerializeToString())
    assert [e.attributes.get("a") for e in decoded] == [1, None]
    assert CloudEventBatch.FromString(pf.encode_batch(decoded)) == batch


def test_batch_limit_and_error_index() -> None:
    bad = message()
    bad.ClearField("type")
    body = CloudEventBatch(events=[message(), message(), bad]).SerializeToString()
    with pytest.raises(LimitExceeded):
        pf.decode_batch(body, max_batch=2)
    with pytest.raises(InvalidAttribute) as err:
        pf.decode_batch(body, max_batch=3)
    assert (err.value.index, err.value.attribute) == (2, "type")
    assert "event[2]" in str(err.value)


# -- timestamps ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds", "nanos", "back"),
    [
        ("1970-01-01T00:00:00Z", 0, 0, "1970-01-01T00:00:00Z"),
        ("2024-05-01T12:34:56.1Z", 1714566896, 100_000_000, "2024-05-01T12:34:56.100000Z"),
        ("2024-05-01T12:34:56.123Z", 1714566896, 123_000_000, "2024-05-01T12:34:56.123000Z"),
        ("2024-05-01T12:34:56.123456Z", 1714566896, 123_456_000, "2024-05-01T12:34:56.123456Z"),
        ("2024-05-01T12:34:56.123456789Z", 1714566896, 123_456_789, "2024-05-01T12:34:56.123456789Z"),
        ("2024-05-01T12:34:56.1234567891234z", 1714566896, 123_456_789, "2024-05-01T12:34:56.123456789Z"),
        ("2024-05-01T14:34:56+02:00", 1714566896, 0, "2024-05-01T12:34:56Z"),
        ("2024-05-01t07:04:56.5-05:30", 1714566896, 500_000_000, "2024-05-01T12:34:56.500000Z"),
        ("2016-12-31T23:59:60Z", 1483228800, 0, "2017-01-01T00:00:00Z"),  # leap second
        ("1969-12-31T23:59:59.999999999Z", -1, 999_999_999, "1969-12-31T23:59:59.999999999Z"),
        ("0001-01-01T00:00:00Z", -62135596800, 0, "0001-01-01T00:00:00Z"),
        ("9999-12-31T23:59:59.999999999Z", 253402300799, 999_999_999, "9999-12-31T23:59:59.999999999Z"),
        ("2024-02-29T00:00:00Z", 1709164800, 0, "2024-02-29T00:00:00Z"),
    ],
)
def test_timestamp_conversion(text: str, seconds: int, nanos: int, back: str) -> None:
    assert pf.rfc3339_to_timestamp(text) == (seconds, nanos)
    assert pf.timestamp_to_rfc3339(seconds, nanos) == back


@pytest.mark.parametrize("text", ["0000-12-31T23:59:59Z", "0001-01-01T00:00:00+00:01", "2024-05-01", ""])
def test_timestamps_outside_the_protobuf_range_or_grammar(text: str) -> None:
    with pytest.raises(ValueError):
        pf.rfc3339_to_timestamp(text)


@given(st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30),
                    timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30)),
                                               timezone(timedelta(hours=-8))])))
def test_timestamps_keep_the_instant(moment: datetime) -> None:
    text = moment.isoformat()
    back = pf.timestamp_to_rfc3339(*pf.rfc3339_to_timestamp(text))
    assert back.endswith("Z")
    assert datetime.fromisoformat(back) == moment


# -- interop with the rest of the fabric and the official SDK ---------------------------------------


def test_http_binding_accepts_protobuf_bodies() -> None:
    ev = event({"x": 1}, datacontenttype="application/json")
    headers = {"content-type": pf.CONTENT_TYPE}
    assert http_binding.decode_request(headers, pf.encode(ev)) == [ev]
    headers = {"content-type": pf.BATCH_CONTENT_TYPE}
    assert http_binding.decode_request(headers, pf.encode_batch([ev, ev])) == [ev, ev]


def test_protobuf_to_the_official_sdk_via_json() -> None:
    msg = message(time=ts(1714566896, 123456000), datacontenttype=Value(ce_string="application/json"),
                  subject=Value(ce_string="ü"), count=Value(ce_integer=3))
    msg.text_data = '{"total": 12.5}'
    sdk_event = JSONFormat().read(None, json_format.encode(pf.decode(msg.SerializeToString())))
    assert sdk_event.get_id() == "evt-1"
    assert sdk_event.get_time() == datetime(2024, 5, 1, 12, 34, 56, 123456, tzinfo=UTC)
    assert sdk_event.get_subject() == "ü"
    assert sdk_event.get_extension("count") == 3
    assert sdk_event.get_data() == {"total": 12.5}


def test_official_sdk_to_protobuf_via_json() -> None:
    sdk_event = JSONFormat().read(None, json_format.encode(event(
        {"k": "v"}, time="2024-05-01T12:34:56.5Z", datacontenttype="application/json", note="x")))
    ours = json_format.decode(JSONFormat().write(sdk_event))
    msg = CloudEvent.FromString(pf.encode(ours))
    assert msg.attributes["time"].ce_timestamp == Timestamp(seconds=1714566896, nanos=500_000_000)
    assert msg.attributes["note"].ce_string == "x"
    assert pf.decode(msg.SerializeToString()) == ours


# -- the fast decoder against the generated classes ---------------------------------------------------

_RESERVED = {"id", "source", "specversion", "type", "data", "time", "dataschema", "datacontenttype",
             "subject", "expirytime"}
_names = st.from_regex(r"[a-z][a-z0-9]{0,12}", fullmatch=True).filter(lambda n: n not in _RESERVED)
_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs", "Cc", "Cn")), max_size=300).filter(
    lambda v: not _BAD_CHARS.search(v))  # strings CloudEvents forbids are validation's business
_values = st.one_of(
    st.booleans().map(lambda v: Value(ce_boolean=v)),
    st.integers(-(2**31), 2**31 - 1).map(lambda v: Value(ce_integer=v)),
    _text.map(lambda v: Value(ce_string=v)),
    st.binary(max_size=300).map(lambda v: Value(ce_bytes=v)),
    st.sampled_from(["https://example.com/x", "urn:isbn:0451450523"]).map(lambda v: Value(ce_uri=v)),
    st.sampled_from(["/a/b", "x?y=1#f"]).map(lambda v: Value(ce_uri_ref=v)),
    st.tuples(st.integers(-62135596800, 253402300799), st.integers(0, 999_999_999)).map(lambda t: ts(*t)),
)


def reference_decode(msg: CloudEvent) -> Event:
    """The obvious decoder on the generated class: what the fast path must agree with."""
    attrs: dict[str, Any] = {"specversion": msg.spec_version, "id": msg.id, "source": msg.source,
                             "type": msg.type}
    for name, value in msg.attributes.items():
        kind = value.WhichOneof("attr")
        if kind == "ce_timestamp":
            attrs[name] = pf.timestamp_to_rfc3339(value.ce_timestamp.seconds, value.ce_timestamp.nanos)
        else:
            attrs[name] = getattr(value, kind)
    which = msg.WhichOneof("data")
    return Event(attrs, getattr(msg, which) if which else None)


@given(st.dictionaries(_names, _values, max_size=12), st.one_of(st.none(), st.binary(max_size=200), _text))
def test_fast_decoder_agrees_with_the_generated_class(attributes: dict[str, Value], data: Any) -> None:
    msg = message(**attributes)
    if isinstance(data, bytes):
        msg.binary_data = data
    elif isinstance(data, str):
        msg.text_data = data
    body = msg.SerializeToString()
    try:
        expected = reference_decode(CloudEvent.FromString(body))
    except Exception as exc:  # pragma: no cover - the strategies only build valid events
        raise AssertionError(exc) from exc
    assert pf.decode(body) == expected
    assert pf.from_message(msg) == expected
    assert pf.decode_batch(CloudEventBatch(events=[msg, msg]).SerializeToString()) == [expected, expected]


@given(st.data())
def test_corrupted_bytes_fail_where_the_generated_class_fails(data: st.DataObject) -> None:
    msg = message(note=Value(ce_string="hello"), n=Value(ce_integer=-5), t=ts(1714566896, 5),
                  b=Value(ce_bytes=b"\x00\x01"), u=Value(ce_uri="https://e.x/"))
    msg.text_data = "payload"
    body = bytearray(msg.SerializeToString())
    position = data.draw(st.integers(0, len(body) - 1))
    body[position] = data.draw(st.integers(0, 255))
    cut = data.draw(st.integers(position + 1, len(body)))
    corrupted = bytes(body[:cut])
    try:
        CloudEvent.FromString(corrupted)
        official_ok = True
    except Exception:
        official_ok = False
    try:
        pf.decode(corrupted)
    except MalformedBody:
        assert not official_ok
    except EventError:
        pass  # a well-formed message carrying an invalid event (or one the generated class rejects)


def test_unwrap_reads_field_one_as_bytes() -> None:
    from umcef.fabric.formats.proto.gateway_pb2 import PublishBatchRequest, PublishRequest

    msg = message(a=Value(ce_string="x"))
    body = PublishRequest(event=msg).SerializeToString()
    assert pf.unwrap(body, "PublishRequest") == msg.SerializeToString()
    batch = CloudEventBatch(events=[msg])
    body = PublishBatchRequest(batch=batch).SerializeToString()
    assert pf.decode_batch(pf.unwrap(body, "PublishBatchRequest")) == [pf.from_message(msg)]
    assert pf.unwrap(b"", "PublishRequest") == b""
    with pytest.raises(MalformedBody, match="not a protobuf PublishRequest"):
        pf.unwrap(b"\x0a\x05ab", "PublishRequest")
