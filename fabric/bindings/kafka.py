"""The CloudEvents Kafka protocol binding (spec `bindings/kafka-protocol-binding.md`): pure, no I/O.

Shaped like the official SDK's `cloudevents.core.bindings.kafka`: a frozen `KafkaMessage` and four
symmetric functions plus one auto-detecting `from_message`. The adapter (`umcef.adapters.kafka`) moves
these messages; nothing here knows about a client library.

- Binary mode: every attribute but `datacontenttype` becomes a `ce_<name>` header whose value is the
  attribute's canonical string (CloudEvents type system) in UTF-8 -- Kafka headers carry bytes, so
  unlike HTTP nothing is percent-encoded. `datacontenttype` is the `content-type` header; the data is
  the record value as-is, and an event without data is a record without value (spec §3.2.2).
- Structured mode: the JSON event format in the value, `content-type: application/cloudevents+json`.
- Key: by default the spec's opt-in key mapper, `partitionkey` as-is (§3.1). Decoding puts a key back
  as `partitionkey` only when the event does not carry one itself: a mapper must not modify the event,
  so a header always wins over the key.

`encoded_size` is what a broker checks against its size limit: the bytes of a v2 record batch that
holds just this record (see the function). `binary_record` / `structured_record` encode into the parts
a producer takes plus a cheap upper bound of that size from the same pass, so a publisher computes the
exact size only for the rare record whose bound is over its limit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from umcef.fabric import accel
from umcef.fabric.accel import validate_attributes
from umcef.fabric.bindings.http import attribute_to_string, data_to_bytes
from umcef.fabric.errors import InvalidAttribute, MalformedBody, UnsupportedMediaType
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.limits import NO_LIMITS, Limits
from umcef.fabric.validation import check_string

CE_PREFIX = "ce_"
CONTENT_TYPE_HEADER = "content-type"
PARTITIONKEY = "partitionkey"
CLOUDEVENTS_MEDIA_PREFIX = "application/cloudevents"
PROTOBUF_CONTENT_TYPE = "application/cloudevents+protobuf"

# Kafka's v2 record batch header: baseOffset(8) length(4) partitionLeaderEpoch(4) magic(1) crc(4)
# attributes(2) lastOffsetDelta(4) baseTimestamp(8) maxTimestamp(8) producerId(8) producerEpoch(2)
# baseSequence(4) recordCount(4) = 61 bytes. The broker's `message.max.bytes` counts all of it.
RECORD_BATCH_OVERHEAD = 61
# Upper bounds of what a record adds around its key, value and header bytes: the batch header, the record's
# length varint (5), attributes + timestamp and offset deltas (3), the key's and the value's length varints
# (5 + 5) and the header count varint (5); per header its two length varints (5 + 5) and `ce_` (3).
_RECORD_MAX_OVERHEAD = RECORD_BATCH_OVERHEAD + 5 + 3 + 5 + 5 + 5
_HEADER_MAX_OVERHEAD = 5 + 5 + 3
_STRUCTURED_HEADERS = ((CONTENT_TYPE_HEADER, json_format.CONTENT_TYPE.encode("ascii")),)
_STRUCTURED_MAX_OVERHEAD = _RECORD_MAX_OVERHEAD + _HEADER_MAX_OVERHEAD + len(CONTENT_TYPE_HEADER) + len(
    _STRUCTURED_HEADERS[0][1])


@dataclass(frozen=True, slots=True)
class KafkaMessage:
    """One Kafka record as the binding sees it. Headers keep their order and may repeat (Kafka allows
    both), hence a tuple of pairs rather than a dict."""

    headers: tuple[tuple[str, bytes], ...]
    key: bytes | None
    value: bytes | None

    def header(self, name: str) -> bytes | None:
        """The first header called `name` (case-insensitive), or None."""
        wanted = name.lower()
        for header_name, value in self.headers:
            if header_name.lower() == wanted:
                return value
        return None


KeyMapper = Callable[[Event], bytes | None]


def partitionkey_mapper(event: Event) -> bytes | None:
    """The spec's key mapper (§3.1): the `partitionkey` extension as-is (its UTF-8 string), if present."""
    key = event.attributes.get(PARTITIONKEY)
    if key is None:
        return None
    return (key if type(key) is str else attribute_to_string(key)).encode("utf-8")  # most are strings


def no_key(event: Event) -> None:
    """A key mapper that leaves every record unkeyed (the client spreads them over partitions)."""
    return None


# --------------------------------------------------------------------------------------------------
# encoding


def to_binary(event: Event, key_mapper: KeyMapper = partitionkey_mapper) -> KafkaMessage:
    """Binary mode: `ce_` headers, `content-type`, the data as the value (None when there is no data)."""
    headers, key, value, _ = binary_record(event, key_mapper)
    return KafkaMessage(tuple(headers), key, value)


def to_structured(event: Event, key_mapper: KeyMapper = partitionkey_mapper) -> KafkaMessage:
    """Structured mode: the JSON event format as the value; attributes keep their JSON types."""
    return KafkaMessage(_STRUCTURED_HEADERS, key_mapper(event), json_format.encode(event))


# A record as a producer takes it: headers (a list, as confluent-kafka wants them), key, value, and an
# upper bound of its `encoded_size`.
Record = tuple[list[tuple[str, bytes]], bytes | None, bytes | None, int]


def binary_record(event: Event, key_mapper: KeyMapper = partitionkey_mapper) -> Record:
    """`to_binary` as the parts of a record, with an upper bound of its `encoded_size` counted in the
    same pass (a publisher's hot path: no `KafkaMessage`, no second pass over the headers).

    Value, key and header value bytes are counted exactly; the rest as its worst case (5-byte varints,
    4 UTF-8 bytes per character of an attribute name). For a typical event the bound is a few hundred
    bytes above the exact size: a publisher checks the bound against its limit and computes
    `encoded_size` only when the bound is over it.
    """
    headers, headers_bound = binary_headers(event.attributes)
    # (`raw_data` first: asking an unread event for `data` would parse it)
    data = data_to_bytes(event) if event.raw_data is not None or event.data is not None else None
    key = key_mapper(event)
    bound = _RECORD_MAX_OVERHEAD + headers_bound + (0 if data is None else len(data)) + (0 if key is None else len(key))
    return headers, key, data, bound


# Attribute name -> header name: the same few names on every event (bounded: names are client input).
_HEADER_NAMES: dict[str, str] = {"datacontenttype": CONTENT_TYPE_HEADER}
_HEADER_NAMES_MAX = 4096


def _binary_headers(attributes: dict[str, Any]) -> tuple[list[tuple[str, bytes]], int]:
    """The binary mode's `ce_` / `content-type` headers of `attributes` (a list, as confluent-kafka takes
    them) and their share of `binary_record`'s size bound: value bytes, 4 per name character and the
    per-header worst case. Pure twin of `umcef._native._kafka.binary_headers`; use `binary_headers`."""
    headers: list[tuple[str, bytes]] = []
    append = headers.append
    size = 0
    names = _HEADER_NAMES
    for name, value in attributes.items():
        raw = (value if type(value) is str else attribute_to_string(value)).encode("utf-8")  # most are strings
        size += len(raw) + 4 * len(name) + _HEADER_MAX_OVERHEAD
        header = names.get(name)
        if header is None:
            header = CE_PREFIX + name
            if len(names) < _HEADER_NAMES_MAX:
                names[name] = header
        append((header, raw))
    return headers, size


binary_headers: Callable[[dict[str, Any]], tuple[list[tuple[str, bytes]], int]] = _binary_headers
if accel.NATIVE:  # the compiled twin: no bytecode per attribute (~0.6 µs instead of ~2 µs for ten of them)
    with contextlib.suppress(ImportError):  # an extension built before this module existed
        from umcef._native._kafka import binary_headers


def structured_record(event: Event, key_mapper: KeyMapper = partitionkey_mapper) -> Record:
    """`to_structured` as the parts of a record, with an upper bound of its `encoded_size`."""
    key = key_mapper(event)
    value = json_format.encode(event)
    return list(_STRUCTURED_HEADERS), key, value, _STRUCTURED_MAX_OVERHEAD + len(value) + (
        0 if key is None else len(key))


# --------------------------------------------------------------------------------------------------
# decoding


def from_binary(msg: KafkaMessage, limits: Limits = NO_LIMITS) -> Event:
    """A validated event from a binary-mode record; `InvalidAttribute` names what is wrong.

    Every attribute comes back as a string (the binary mode carries no types); an empty or missing
    value is no data, as in the HTTP binding (the SDK writes an empty value for an event without data).
    """
    attrs: dict[str, Any] = {}
    for raw_name, raw_value in msg.headers:
        name = raw_name.lower()  # the SDK matches names case-insensitively too
        if name.startswith(CE_PREFIX):
            attr = name[len(CE_PREFIX):]
        elif name == CONTENT_TYPE_HEADER:
            attr = "datacontenttype"
        else:
            continue  # the record's own headers (tracing, routing...) are not attributes
        if attr in attrs:
            raise InvalidAttribute("appears in more than one header", attr)
        attrs[attr] = _utf8(attr, raw_value)
    _restore_partitionkey(attrs, msg.key)
    validate_attributes(attrs, limits.max_attributes, limits.max_attribute_bytes)
    return Event(attrs, msg.value if msg.value else None)


def from_structured(msg: KafkaMessage, limits: Limits = NO_LIMITS) -> Event:
    """A validated event from a structured-mode record (JSON, or protobuf by its content type)."""
    if msg.value is None:
        raise MalformedBody("a structured-mode record needs a value holding the event")
    media = _media_type(msg)
    if media in (None, json_format.CONTENT_TYPE):
        obj = json_format.loads(msg.value)
        key = _key_text(msg.key)
        if type(obj) is dict and PARTITIONKEY not in obj and key is not None:
            obj[PARTITIONKEY] = key
        # event_from_dict validates after we added the key, so a bad key can never slip in.
        return json_format.event_from_dict(obj, limits.max_attributes, limits.max_attribute_bytes)
    if media == PROTOBUF_CONTENT_TYPE:
        from umcef.fabric.formats import protobuf_format  # grpc/protobuf is an optional extra

        event = protobuf_format.decode(msg.value, limits.max_attributes, limits.max_attribute_bytes)
        key = _key_text(msg.key)
        if PARTITIONKEY not in event.attributes and key is not None:
            attrs = {**event.attributes, PARTITIONKEY: key}
            validate_attributes(attrs, limits.max_attributes, limits.max_attribute_bytes)
            event = Event(attrs, event.data)
        return event
    raise UnsupportedMediaType(
        f"unsupported event format {media!r} in a Kafka record; use application/cloudevents+json "
        "(the Kafka binding has no batch mode)"
    )


def from_message(msg: KafkaMessage, limits: Limits = NO_LIMITS) -> Event:
    """Either mode, told apart as the spec says (§3): a `content-type` starting with
    `application/cloudevents` (case-insensitive) is structured, anything else binary.

    A record that is neither (no CloudEvents content type and no `ce_` header at all) is
    `UnsupportedMediaType`, not a list of missing attributes.
    """
    if is_structured(msg):
        return from_structured(msg, limits)
    if not any(name[:3].lower() == CE_PREFIX for name, _ in msg.headers):
        raise UnsupportedMediaType("not a CloudEvent: no application/cloudevents content-type and no ce_ headers")
    return from_binary(msg, limits)


def is_structured(msg: KafkaMessage) -> bool:
    content_type = msg.header(CONTENT_TYPE_HEADER)
    prefix = CLOUDEVENTS_MEDIA_PREFIX.encode("ascii")
    return content_type is not None and content_type[: len(prefix)].lower() == prefix


# --------------------------------------------------------------------------------------------------
# size accounting


def encoded_size(msg: KafkaMessage) -> int:
    """Bytes of an uncompressed v2 record batch holding only this record.

    That is what a broker compares with `message.max.bytes` (topic: `max.message.bytes`, default
    1048588), and exact for a record that travels alone in its batch -- which every record larger than
    the producer's batch size does. Batched with others it costs a little less (offset and timestamp
    deltas, shared batch header); compressed, usually much less. So checking this against a limit never
    lets through a record the broker would refuse for its size.
    """
    body = 1 + 1 + 1  # attributes (int8), timestampDelta 0 and offsetDelta 0 (one varint byte each)
    body += _bytes_size(msg.key) + _bytes_size(msg.value) + _varint_size(len(msg.headers))
    for name, value in msg.headers:
        # Inlined for the common case (this runs for every published event): lengths below 64 take
        # one varint byte; a null header value is one byte (-1).
        n = len(name) if name.isascii() else len(name.encode("utf-8"))
        body += n + (1 if n < 64 else _varint_size(n))
        if value is None:
            body += 1
        else:
            v = len(value)
            body += v + (1 if v < 64 else _varint_size(v))
    return RECORD_BATCH_OVERHEAD + _varint_size(body) + body


def _bytes_size(data: bytes | None) -> int:
    """A varint length (-1 for null) and the bytes."""
    if data is None:
        return 1
    return _varint_size(len(data)) + len(data)


def _varint_size(value: int) -> int:
    """Length of Kafka's zig-zag varint encoding of `value`."""
    unsigned = (value << 1) ^ (value >> 63)
    size = 1
    while unsigned >= 0x80:
        unsigned >>= 7
        size += 1
    return size


# --------------------------------------------------------------------------------------------------
# helpers


def _utf8(attr: str, raw: bytes | None) -> str:
    if raw is None:  # Kafka allows a null header value; an attribute cannot be null
        raise InvalidAttribute("header has no value", attr)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidAttribute("header value is not valid UTF-8", attr) from None


def _key_text(key: bytes | None) -> str | None:
    """The record key as a `partitionkey`, when it can be one: a non-empty UTF-8 string.

    Any other key (an Avro or integer key written by a non-CloudEvents producer) is not an attribute
    of the event; it is left out rather than failing an otherwise valid event.
    """
    if not key:
        return None
    try:
        text = key.decode("utf-8")
    except UnicodeDecodeError:
        return None
    try:
        check_string(PARTITIONKEY, text)
    except InvalidAttribute:
        return None  # control characters etc.: not a CloudEvents String
    return text


def _restore_partitionkey(attrs: dict[str, Any], key: bytes | None) -> None:
    if PARTITIONKEY not in attrs:
        text = _key_text(key)
        if text is not None:
            attrs[PARTITIONKEY] = text


def _media_type(msg: KafkaMessage) -> str | None:
    raw = msg.header(CONTENT_TYPE_HEADER)
    if raw is None:
        return None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UnsupportedMediaType("content-type header is not valid UTF-8") from None
    return text.split(";", 1)[0].strip().lower()


__all__ = [
    "CE_PREFIX",
    "KafkaMessage",
    "KeyMapper",
    "Record",
    "binary_record",
    "encoded_size",
    "from_binary",
    "from_message",
    "from_structured",
    "is_structured",
    "no_key",
    "partitionkey_mapper",
    "structured_record",
    "to_binary",
    "to_structured",
]
