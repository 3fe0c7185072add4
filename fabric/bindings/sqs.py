"""Our CloudEvents mapping onto Amazon SQS messages (SQS has no official binding). Pure: no I/O.

The full mapping, its limits and what is lossy: `docs/mapping-sqs.md`. In short:

- **Binary mode** (preferred): each context attribute is one SQS message attribute `ce-<name>`,
  `datacontenttype` is `content-type`, and the body is the data. The SQS data type keeps the
  CloudEvents type: String → `String`, Integer → `Number`, Boolean → `String.boolean`,
  Binary → `Binary`. When the body alone cannot say how to rebuild the data, one more attribute,
  `data-encoding`, says it (`none`, `base64`, `utf-8`, `json`).
- **Structured mode** (fallback): the body is the JSON format; one attribute,
  `content-type: application/cloudevents+json`. Used when the event needs more than SQS's 10 message
  attributes or holds something binary mode cannot carry (empty values, an empty body, text that
  is not XML-safe, over-long names).
- **FIFO queues**: `MessageGroupId` from `partitionkey` (the event id when there is none, so unkeyed
  events are not serialized behind each other) and `MessageDeduplicationId` = SHA-256 of
  (`source`, `id`): SQS itself drops a re-sent event within its 5-minute deduplication window.

`to_message` / `from_message` pick and detect the mode; `to_binary` / `from_binary` /
`to_structured` / `from_structured` force one. `SqsMessage.size()` is the size SQS checks against
its limit (body + every attribute's name, type and value, in bytes).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from umcef.fabric.accel import validate_attributes
from umcef.fabric.bindings.http import attribute_to_string
from umcef.fabric.errors import (
    EventError,
    InvalidAttribute,
    InvalidData,
    LimitExceeded,
    MalformedBody,
    UnsupportedMediaType,
)
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

CE_PREFIX: Final = "ce-"
CONTENT_TYPE: Final = "content-type"
DATA_ENCODING: Final = "data-encoding"
STRUCTURED_CONTENT_TYPE: Final = json_format.CONTENT_TYPE

# SQS data types. A custom label after the dot ("String.boolean") is SQS's own mechanism for typing
# attributes beyond its three base types; SQS stores and returns it verbatim.
STRING: Final = "String"
NUMBER: Final = "Number"
BINARY: Final = "Binary"
BOOLEAN: Final = "String.boolean"

# `data-encoding` values: how the body turns back into the event's data.
NO_DATA: Final = "none"       # no data; the body is a placeholder (SQS refuses empty bodies)
BASE64: Final = "base64"      # binary data, base64 in the body
UTF8_BYTES: Final = "utf-8"   # binary data that is XML-safe UTF-8 text, sent as that text (no 33 % base64 tax)
JSON_TEXT: Final = "json"     # a JSON value although `datacontenttype` is not a JSON type
NO_DATA_BODY: Final = "-"

MAX_ATTRIBUTES: Final = 10          # SQS: message attributes per message
MAX_NAME_LENGTH: Final = 256        # SQS: characters in an attribute name
MAX_GROUP_ID_LENGTH: Final = 128    # SQS: MessageGroupId / MessageDeduplicationId

# Characters SQS accepts in bodies and String values (XML 1.0 Char): #x9 #xA #xD #x20-#xD7FF #xE000-#xFFFD
# #x10000-#x10FFFF. CloudEvents-valid attribute strings always qualify (the spec forbids more); data may not.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
# The only non-XML characters orjson leaves unescaped in JSON text (it escapes C0 controls; a Python
# `str` that encodes to UTF-8 has no surrogates). Escaping them keeps the same JSON value.
_JSON_UNSAFE = re.compile("[\ufffe\uffff]")
# MessageGroupId: alphanumerics and ASCII punctuation, 1-128 characters.
_GROUP_ID_OK = re.compile(r"[!-~]{1,128}\Z")
_INTEGER = re.compile(r"-?[0-9]{1,10}\Z")
_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1


@dataclass(frozen=True, slots=True)
class SqsAttribute:
    """One SQS message attribute: `value` is `str` for String/Number types, `bytes` for Binary."""

    data_type: str
    value: str | bytes

    def to_wire(self) -> dict[str, Any]:
        """The `MessageAttributeValue` shape the AWS SDKs take and return."""
        if isinstance(self.value, bytes):
            return {"DataType": self.data_type, "BinaryValue": self.value}
        return {"DataType": self.data_type, "StringValue": self.value}

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> SqsAttribute:
        data_type = str(raw.get("DataType", ""))
        if data_type.startswith(BINARY):
            value = raw.get("BinaryValue")
            if isinstance(value, str):  # the wire's base64 when a caller did not decode it
                value = base64.b64decode(value)
            return cls(data_type, bytes(value or b""))
        return cls(data_type, str(raw.get("StringValue", "")))


@dataclass(frozen=True, slots=True)
class SqsMessage:
    """An SQS message as we send and receive it; `group_id`/`dedup_id` are only set for FIFO queues."""

    body: str
    attributes: dict[str, SqsAttribute] = field(default_factory=dict)
    group_id: str | None = None
    dedup_id: str | None = None

    def size(self) -> int:
        """Bytes as SQS counts them against its size limit: the body plus, for every message
        attribute, its name, its data type and its value (UTF-8; Binary values as raw bytes)."""
        total = _utf8_len(self.body)
        for name, attribute in self.attributes.items():
            value = attribute.value
            total += _utf8_len(name) + _utf8_len(attribute.data_type)
            total += len(value) if isinstance(value, bytes) else _utf8_len(value)
        return total

    def wire_attributes(self) -> dict[str, dict[str, Any]]:
        return {name: attribute.to_wire() for name, attribute in self.attributes.items()}


def _utf8_len(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------
# encoding


def to_message(event: Event, *, fifo: bool = False) -> SqsMessage:
    """Binary mode when the event fits it, else structured mode. Raises `EventError` for an invalid event."""
    validate_attributes(event.attributes)
    try:
        return _binary(event, fifo)
    except _NotRepresentable:
        return _structured(event, fifo)


def to_binary(event: Event, *, fifo: bool = False) -> SqsMessage:
    """Binary mode or an `EventError` saying why this event cannot use it (`LimitExceeded`, `InvalidData`...)."""
    validate_attributes(event.attributes)
    try:
        return _binary(event, fifo)
    except _NotRepresentable as exc:
        raise exc.error from None


def to_structured(event: Event, *, fifo: bool = False) -> SqsMessage:
    validate_attributes(event.attributes)
    return _structured(event, fifo)


class _NotRepresentable(Exception):
    """Internal: binary mode cannot carry this event; `error` is the reason (what `to_binary` raises)."""

    def __init__(self, error: EventError) -> None:
        super().__init__(str(error))
        self.error = error


def _binary(event: Event, fifo: bool) -> SqsMessage:
    body, encoding = _encode_data(event)
    count = len(event.attributes) + (encoding is not None)
    if count > MAX_ATTRIBUTES:
        raise _NotRepresentable(LimitExceeded(
            f"binary mode needs {count} message attributes, SQS allows {MAX_ATTRIBUTES}"))
    attributes: dict[str, SqsAttribute] = {}
    for name, value in event.attributes.items():
        wire_name = CONTENT_TYPE if name == "datacontenttype" else CE_PREFIX + name
        if len(wire_name) > MAX_NAME_LENGTH:
            raise _NotRepresentable(InvalidAttribute(
                f"name too long for an SQS attribute ({len(wire_name)} > {MAX_NAME_LENGTH})", name))
        attributes[wire_name] = _encode_value(name, value)
    if encoding is not None:
        attributes[DATA_ENCODING] = SqsAttribute(STRING, encoding)
    return _with_fifo_ids(SqsMessage(body, attributes), event, fifo)


def _encode_value(name: str, value: Any) -> SqsAttribute:
    # SQS refuses empty attribute values; CloudEvents allows an empty String/Binary extension.
    kind = type(value)
    if kind is str:
        if not value:
            raise _NotRepresentable(InvalidAttribute("an empty string has no SQS attribute form", name))
        return SqsAttribute(STRING, value)
    if kind is bool:
        return SqsAttribute(BOOLEAN, "true" if value else "false")
    if kind is int:
        return SqsAttribute(NUMBER, str(value))
    if kind is bytes:
        if not value:
            raise _NotRepresentable(InvalidAttribute("empty binary has no SQS attribute form", name))
        return SqsAttribute(BINARY, value)
    # Unreachable after validation; a clear error beats a wrong attribute.
    raise InvalidAttribute(f"cannot map a {kind.__name__} to an SQS attribute", name)


def _encode_data(event: Event) -> tuple[str, str | None]:
    """(body, data-encoding or None when the body and `datacontenttype` alone rebuild the data)."""
    data = event.data
    content_type = event.attributes.get("datacontenttype")
    if data is None:
        return NO_DATA_BODY, NO_DATA
    if isinstance(data, bytes | bytearray):
        if not data:
            raise _NotRepresentable(InvalidData("empty binary data has no SQS body (bodies cannot be empty)"))
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None and _xml_safe(text):
            return text, UTF8_BYTES
        return base64.b64encode(data).decode("ascii"), BASE64
    json_type = json_format.is_json_media_type(content_type)
    if type(data) is str and not json_type:
        if not data:
            raise _NotRepresentable(InvalidData("empty text has no SQS body (bodies cannot be empty)"))
        if not _xml_safe(data):
            raise _NotRepresentable(InvalidData("text holds characters SQS does not accept in a body"))
        return data, None
    return _json_text(data), None if json_type else JSON_TEXT


def _json_text(value: Any) -> str:
    try:
        text = json_format.dumps(value).decode("utf-8")
    except (TypeError, ValueError) as exc:  # orjson.JSONEncodeError is a TypeError
        raise InvalidData(f"data is not a JSON value: {exc}") from None
    return _escape_json(text)


def _escape_json(text: str) -> str:
    if text.isascii() or not _JSON_UNSAFE.search(text):
        return text
    return _JSON_UNSAFE.sub(lambda m: f"\\u{ord(m[0]):04x}", text)


def _xml_safe(text: str) -> bool:
    if text.isascii() and text.isprintable():
        return True
    return _NOT_XML.search(text) is None


def _structured(event: Event, fifo: bool) -> SqsMessage:
    try:
        text = json_format.encode(event).decode("utf-8")
    except (TypeError, ValueError) as exc:
        raise InvalidData(f"data is not a JSON value: {exc}") from None
    attributes = {CONTENT_TYPE: SqsAttribute(STRING, STRUCTURED_CONTENT_TYPE)}
    return _with_fifo_ids(SqsMessage(_escape_json(text), attributes), event, fifo)


def _with_fifo_ids(message: SqsMessage, event: Event, fifo: bool) -> SqsMessage:
    if not fifo:
        return message
    return SqsMessage(message.body, message.attributes, message_group_id(event), deduplication_id(event))


def message_group_id(event: Event) -> str:
    """The FIFO message group: `partitionkey`, else the event id (DESIGN.md: order per key, never global).

    A key SQS cannot take as it is (non-ASCII, spaces, longer than 128) becomes a stable hash of it, so
    one key still means one group."""
    key = event.attributes.get("partitionkey")
    text = event.id if key is None else attribute_to_string(key)
    if _GROUP_ID_OK.match(text):
        return text
    return "sha256-" + hashlib.sha256(text.encode("utf-8")).hexdigest()


def deduplication_id(event: Event) -> str:
    """SHA-256 of (`source`, `id`), the pair that identifies an event: 64 hex characters.

    A newline separates them: it cannot occur in a valid `source` (a URI-reference)."""
    return hashlib.sha256(f"{event.source}\n{event.id}".encode()).hexdigest()


def is_fifo_queue(queue_name: str) -> bool:
    return queue_name.endswith(".fifo")


# ---------------------------------------------------------------------------------------------------
# decoding


def from_message(message: SqsMessage) -> Event:
    """Detect the mode: binary when `ce-specversion` is present, structured by `content-type`.

    Binary is tested first: a binary-mode event whose own data is a CloudEvent (datacontenttype
    `application/cloudevents+json`) must not be mistaken for a structured one."""
    if CE_PREFIX + "specversion" in message.attributes:
        return from_binary(message)
    content_type = message.attributes.get(CONTENT_TYPE)
    if content_type is not None and _media_type(content_type.value) == STRUCTURED_CONTENT_TYPE:
        return from_structured(message)
    raise UnsupportedMediaType(
        "not a CloudEvent: no ce-specversion message attribute and no content-type "
        f"{STRUCTURED_CONTENT_TYPE!r}")


def from_structured(message: SqsMessage) -> Event:
    return json_format.decode(message.body)


def from_binary(message: SqsMessage) -> Event:
    attrs: dict[str, Any] = {}
    encoding: str | None = None
    for wire_name, attribute in message.attributes.items():
        if wire_name.startswith(CE_PREFIX):
            name = wire_name[len(CE_PREFIX):]
            attrs[name] = _decode_value(name, attribute)
        elif wire_name == CONTENT_TYPE:
            attrs["datacontenttype"] = _text(attribute, "datacontenttype")
        elif wire_name == DATA_ENCODING:
            encoding = _text(attribute, DATA_ENCODING)
        # Anything else was set by somebody else for their own purposes: not part of the event.
    if "datacontenttype" in attrs and "ce-datacontenttype" in message.attributes:
        raise InvalidAttribute("given both as content-type and as ce-datacontenttype", "datacontenttype")
    validate_attributes(attrs)
    return Event(attrs, _decode_data(message.body, encoding, attrs.get("datacontenttype")))


def _decode_value(name: str, attribute: SqsAttribute) -> Any:
    data_type, value = attribute.data_type, attribute.value
    if isinstance(value, bytes):
        return value
    if data_type == BOOLEAN:
        if value not in ("true", "false"):
            raise InvalidAttribute(f"a {BOOLEAN} attribute must be 'true' or 'false', got {value!r}", name)
        return value == "true"
    if data_type.startswith(NUMBER) and _INTEGER.match(value):
        number = int(value)
        if _INT_MIN <= number <= _INT_MAX:
            return number
    # Any other String or Number (e.g. "1.5" from a foreign producer) is kept as its text: a valid
    # CloudEvents String, where guessing a type could only lose information.
    return value


def _text(attribute: SqsAttribute, name: str) -> str:
    if isinstance(attribute.value, bytes):
        raise InvalidAttribute(f"expected a String message attribute, got {attribute.data_type}", name)
    return attribute.value


def _decode_data(body: str, encoding: str | None, content_type: str | None) -> Any:
    if encoding is None:
        if not json_format.is_json_media_type(content_type):
            return body
        try:
            return json_format.loads(body)
        except MalformedBody:
            # A foreign producer's body that is not the JSON its type promises: keep it, opaque,
            # as the HTTP binding does with any body.
            return body.encode("utf-8")
    if encoding == NO_DATA:
        return None
    if encoding == UTF8_BYTES:
        return body.encode("utf-8")
    if encoding == BASE64:
        try:
            return base64.b64decode(body, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidData("body is not valid base64", DATA_ENCODING) from None
    if encoding == JSON_TEXT:
        return json_format.loads(body)
    raise InvalidData(f"unknown data-encoding {encoding!r}; expected none, base64, utf-8 or json", DATA_ENCODING)


def _media_type(content_type: str | bytes) -> str:
    text = content_type.decode("utf-8", "replace") if isinstance(content_type, bytes) else content_type
    return text.split(";", 1)[0].strip().lower()


def message_from_wire(raw: Mapping[str, Any]) -> SqsMessage:
    """An `SqsMessage` from one entry of ReceiveMessage's `Messages` (group/dedup ids when present)."""
    attributes = {name: SqsAttribute.from_wire(value) for name, value in (raw.get("MessageAttributes") or {}).items()}
    system = raw.get("Attributes") or {}
    return SqsMessage(str(raw.get("Body", "")), attributes, system.get("MessageGroupId"),
                      system.get("MessageDeduplicationId"))


__all__ = [
    "SqsAttribute",
    "SqsMessage",
    "deduplication_id",
    "from_binary",
    "from_message",
    "from_structured",
    "is_fifo_queue",
    "message_from_wire",
    "message_group_id",
    "to_binary",
    "to_message",
    "to_structured",
]
