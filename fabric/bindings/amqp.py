"""The CloudEvents AMQP protocol binding (spec `bindings/amqp-protocol-binding.md`), as Service Bus uses it.

Pure: no I/O and no client library. Shaped like the official SDK's `cloudevents.core.bindings.amqp`: a
frozen `AmqpMessage` plus `to_binary / from_binary / to_structured / from_structured` and one
auto-detecting `from_message`. `umcef.adapters.servicebus` moves these messages with azure-servicebus.

- **Binary mode** (§3.1): every attribute but `datacontenttype` is an application property
  `cloudEvents_<name>` (the `_` separator the spec prefers for JMS; `cloudEvents:<name>` is accepted on
  decode). Values keep their CloudEvents type as the native AMQP type where that is lossless:
  Boolean → boolean, Integer → long (a Python `int` here: the adapter types it as an AMQP long),
  String/URI/URI-reference → string, and `time` → timestamp when the timestamp says exactly what the
  string says (milliseconds, UTC, `Z`), else its string. Binary goes as its canonical base64 string by
  default -- the spec allows either form, and azure-servicebus can neither send non-UTF-8 bytes in an
  application property nor tell a received binary from a string -- `native_binary=True` sends AMQP
  binary for clients that can. `datacontenttype` is the AMQP `content-type` property; the data is the
  body (one data section; an event without data has an empty body, read back as no data).
- **Structured mode** (§3.2): the JSON event format in the body, `content-type:
  application/cloudevents+json`.
- **Service Bus** (both modes): `message_id` is the event `id` (the broker's duplicate detection keys on
  it) and `session_id` is `partitionkey` (sessions are Service Bus's per-key order). Both are limited to
  128 characters; a longer value is replaced by a stable digest (`sha256:<hex>`), so duplicate detection
  and per-key grouping keep working. Neither is read back: the application properties (binary) or the
  body (structured) always carry the attributes themselves.

What is lossy, and why: `docs/mapping-servicebus.md`.
"""

from __future__ import annotations

import base64
import hashlib
import re
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from umcef.fabric.accel import validate_attributes
from umcef.fabric.bindings.http import attribute_to_string, data_to_bytes
from umcef.fabric.errors import InvalidAttribute, MalformedBody, UnsupportedMediaType
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.limits import NO_LIMITS, Limits

CE_PREFIX = "cloudEvents_"
CE_PREFIX_COLON = "cloudEvents:"
_PREFIX_LEN = len(CE_PREFIX)  # both prefixes have the same length
CLOUDEVENTS_MEDIA_PREFIX = "application/cloudevents"
PROTOBUF_CONTENT_TYPE = "application/cloudevents+protobuf"
CONTENT_TYPE_PROPERTY = "content-type"  # the key the official SDK uses in its `properties` dict
PARTITIONKEY = "partitionkey"
# Service Bus caps MessageId and SessionId at 128 characters (the SDK raises ValueError beyond that).
MAX_ID_LENGTH = 128
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# The one RFC 3339 spelling an AMQP timestamp (milliseconds since the epoch, no zone) renders back to.
_NATIVE_TIME = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]{3})?Z\Z")


@dataclass(frozen=True, slots=True)
class AmqpMessage:
    """One AMQP 1.0 message as the binding sees it.

    `application_properties` values are Python values standing for AMQP types: `str` → string,
    `bool` → boolean, `int` → long, `bytes` → binary, `datetime` → timestamp. `properties` holds other
    AMQP message properties a transport wants to pass along (subject, correlation-id, ...); the binding
    writes none and reads only `content-type` there, as a fallback for SDK-shaped messages.
    """

    properties: dict[str, Any] = field(default_factory=dict)
    application_properties: dict[str, Any] = field(default_factory=dict)
    body: bytes = b""
    content_type: str | None = None
    message_id: str | None = None
    session_id: str | None = None

    def media_type(self) -> str | None:
        """The content type's media type, lower-cased, without parameters."""
        content_type = self.content_type
        if content_type is None:
            raw = self.properties.get(CONTENT_TYPE_PROPERTY)
            content_type = raw if isinstance(raw, str) else None
        if content_type is None:
            return None
        return content_type.split(";", 1)[0].strip().lower()


# --------------------------------------------------------------------------------------------------
# encoding


def to_binary(event: Event, *, native_time: bool = True, native_binary: bool = False) -> AmqpMessage:
    """Binary mode: `cloudEvents_` application properties, `content-type`, the data as the body."""
    props: dict[str, Any] = {}
    content_type: str | None = None
    for name, value in event.attributes.items():
        if name == "datacontenttype":
            content_type = value
            continue
        kind = type(value)
        if kind is bytes and not native_binary:
            value = base64.b64encode(value).decode("ascii")
        elif name == "time" and native_time and kind is str:
            value = native_timestamp(value) or value
        props[CE_PREFIX + name] = value
    return AmqpMessage({}, props, data_to_bytes(event), content_type, message_id(event), session_id(event))


def to_structured(event: Event) -> AmqpMessage:
    """Structured mode: the JSON event format as the body; attributes keep their JSON types."""
    return AmqpMessage({}, {}, json_format.encode(event), json_format.CONTENT_TYPE, message_id(event),
                       session_id(event))


def message_id(event: Event) -> str:
    """Service Bus `MessageId`: the event id, or its digest when longer than Service Bus allows."""
    return _bounded(attribute_to_string(event.attributes["id"]))


def session_id(event: Event) -> str | None:
    """Service Bus `SessionId`: `partitionkey` (its canonical string), bounded like `message_id`."""
    key = event.attributes.get(PARTITIONKEY)
    return None if key is None else _bounded(attribute_to_string(key))


def _bounded(text: str) -> str:
    if len(text) <= MAX_ID_LENGTH:
        return text
    return "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def native_timestamp(text: str) -> datetime | None:
    """The AMQP timestamp for an RFC 3339 string, only when it renders back to exactly that string.

    An AMQP timestamp holds milliseconds in UTC; "2026-01-01T10:00:00.123456Z" or "...+02:00" would lose
    digits or the offset, so those stay strings (the spec allows the canonical string for any value).
    """
    if _NATIVE_TIME.match(text) is None:
        return None
    try:
        stamp = datetime.fromisoformat(text[:-1]).replace(tzinfo=UTC)  # ValueError: e.g. second 60
    except ValueError:
        return None
    return stamp if render_timestamp(stamp) == text else None


def render_timestamp(stamp: datetime) -> str:
    """RFC 3339 for an AMQP timestamp: UTC, `Z`, milliseconds only when there are any."""
    stamp = stamp.astimezone(UTC) if stamp.tzinfo is not None else stamp.replace(tzinfo=UTC)
    text = (f"{stamp.year:04d}-{stamp.month:02d}-{stamp.day:02d}"
            f"T{stamp.hour:02d}:{stamp.minute:02d}:{stamp.second:02d}")
    millis = stamp.microsecond // 1000
    return f"{text}.{millis:03d}Z" if millis else text + "Z"


def timestamp_from_millis(millis: int) -> datetime:
    """An AMQP timestamp (milliseconds since the Unix epoch) as an aware UTC datetime."""
    return _EPOCH + timedelta(milliseconds=millis)


# --------------------------------------------------------------------------------------------------
# decoding


def from_binary(msg: AmqpMessage, limits: Limits = NO_LIMITS) -> Event:
    """A validated event from a binary-mode message; `InvalidAttribute` names what is wrong.

    Native AMQP values keep their type (boolean, long/int → Integer, binary → Binary, timestamp → the
    RFC 3339 string); strings stay strings. `time` also accepts an integer: the official SDK writes an
    AMQP timestamp, and clients that cannot tell a timestamp from a long (azure-servicebus) hand us its
    milliseconds. An empty body is no data.
    """
    attrs: dict[str, Any] = {}
    for name, value in msg.application_properties.items():
        prefix = name[:_PREFIX_LEN]
        if prefix != CE_PREFIX and prefix != CE_PREFIX_COLON:
            continue  # the message's own properties (tracing, routing...) are not attributes
        attr = name[_PREFIX_LEN:]
        if attr in attrs:
            raise InvalidAttribute("appears under both the 'cloudEvents_' and 'cloudEvents:' prefix", attr)
        attrs[attr] = _attribute_value(attr, value)
    content_type = msg.content_type
    if content_type is None:
        raw = msg.properties.get(CONTENT_TYPE_PROPERTY)
        content_type = raw if isinstance(raw, str) else None
    if content_type is not None:
        # The spec maps datacontenttype to content-type only; a producer that also wrote the property
        # must at least agree with itself.
        extra = attrs.get("datacontenttype")
        if extra is not None and extra != content_type:
            raise InvalidAttribute(f"{CE_PREFIX}datacontenttype {extra!r} contradicts the content-type "
                                   f"{content_type!r}", "datacontenttype")
        attrs["datacontenttype"] = content_type
    validate_attributes(attrs, limits.max_attributes, limits.max_attribute_bytes)
    return Event(attrs, msg.body if msg.body else None)


def from_structured(msg: AmqpMessage, limits: Limits = NO_LIMITS) -> Event:
    """A validated event from a structured-mode message (JSON, or protobuf by its content type)."""
    media = msg.media_type()
    if media in (None, json_format.CONTENT_TYPE):
        if not msg.body:
            raise MalformedBody("a structured-mode message needs a body holding the event")
        return json_format.decode(msg.body, limits.max_attributes, limits.max_attribute_bytes)
    if media == PROTOBUF_CONTENT_TYPE:
        from umcef.fabric.formats import protobuf_format  # grpc/protobuf is an optional extra

        return protobuf_format.decode(msg.body, limits.max_attributes, limits.max_attribute_bytes)
    raise UnsupportedMediaType(
        f"unsupported event format {media!r} in an AMQP message; use application/cloudevents+json "
        "(the AMQP binding has no batch mode)"
    )


def from_message(msg: AmqpMessage, limits: Limits = NO_LIMITS) -> Event:
    """Either mode, told apart as the spec says (§3): a content type starting with
    `application/cloudevents` (case-insensitive) is structured, anything else binary.

    A message that is neither (no CloudEvents content type and no `cloudEvents_` property at all) is
    `UnsupportedMediaType`, not a list of missing attributes.
    """
    if is_structured(msg):
        return from_structured(msg, limits)
    if not any(name[:_PREFIX_LEN] in (CE_PREFIX, CE_PREFIX_COLON) for name in msg.application_properties):
        raise UnsupportedMediaType("not a CloudEvent: no application/cloudevents content-type and no "
                                   "cloudEvents_ application properties")
    return from_binary(msg, limits)


def is_structured(msg: AmqpMessage) -> bool:
    media = msg.media_type()
    return media is not None and media.startswith(CLOUDEVENTS_MEDIA_PREFIX)


def _attribute_value(attr: str, value: Any) -> Any:
    """An application property value as the attribute value the internal event holds."""
    kind = type(value)
    if kind is str or kind is bool or kind is bytes:
        return value
    if kind is int:
        return render_timestamp(_from_millis(attr, value)) if attr == "time" else value
    if isinstance(value, datetime):  # AMQP timestamp
        return render_timestamp(value)
    if isinstance(value, uuid.UUID):  # AMQP uuid: no CloudEvents type; its canonical string
        return str(value)
    if isinstance(value, bytearray | memoryview):
        return bytes(value)
    raise InvalidAttribute(f"AMQP value of type {kind.__name__} has no CloudEvents type", attr)


def _from_millis(attr: str, millis: int) -> datetime:
    try:
        return timestamp_from_millis(millis)
    except OverflowError:
        raise InvalidAttribute(f"timestamp {millis} ms is out of range", attr) from None


__all__ = [
    "CE_PREFIX",
    "CE_PREFIX_COLON",
    "AmqpMessage",
    "from_binary",
    "from_message",
    "from_structured",
    "is_structured",
    "message_id",
    "native_timestamp",
    "render_timestamp",
    "session_id",
    "to_binary",
    "to_structured",
]
