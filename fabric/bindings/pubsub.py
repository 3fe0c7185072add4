"""Our CloudEvents mapping onto Google Cloud Pub/Sub messages. Pure: no I/O, no Google libraries.

CloudEvents has no official Pub/Sub binding; this follows the convention of Google's own Eventarc
(`ce-` attributes). The full mapping, its limits and what is lossy: `docs/mapping-pubsub.md`. In short:

- **Binary mode** (preferred): each context attribute is one message attribute `ce-<name>` holding
  its canonical string (CloudEvents type system: `true`, `42`, base64 for Binary), `datacontenttype`
  is `content-type`, and the message data is the event data.
- **Structured mode** (fallback): the data is the JSON format, with the single attribute
  `content-type: application/cloudevents+json`. Used when binary mode would break a Pub/Sub
  attribute limit: more than 100 attributes, a key over 256 bytes or a value over 1024 bytes.
- **Ordering key** = the `partitionkey` extension (Pub/Sub's per-key order). A key longer than
  Pub/Sub's 1024 bytes becomes `sha256:<hex of the key>`: same key, same digest, so order holds.

`to_message` / `from_message` pick and detect the mode; `to_binary` / `from_binary` /
`to_structured` / `from_structured` force one. `message_size` is the serialized size of the
`google.pubsub.v1.PubsubMessage` we send, which is what Pub/Sub's 10 MB publish-request limit counts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from umcef.fabric.accel import validate_attributes
from umcef.fabric.bindings.http import attribute_to_string, data_to_bytes
from umcef.fabric.errors import InvalidAttribute, UnsupportedMediaType
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.limits import NO_LIMITS, Limits

CE_PREFIX: Final = "ce-"
CONTENT_TYPE: Final = "content-type"
STRUCTURED_CONTENT_TYPE: Final = json_format.CONTENT_TYPE

# Pub/Sub's documented limits (cloud.google.com/pubsub/quotas, "Resource limits").
MAX_ATTRIBUTES: Final = 100              # attributes per message
MAX_ATTRIBUTE_KEY_BYTES: Final = 256     # bytes in an attribute key
MAX_ATTRIBUTE_VALUE_BYTES: Final = 1024  # bytes in an attribute value
MAX_ORDERING_KEY_BYTES: Final = 1024     # bytes in an ordering key
MAX_REQUEST_MESSAGES: Final = 1000       # messages per Publish request
# Bytes in a serialized PublishRequest. The service documents "10 MB"; google-cloud-pubsub batches
# against 10 * 1000 * 1000 (not 10 MiB), and so do we: the stricter reading is the safe one.
MAX_REQUEST_BYTES: Final = 10 * 1000 * 1000

ORDERING_KEY_DIGEST_PREFIX: Final = "sha256:"


@dataclass(frozen=True, slots=True)
class PubsubMessage:
    """The parts of a `google.pubsub.v1.PubsubMessage` a publisher sets (the server adds id and time)."""

    data: bytes
    attributes: dict[str, str] = field(default_factory=dict)
    ordering_key: str = ""


# --------------------------------------------------------------------------------------------------
# event -> message


def to_message(event: Event) -> PubsubMessage:
    """Binary mode when it fits Pub/Sub's attribute limits, else structured mode."""
    message = to_binary(event)
    if attribute_limit_exceeded(message.attributes) is None:
        return message
    return to_structured(event)


def to_binary(event: Event) -> PubsubMessage:
    """Attributes as `ce-<name>` (canonical strings), `content-type`, data as the message data.

    Does not check Pub/Sub's attribute limits (`to_message` does, and falls back): forcing binary mode
    on an event that breaks them gives a message the service refuses with INVALID_ARGUMENT.
    """
    attributes: dict[str, str] = {}
    for name, value in event.attributes.items():
        if name == "datacontenttype":
            attributes[CONTENT_TYPE] = value
        else:
            attributes[CE_PREFIX + name] = attribute_to_string(value)
    return PubsubMessage(data_to_bytes(event), attributes, ordering_key(event))


def to_structured(event: Event) -> PubsubMessage:
    """The JSON format in the data; `content-type` is the only attribute."""
    return PubsubMessage(json_format.encode(event), {CONTENT_TYPE: STRUCTURED_CONTENT_TYPE}, ordering_key(event))


def ordering_key(event: Event) -> str:
    """The `partitionkey` extension as Pub/Sub ordering key ("" = unordered).

    Pub/Sub refuses keys over 1024 bytes. Such a key is replaced by a digest rather than dropped or
    rejected: the event stays deliverable and keeps its order relative to the events sharing its key.
    """
    value = event.attributes.get("partitionkey")
    if value is None:
        return ""
    key = attribute_to_string(value)
    if _utf8_len(key) <= MAX_ORDERING_KEY_BYTES:
        return key
    return ORDERING_KEY_DIGEST_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def attribute_limit_exceeded(attributes: Mapping[str, str]) -> str | None:
    """Why these attributes break a Pub/Sub limit, or None when they fit."""
    if len(attributes) > MAX_ATTRIBUTES:
        return f"{len(attributes)} attributes exceed Pub/Sub's limit of {MAX_ATTRIBUTES}"
    for key, value in attributes.items():
        if _utf8_len(key) > MAX_ATTRIBUTE_KEY_BYTES:
            return f"attribute key {key[:40]!r}... exceeds Pub/Sub's limit of {MAX_ATTRIBUTE_KEY_BYTES} bytes"
        if _utf8_len(value) > MAX_ATTRIBUTE_VALUE_BYTES:
            return f"attribute {key!r} exceeds Pub/Sub's limit of {MAX_ATTRIBUTE_VALUE_BYTES} bytes per value"
    return None


# --------------------------------------------------------------------------------------------------
# message -> event


def from_message(message: PubsubMessage, limits: Limits = NO_LIMITS) -> Event:
    """Either mode, detected: any `ce-` attribute means binary mode, else the content type must be
    `application/cloudevents+json` (structured mode).

    Binary first (unlike HTTP, which goes by media type first): binary mode always carries `ce-`
    attributes and structured mode never does, so an event whose *data* is a structured CloudEvent
    (`datacontenttype: application/cloudevents+json`) still decodes as the binary event it was sent as.
    """
    if any(key.startswith(CE_PREFIX) for key in message.attributes):
        return from_binary(message, limits)
    content_type = message.attributes.get(CONTENT_TYPE)
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if media == STRUCTURED_CONTENT_TYPE:
        return from_structured(message, limits)
    if media.startswith("application/cloudevents"):
        raise UnsupportedMediaType(f"unsupported event format {media!r} in a Pub/Sub message; "
                                   f"expected {STRUCTURED_CONTENT_TYPE} or binary mode")
    raise UnsupportedMediaType(
        f"not a CloudEvent: Pub/Sub message has no ce- attributes and content type "
        f"{content_type or '(none)'!r} is no CloudEvents format"
    )


def from_binary(message: PubsubMessage, limits: Limits = NO_LIMITS) -> Event:
    """`ce-` attributes and `content-type`; other attributes (set by other publishers) are ignored.

    Every value stays a string: Pub/Sub attributes are strings, and the canonical string is the
    CloudEvents-defined form of every type. Empty data is no data.
    """
    attrs: dict[str, Any] = {}
    for key, value in message.attributes.items():
        if key.startswith(CE_PREFIX):
            name = key[len(CE_PREFIX):]
        elif key == CONTENT_TYPE:
            name = "datacontenttype"
        else:
            continue
        if name in attrs:  # `content-type` and `ce-datacontenttype` both present
            raise InvalidAttribute("appears in more than one Pub/Sub attribute", name)
        attrs[name] = value
    validate_attributes(attrs, limits.max_attributes, limits.max_attribute_bytes)
    return Event(attrs, message.data if message.data else None)


def from_structured(message: PubsubMessage, limits: Limits = NO_LIMITS) -> Event:
    """The JSON format in the data. The ordering key is not read: `partitionkey` is in the JSON."""
    return json_format.decode(message.data, limits.max_attributes, limits.max_attribute_bytes)


# --------------------------------------------------------------------------------------------------
# sizes, as protobuf serializes them (tests check these against google-cloud-pubsub's own types)


def message_size(message: PubsubMessage) -> int:
    """Bytes of the serialized `PubsubMessage` (fields data=1, attributes=2 (a map), ordering_key=5).

    proto3 leaves empty scalar fields out; map entries always carry their key and value fields.
    """
    size = _field_size(len(message.data)) if message.data else 0
    for key, value in message.attributes.items():
        size += _field_size(_field_size(_utf8_len(key)) + _field_size(_utf8_len(value)))
    if message.ordering_key:
        size += _field_size(_utf8_len(message.ordering_key))
    return size


def request_size(topic_path: str, message_sizes: Iterable[int]) -> int:
    """Bytes of a serialized `PublishRequest(topic=1, messages=2)` holding messages of these sizes."""
    return request_overhead(topic_path) + sum(_field_size(size) for size in message_sizes)


def request_overhead(topic_path: str) -> int:
    """Bytes a `PublishRequest` needs besides its messages: the topic field."""
    return _field_size(_utf8_len(topic_path)) if topic_path else 0


def max_message_size(topic_path: str) -> int:
    """The largest `message_size` that fits a one-message request to this topic under MAX_REQUEST_BYTES."""
    room = MAX_REQUEST_BYTES - request_overhead(topic_path)
    size = room - 1 - _varint_size(room)  # tag + length of the one message field
    while _field_size(size + 1) <= room:  # the length varint may be a byte shorter than room's
        size += 1
    return size


def _field_size(payload: int) -> int:
    """A length-delimited field with a one-byte tag (field numbers 1-15)."""
    return 1 + _varint_size(payload) + payload


def _varint_size(value: int) -> int:
    size = 1
    while value >= 0x80:
        value >>= 7
        size += 1
    return size


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


__all__ = [
    "CE_PREFIX",
    "CONTENT_TYPE",
    "MAX_ATTRIBUTES",
    "MAX_ATTRIBUTE_KEY_BYTES",
    "MAX_ATTRIBUTE_VALUE_BYTES",
    "MAX_ORDERING_KEY_BYTES",
    "MAX_REQUEST_BYTES",
    "MAX_REQUEST_MESSAGES",
    "PubsubMessage",
    "attribute_limit_exceeded",
    "from_binary",
    "from_message",
    "from_structured",
    "max_message_size",
    "message_size",
    "ordering_key",
    "request_size",
    "to_binary",
    "to_message",
    "to_structured",
]
