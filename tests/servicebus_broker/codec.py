"""AMQP 1.0 message-section handling for the Service Bus test double.

proton's ``Message`` keeps only the last ``data`` section of a body and re-encodes everything it
touches, so the test double works on the raw encoded sections instead: it splits a transfer payload
into its sections, keeps the bare message (properties, application properties, body, footer) byte for
byte, and re-encodes only what a broker legitimately changes on the way out (the header's
delivery-count, the message annotations, and for dead-lettered messages the application properties).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from proton import Array, Data, Described, symbol, timestamp, uint, ulong

HEADER = 0x70
DELIVERY_ANNOTATIONS = 0x71
MESSAGE_ANNOTATIONS = 0x72
PROPERTIES = 0x73
APPLICATION_PROPERTIES = 0x74
DATA = 0x75
AMQP_SEQUENCE = 0x76
AMQP_VALUE = 0x77
FOOTER = 0x78

BODY_CODES = frozenset({DATA, AMQP_SEQUENCE, AMQP_VALUE})

_SYMBOLIC_DESCRIPTORS = {
    "amqp:header:list": HEADER,
    "amqp:delivery-annotations:map": DELIVERY_ANNOTATIONS,
    "amqp:message-annotations:map": MESSAGE_ANNOTATIONS,
    "amqp:properties:list": PROPERTIES,
    "amqp:application-properties:map": APPLICATION_PROPERTIES,
    "amqp:data:binary": DATA,
    "amqp:amqp-sequence:list": AMQP_SEQUENCE,
    "amqp:amqp-value:*": AMQP_VALUE,
    "amqp:footer:map": FOOTER,
}

# Order in which sections may appear (data / amqp-sequence may repeat; all body codes share a rank).
_RANK = {
    HEADER: 0,
    DELIVERY_ANNOTATIONS: 1,
    MESSAGE_ANNOTATIONS: 2,
    PROPERTIES: 3,
    APPLICATION_PROPERTIES: 4,
    DATA: 5,
    AMQP_SEQUENCE: 5,
    AMQP_VALUE: 5,
    FOOTER: 6,
}

# Index of fields in the AMQP properties list.
PROP_MESSAGE_ID = 0
PROP_TO = 2
PROP_SUBJECT = 3
PROP_REPLY_TO = 4
PROP_CORRELATION_ID = 5
PROP_CONTENT_TYPE = 6
PROP_GROUP_ID = 10


class MalformedMessage(ValueError):
    """The bytes are not a sequence of well-formed AMQP message sections."""


@dataclass(frozen=True)
class Section:
    """One encoded section: its descriptor code, its raw bytes and its decoded value."""

    code: int
    raw: bytes
    value: Any


def detach(value: Any) -> Any:
    """Deep-copy a decoded value: proton hands out binaries as views into memory it frees later."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, dict):
        return {detach(k): detach(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [detach(v) for v in value]
    if isinstance(value, Described):
        return Described(detach(value.descriptor), detach(value.value))
    if isinstance(value, Array):
        return Array(value.descriptor, value.type, *[detach(v) for v in value.elements])
    return value


def _decode_one(buf: bytes | memoryview, offset: int) -> tuple[int, Any, int]:
    data = Data()
    try:
        consumed = data.decode(bytes(buf[offset:]))
    except Exception as exc:  # proton raises DataException subclasses
        raise MalformedMessage(f"undecodable section at offset {offset}: {exc}") from exc
    if consumed <= 0:
        raise MalformedMessage(f"empty section at offset {offset}")
    data.rewind()
    data.next()
    obj = detach(data.get_object())
    if not isinstance(obj, Described):
        raise MalformedMessage(f"section at offset {offset} is not a described type")
    descriptor = obj.descriptor
    if isinstance(descriptor, int):
        code = int(descriptor)
    elif isinstance(descriptor, str) and str(descriptor) in _SYMBOLIC_DESCRIPTORS:
        code = _SYMBOLIC_DESCRIPTORS[str(descriptor)]
    else:
        raise MalformedMessage(f"unknown section descriptor {descriptor!r}")
    if code not in _RANK:
        raise MalformedMessage(f"unknown section code {code:#x}")
    return code, obj.value, consumed


def split_sections(buf: bytes | memoryview) -> list[Section]:
    """Split an encoded AMQP message into its sections, checking their order strictly."""
    sections: list[Section] = []
    offset = 0
    last_rank = -1
    seen_value = False
    while offset < len(buf):
        code, value, consumed = _decode_one(buf, offset)
        rank = _RANK[code]
        repeatable = code in (DATA, AMQP_SEQUENCE)
        if rank < last_rank or (rank == last_rank and not repeatable):
            raise MalformedMessage(f"section {code:#x} out of order")
        if code in BODY_CODES:
            if seen_value or (sections and sections[-1].code in BODY_CODES and sections[-1].code != code):
                raise MalformedMessage("mixed body section kinds")
            seen_value = code == AMQP_VALUE
        sections.append(Section(code, bytes(buf[offset : offset + consumed]), value))
        last_rank = rank
        offset += consumed
    if not sections:
        raise MalformedMessage("no sections")
    return sections


def encode_section(code: int, value: Any) -> bytes:
    data = Data()
    data.put_object(Described(ulong(code), value))
    return bytes(data.encode())


def _as_text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


@dataclass
class ParsedMessage:
    """A message as the broker stores it: raw bare-message sections plus decoded views."""

    header: list[Any] | None = None
    message_annotations: dict[Any, Any] = field(default_factory=dict)
    properties_raw: bytes | None = None
    properties: list[Any] = field(default_factory=list)
    application_properties_raw: bytes | None = None
    application_properties: dict[Any, Any] = field(default_factory=dict)
    body_raw: list[bytes] = field(default_factory=list)
    body: list[Any] = field(default_factory=list)
    body_code: int | None = None
    footer_raw: bytes | None = None
    encoded_size: int = 0

    @classmethod
    def from_sections(cls, sections: list[Section], encoded_size: int) -> ParsedMessage:
        msg = cls(encoded_size=encoded_size)
        for section in sections:
            if section.code == HEADER:
                msg.header = list(section.value or [])
            elif section.code == MESSAGE_ANNOTATIONS:
                msg.message_annotations = dict(section.value or {})
            elif section.code == PROPERTIES:
                msg.properties_raw = section.raw
                msg.properties = list(section.value or [])
            elif section.code == APPLICATION_PROPERTIES:
                msg.application_properties_raw = section.raw
                msg.application_properties = dict(section.value or {})
            elif section.code in BODY_CODES:
                msg.body_code = section.code
                msg.body_raw.append(section.raw)
                msg.body.append(section.value)
            elif section.code == FOOTER:
                msg.footer_raw = section.raw
            # delivery-annotations are hop-by-hop and are dropped.
        return msg

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> ParsedMessage:
        return cls.from_sections(split_sections(buf), len(buf))

    def _prop(self, index: int) -> Any:
        return self.properties[index] if len(self.properties) > index else None

    @property
    def message_id(self) -> Any:
        return self._prop(PROP_MESSAGE_ID)

    @property
    def session_id(self) -> str | None:
        return _as_text(self._prop(PROP_GROUP_ID))

    @property
    def content_type(self) -> str | None:
        return _as_text(self._prop(PROP_CONTENT_TYPE))

    @property
    def correlation_id(self) -> Any:
        return self._prop(PROP_CORRELATION_ID)

    @property
    def subject(self) -> str | None:
        return _as_text(self._prop(PROP_SUBJECT))

    def annotation(self, name: str) -> Any:
        for key, value in self.message_annotations.items():
            if str(key) == name:
                return value
        return None

    def encode(
        self,
        *,
        delivery_count: int | None = None,
        extra_annotations: dict[str, Any] | None = None,
        extra_application_properties: dict[str, Any] | None = None,
    ) -> bytes:
        """Re-encode for delivery: new header/annotations, the bare message kept byte for byte."""
        parts: list[bytes] = []
        header = list(self.header or [])
        if delivery_count is not None:
            header += [None] * (5 - len(header))
            header[4] = uint(delivery_count)
        if header:
            parts.append(encode_section(HEADER, header))
        annotations: dict[Any, Any] = dict(self.message_annotations)
        for key, value in (extra_annotations or {}).items():
            annotations = {k: v for k, v in annotations.items() if str(k) != key}
            annotations[symbol(key)] = value
        if annotations:
            parts.append(encode_section(MESSAGE_ANNOTATIONS, annotations))
        if self.properties_raw is not None:
            parts.append(self.properties_raw)
        if extra_application_properties:
            app = dict(self.application_properties)
            app.update(extra_application_properties)
            parts.append(encode_section(APPLICATION_PROPERTIES, app))
        elif self.application_properties_raw is not None:
            parts.append(self.application_properties_raw)
        parts.extend(self.body_raw)
        if self.footer_raw is not None:
            parts.append(self.footer_raw)
        return b"".join(parts)


def split_batch(sections: list[Section]) -> list[ParsedMessage] | None:
    """If ``sections`` look like a Service Bus batch envelope, return the inner messages.

    A batch is sent as one transfer with message-format 0x80013700 whose ``data`` sections each hold
    one complete encoded message. proton's Python binding does not expose a transfer's
    message-format, so a batch is recognised by structure: every body section is a ``data`` section
    whose payload is itself a strictly ordered sequence of AMQP sections with a body.
    """
    bodies = [s for s in sections if s.code in BODY_CODES]
    if not bodies or any(s.code != DATA for s in bodies):
        return None
    inner: list[ParsedMessage] = []
    for section in bodies:
        payload = section.value
        if not isinstance(payload, bytes | bytearray | memoryview) or len(payload) < 3 or payload[0] != 0:
            return None
        try:
            parts = split_sections(bytes(payload))
        except MalformedMessage:
            return None
        if not any(p.code in BODY_CODES for p in parts):
            return None
        inner.append(ParsedMessage.from_sections(parts, len(payload)))
    return inner


def to_timestamp(seconds: float) -> timestamp:
    return timestamp(int(seconds * 1000))


def plain(value: Any) -> Any:
    """Turn proton's wrapper types into plain Python values for test introspection."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, symbol):
        return str(value)
    if isinstance(value, str):
        return str(value)
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, uuid.UUID):
        return value
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value
