"""The CloudEvents protobuf format (single events and batches) on the official `cloudevents.proto`.

Attributes (spec formats/protobuf-format.md §2): `id`, `source`, `specversion`, `type` are message
fields; every other attribute is an entry of the `attributes` map, typed by the oneof member:
ce_string/ce_uri/ce_uri_ref → `str`, ce_boolean → `bool`, ce_integer → `int`, ce_bytes → `bytes`,
ce_timestamp → an RFC 3339 `str`. On encode, `str` values go out as ce_string except `time` and
`expirytime` (ce_timestamp) and `dataschema` (ce_uri); the internal model does not keep the URI vs
URI-reference vs String distinction of extensions, so a ce_uri/ce_uri_ref extension returns as ce_string.

Timestamps: protobuf `Timestamp` is an instant in UTC with nanosecond resolution, so an offset such as
`+02:00` is converted to `Z` (the instant is kept, the offset is lost), digits past the ninth are cut,
and a leap second (`:60`) becomes the first second of the next minute. Decoding writes 0, 6 or 9
fraction digits (none when the nanoseconds are 0, microseconds when they are whole, else nanoseconds),
so `now_rfc3339()` values round-trip exactly.

Data (§3): `binary_data` ↔ `bytes`. `text_data` → `str`, except under a JSON `datacontenttype`, where it
is parsed into the JSON value (as in the JSON format), or kept as UTF-8 `bytes` when it is not valid
JSON, so nothing is rejected that the HTTP binary mode would accept. JSON values (and `str` under a
JSON type) are encoded as JSON text in `text_data`, adding `datacontenttype: application/json` when the
event had none; `bytes` under a text media type (text/*, JSON, XML) go to `text_data` when they are UTF-8.
`proto_data` (an `Any`) → the serialized `Any` as `bytes` with `datacontenttype` defaulted to
`application/protobuf` — the Java SDK's convention; on encode, such bytes become `proto_data` again
when they parse as an `Any` with a type URL.

Speed: upb builds a Python wrapper object for every message-typed map value it hands out, which costs
more than the parse. So decoding reads through a private wire-compatible view whose map values (and
`proto_data`) stay bytes: a short ce_string (the common case) is sliced out directly, any other value is
parsed as the generated `CloudEventAttributeValue`. Encoding fills the generated `CloudEvent` (building
the wire bytes in Python measured slower). `to_message`/`from_message` convert to and from that class.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from datetime import date
from typing import Any

import orjson

# protobuf ships no type hints; `types-protobuf` supplies them when installed (hence `unused-ignore`).
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory  # type: ignore[import-untyped, unused-ignore]
from google.protobuf.any_pb2 import Any as AnyMessage  # type: ignore[import-untyped, unused-ignore]
from google.protobuf.message import DecodeError  # type: ignore[import-untyped, unused-ignore]

from umcef.fabric.accel import validate_attributes
from umcef.fabric.errors import EventError, InvalidAttribute, InvalidData, LimitExceeded, MalformedBody
from umcef.fabric.event import Event
from umcef.fabric.formats.json_format import is_json_media_type
from umcef.fabric.formats.proto.cloudevents_pb2 import CloudEvent, CloudEventBatch
from umcef.fabric.validation import check_uri, check_uri_reference

CONTENT_TYPE = "application/cloudevents+protobuf"
BATCH_CONTENT_TYPE = "application/cloudevents-batch+protobuf"
PROTOBUF_DATA_CONTENT_TYPE = "application/protobuf"

# Attributes whose CloudEvents type is Timestamp / URI (spec.md and extensions/*.md).
TIMESTAMP_ATTRIBUTES = frozenset({"time", "expirytime"})
URI_ATTRIBUTES = frozenset({"dataschema"})
_FIELD_ATTRIBUTES = frozenset({"id", "source", "specversion", "type"})

# google.protobuf.Timestamp's range: 0001-01-01T00:00:00Z .. 9999-12-31T23:59:59.999999999Z.
_MIN_SECONDS = -62135596800
_MAX_SECONDS = 253402300799
_EPOCH_ORDINAL = 719163  # date(1970, 1, 1).toordinal()
_RFC3339 = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:[Zz]|([+-])(\d{2}):(\d{2}))\Z"
)

# Events close in time share their date (and often their second): caching those parts of the conversion
# saves a `date` object and most of the formatting per event.
_SECOND_TO_TEXT: dict[int, str] = {}
_TEXT_TO_DAY: dict[str, int] = {}
_TEXT_MEDIA: dict[str, bool] = {}
_CACHE_MAX = 4096


# -- timestamps ------------------------------------------------------------------------------------


def rfc3339_to_timestamp(value: str) -> tuple[int, int]:
    """(seconds, nanos) since the epoch, UTC. Raises ValueError for anything but RFC 3339."""
    m = _RFC3339.match(value)
    if m is None:
        raise ValueError(f"not an RFC 3339 timestamp: {value!r}")
    day_text = value[:10]
    day = _TEXT_TO_DAY.get(day_text)
    if day is None:
        day = date(int(m[1]), int(m[2]), int(m[3])).toordinal() - _EPOCH_ORDINAL
        if len(_TEXT_TO_DAY) >= _CACHE_MAX:
            _TEXT_TO_DAY.clear()
        _TEXT_TO_DAY[day_text] = day
    seconds = day * 86400 + int(m[4]) * 3600 + int(m[5]) * 60 + int(m[6])
    if m[8] is not None:
        offset = int(m[9]) * 3600 + int(m[10]) * 60
        seconds += -offset if m[8] == "+" else offset
    fraction = m[7]
    nanos = int(fraction[:9].ljust(9, "0")) if fraction else 0
    if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
        raise ValueError(f"outside the protobuf Timestamp range (years 1-9999): {value!r}")
    return seconds, nanos


def timestamp_to_rfc3339(seconds: int, nanos: int) -> str:
    """RFC 3339 in UTC with 0, 6 or 9 fraction digits. Raises ValueError outside Timestamp's range."""
    prefix = _SECOND_TO_TEXT.get(seconds)
    if prefix is None:
        if not _MIN_SECONDS <= seconds <= _MAX_SECONDS:
            raise ValueError(f"Timestamp out of range (seconds={seconds}, nanos={nanos})")
        day, rest = divmod(seconds, 86400)
        hour, rest = divmod(rest, 3600)
        minute, second = divmod(rest, 60)
        prefix = f"{date.fromordinal(day + _EPOCH_ORDINAL).isoformat()}T{hour:02d}:{minute:02d}:{second:02d}"
        if len(_SECOND_TO_TEXT) >= _CACHE_MAX:
            _SECOND_TO_TEXT.clear()
        _SECOND_TO_TEXT[seconds] = prefix
    if nanos == 0:
        return prefix + "Z"
    if not 0 < nanos <= 999_999_999:
        raise ValueError(f"Timestamp out of range (seconds={seconds}, nanos={nanos})")
    if nanos % 1000 == 0:
        return f"{prefix}.{nanos // 1000:06d}Z"
    return f"{prefix}.{nanos:09d}Z"


# -- the wire view used for decoding ---------------------------------------------------------------


def _wire_classes() -> tuple[Any, Any, Any]:
    """Messages with cloudevents.proto's wire format where attribute values and `proto_data` are plain
    bytes, plus a one-field envelope (`PublishRequest`/`PublishBatchRequest` have that shape). They live
    in a private descriptor pool, so they can never clash with anyone's `io.cloudevents.v1` types."""
    f = descriptor_pb2.FieldDescriptorProto
    file = descriptor_pb2.FileDescriptorProto(name="umcef_wire.proto", package="umcef.wire", syntax="proto3")
    event = file.message_type.add(name="Event")
    entry = event.nested_type.add(name="AttributesEntry")
    entry.options.map_entry = True
    entry.field.add(name="key", number=1, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    entry.field.add(name="value", number=2, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    for number, name in enumerate(("id", "source", "spec_version", "type"), 1):
        event.field.add(name=name, number=number, type=f.TYPE_STRING, label=f.LABEL_OPTIONAL)
    event.field.add(name="attributes", number=5, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                    type_name=".umcef.wire.Event.AttributesEntry")
    event.oneof_decl.add(name="data")
    for number, name, kind in ((6, "binary_data", f.TYPE_BYTES), (7, "text_data", f.TYPE_STRING),
                               (8, "proto_data", f.TYPE_BYTES)):
        event.field.add(name=name, number=number, type=kind, label=f.LABEL_OPTIONAL, oneof_index=0)
    batch = file.message_type.add(name="Batch")
    batch.field.add(name="events", number=1, type=f.TYPE_MESSAGE, label=f.LABEL_REPEATED,
                    type_name=".umcef.wire.Event")
    envelope = file.message_type.add(name="Envelope")
    envelope.field.add(name="payload", number=1, type=f.TYPE_BYTES, label=f.LABEL_OPTIONAL)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(file)
    event_class, batch_class, envelope_class = (
        message_factory.GetMessageClass(pool.FindMessageTypeByName(f"umcef.wire.{name}"))
        for name in ("Event", "Batch", "Envelope")
    )
    return event_class, batch_class, envelope_class


_WireEvent, _WireBatch, _Envelope = _wire_classes()


_Value = CloudEvent.CloudEventAttributeValue


def _attribute_value(name: str, raw: bytes) -> Any:
    """A serialized `CloudEventAttributeValue` (other than a short string) to its Python value."""
    try:
        value = _Value.FromString(raw)
    except DecodeError:
        raise MalformedBody(f"the value of attribute {name!r} is not a valid CloudEventAttributeValue",
                            name) from None
    kind = value.WhichOneof("attr")
    if kind == "ce_string":
        return value.ce_string
    if kind == "ce_timestamp":
        ts = value.ce_timestamp
        try:
            return timestamp_to_rfc3339(ts.seconds, ts.nanos)
        except ValueError as exc:
            raise InvalidAttribute(str(exc), name) from None
    if kind == "ce_integer":
        return value.ce_integer
    if kind == "ce_boolean":
        return value.ce_boolean
    if kind == "ce_uri":
        return check_uri(name, value.ce_uri)
    if kind == "ce_uri_ref":
        return check_uri_reference(name, value.ce_uri_ref)
    if kind == "ce_bytes":
        return value.ce_bytes
    raise InvalidAttribute("has no value (no member of the attribute oneof is set)", name)


# -- decoding --------------------------------------------------------------------------------------


def decode(body: bytes, max_attributes: int = 0, max_value_bytes: int = 0) -> Event:
    """One `CloudEvent` message (`application/cloudevents+protobuf`) to a validated event."""
    try:
        wire = _WireEvent.FromString(body)
    except DecodeError as exc:
        raise MalformedBody(f"body is not a protobuf CloudEvent: {exc}") from None
    return _event(wire, max_attributes, max_value_bytes)


def decode_batch(
    body: bytes, max_batch: int = 0, max_attributes: int = 0, max_value_bytes: int = 0
) -> list[Event]:
    """A `CloudEventBatch` message. Errors name the index of the bad event."""
    try:
        items = _WireBatch.FromString(body).events
    except DecodeError as exc:
        raise MalformedBody(f"body is not a protobuf CloudEventBatch: {exc}") from None
    if max_batch and len(items) > max_batch:
        raise LimitExceeded(f"batch of {len(items)} events exceeds the limit of {max_batch}")
    events = []
    for index, wire in enumerate(items):
        try:
            events.append(_event(wire, max_attributes, max_value_bytes))
        except EventError as exc:
            raise exc.at(index) from None
    return events


def from_message(msg: CloudEvent, max_attributes: int = 0, max_value_bytes: int = 0) -> Event:
    """A generated `CloudEvent` message to a validated event."""
    return decode(msg.SerializeToString(), max_attributes, max_value_bytes)


def _event(wire: Any, max_attributes: int, max_value_bytes: int) -> Event:
    attrs: dict[str, Any] = {}
    # proto3 cannot tell an empty string from an absent field: both read as "missing".
    if wire.spec_version:
        attrs["specversion"] = wire.spec_version
    if wire.id:
        attrs["id"] = wire.id
    if wire.source:
        attrs["source"] = wire.source
    if wire.type:
        attrs["type"] = wire.type
    for name, raw in wire.attributes.items():
        if name in _FIELD_ATTRIBUTES:
            raise InvalidAttribute("is a required attribute: it belongs in its own message field, "
                                   "not in the attributes map", name)
        size = len(raw)
        # Fast path: a lone ce_string with a one-byte length, what every encoder writes for short strings.
        if size < 130 and size > 1 and raw[0] == 0x1A and raw[1] == size - 2:
            try:
                attrs[name] = raw[2:].decode("utf-8")
            except UnicodeDecodeError:
                raise MalformedBody("string value is not valid UTF-8", name) from None
        else:
            attrs[name] = _attribute_value(name, raw)

    which = wire.WhichOneof("data")
    if which == "proto_data":
        try:
            AnyMessage.FromString(wire.proto_data)
        except DecodeError:
            raise MalformedBody("proto_data is not a valid google.protobuf.Any", "data") from None
        attrs.setdefault("datacontenttype", PROTOBUF_DATA_CONTENT_TYPE)
    validate_attributes(attrs, max_attributes, max_value_bytes)
    if which is None:
        return Event(attrs, None)
    if which == "binary_data":
        return Event(attrs, wire.binary_data)
    if which == "text_data":
        text = wire.text_data
        content_type = attrs.get("datacontenttype")
        if content_type is not None and is_json_media_type(content_type):
            try:
                return Event(attrs, orjson.loads(text))
            except orjson.JSONDecodeError:
                return Event(attrs, text.encode("utf-8"))
        return Event(attrs, text)
    return Event(attrs, wire.proto_data)


def unwrap(body: bytes, what: str) -> bytes:
    """Field 1 of a one-field wrapper message (`PublishRequest.event`, `PublishBatchRequest.batch`), as
    bytes, so the gRPC ingress decodes the event(s) with the fast path above. Absent reads as empty."""
    try:
        payload: bytes = _Envelope.FromString(body).payload
    except DecodeError as exc:
        raise MalformedBody(f"body is not a protobuf {what}: {exc}") from None
    return payload


# -- encoding --------------------------------------------------------------------------------------


def encode(event: Event) -> bytes:
    """The `application/cloudevents+protobuf` bytes of an event."""
    msg = CloudEvent()
    fill_message(msg, event)
    out: bytes = msg.SerializeToString()
    return out


def encode_batch(events: Iterable[Event]) -> bytes:
    """The `application/cloudevents-batch+protobuf` bytes of several events."""
    batch = CloudEventBatch()
    fill_batch(batch, events)
    out: bytes = batch.SerializeToString()
    return out


def fill_batch(batch: CloudEventBatch, events: Iterable[Event]) -> None:
    """Append events to a `CloudEventBatch` message in place (errors carry the index)."""
    add = batch.events.add
    for index, event in enumerate(events):
        try:
            fill_message(add(), event)
        except EventError as exc:
            raise exc.at(index) from None


def to_message(event: Event) -> CloudEvent:
    """An event as the generated `CloudEvent` message."""
    msg = CloudEvent()
    fill_message(msg, event)
    return msg


def fill_message(msg: CloudEvent, event: Event) -> None:
    """Write an event into an empty `CloudEvent` message (e.g. one added to a batch in place).

    Raises `InvalidAttribute` for a value protobuf cannot carry (an integer beyond 32 bits, a
    malformed `time`, a string with lone surrogates, a type outside the CloudEvents type system).
    """
    amap = msg.attributes
    name = ""
    try:
        for name, value in event.attributes.items():
            kind = type(value)
            if kind is str:
                if name == "id":
                    msg.id = value
                elif name == "source":
                    msg.source = value
                elif name == "type":
                    msg.type = value
                elif name == "specversion":
                    msg.spec_version = value
                elif name in TIMESTAMP_ATTRIBUTES:
                    try:
                        seconds, nanos = rfc3339_to_timestamp(value)
                    except ValueError:
                        if name == "time":
                            raise
                        amap[name].ce_string = value  # an extension keeps its value even when not a timestamp
                    else:
                        ts = amap[name].ce_timestamp
                        ts.seconds = seconds
                        ts.nanos = nanos
                elif name in URI_ATTRIBUTES:
                    amap[name].ce_uri = value
                else:
                    amap[name].ce_string = value
            elif name in _FIELD_ATTRIBUTES:
                raise TypeError(f"must be a string, got {kind.__name__}")
            elif kind is bool:
                amap[name].ce_boolean = value
            elif kind is int:
                amap[name].ce_integer = value
            elif kind is bytes:
                amap[name].ce_bytes = value
            else:
                raise TypeError(f"{kind.__name__} is not a CloudEvents attribute type")
    except (TypeError, ValueError) as exc:
        raise InvalidAttribute(f"cannot be encoded in protobuf: {exc}", name) from None
    data = event.data
    if data is None:
        return
    content_type = event.attributes.get("datacontenttype")
    if type(content_type) is not str:
        content_type = None  # not a media type (an unvalidated event): no hint about the data
    kind = type(data)
    if kind is bytes or kind is bytearray:
        data = bytes(data) if kind is bytearray else data
        if content_type is None:
            msg.binary_data = data
        elif _is_text_media_type(content_type):
            try:
                msg.text_data = data.decode("utf-8")
            except UnicodeDecodeError:
                msg.binary_data = data
        elif _media(content_type) == PROTOBUF_DATA_CONTENT_TYPE and _fill_any(msg, data):
            pass
        else:
            msg.binary_data = data
    elif kind is str and (content_type is None or not is_json_media_type(content_type)):
        try:
            msg.text_data = data
        except ValueError:
            raise InvalidData("text cannot be encoded as UTF-8", "data") from None
    else:
        try:
            msg.text_data = orjson.dumps(data).decode("utf-8")
        except TypeError as exc:
            raise InvalidData(f"is not a JSON value: {exc}", "data") from None
        if content_type is None:
            amap["datacontenttype"].ce_string = "application/json"


def _fill_any(msg: CloudEvent, data: bytes) -> bool:
    """Bytes that are a serialized `Any` (what `decode` produced for proto_data) go back to proto_data."""
    packed = AnyMessage()
    try:
        packed.ParseFromString(data)
    except DecodeError:
        return False
    if "/" not in packed.type_url:
        return False
    msg.proto_data.CopyFrom(packed)
    return True


def _media(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def _is_text_media_type(content_type: str) -> bool:
    """text/*, JSON and XML media types: the spec wants their data in `text_data`."""
    hit = _TEXT_MEDIA.get(content_type)
    if hit is None:
        media = _media(content_type)
        hit = (media.startswith("text/") or is_json_media_type(content_type)
               or media in ("application/xml", "text/xml") or media.endswith("+xml"))
        if len(_TEXT_MEDIA) < 1024:
            _TEXT_MEDIA[content_type] = hit
    return hit
