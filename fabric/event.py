"""The internal event: a flat attribute dict plus data, lean enough for the hot path.

Attribute values keep their CloudEvents type as a Python type: String/URI/URI-reference/Timestamp
are `str` (time stays an RFC 3339 string: parsing it on every hop costs more than it buys), Integer
is `int`, Boolean is `bool`, Binary is `bytes`.

`data` is `None`, `bytes` (an opaque body, e.g. from the HTTP binary mode), `str`, or a JSON value
decoded from a structured JSON event.

`raw` / `raw_data`: the exact JSON text the event (and its `data` member) arrived in, set only by the
JSON format's decoders (which, with the compiled parser, leave `data` as that text until something reads
it: `Event.unread`) when that text is a faithful encoding of the decoded event; `json_format.encode`
and `data_to_bytes` reuse it instead of serializing again. So an event is never changed in place once
decoded: a modified event is a new `Event` (which has no raw text), e.g. `Event({**e.attributes, ...},
e.data)`. Anything that must mutate an event in place reads `event.data` first (an unread event parses it
from `raw_data`), then clears both (`event.raw = event.raw_data = None`).
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

AttrValue = str | int | bool | bytes

SPECVERSION = "1.0"
REQUIRED = ("id", "source", "specversion", "type")
OPTIONAL = ("datacontenttype", "dataschema", "subject", "time")
CORE = frozenset(REQUIRED + OPTIONAL)


_UNREAD: Any = object()  # `Event._data` of an event whose data is still only its JSON text (`raw_data`)


class Event:
    """One CloudEvent. Equality compares attributes and data (not the raw text)."""

    __slots__ = ("_data", "attributes", "raw", "raw_data")

    def __init__(self, attributes: dict[str, Any], data: Any = None) -> None:
        self.attributes = attributes
        self._data = data
        self.raw: bytes | None = None  # see the module docstring: decoders set these, nothing else
        self.raw_data: bytes | None = None

    @classmethod
    def unread(cls, attributes: dict[str, Any], raw: bytes, raw_data: bytes) -> Event:
        """An event decoded from the JSON text `raw` whose `data` (not null) is the JSON text `raw_data`,
        parsed only if something asks for `data`: the gateway forwards that text as it came."""
        event = cls.__new__(cls)
        event.attributes = attributes
        event._data = _UNREAD
        event.raw = raw
        event.raw_data = raw_data
        return event

    @property
    def data(self) -> Any:
        data = self._data
        if data is _UNREAD:
            from umcef.fabric.formats.json_format import loads  # that module imports this one

            data = self._data = loads(self.raw_data)  # type: ignore[arg-type]  # set with _UNREAD
        return data

    @data.setter
    def data(self, value: Any) -> None:
        self._data = value

    def __reduce__(self) -> tuple[Any, ...]:
        # `_UNREAD` is this process's own object: pickle whether the data is unread, not the marker.
        unread = self._data is _UNREAD
        return _restore, (type(self), self.attributes, None if unread else self._data, self.raw, self.raw_data, unread)

    @property
    def id(self) -> str:
        return self.attributes["id"]  # type: ignore[no-any-return]

    @property
    def source(self) -> str:
        return self.attributes["source"]  # type: ignore[no-any-return]

    @property
    def type(self) -> str:
        return self.attributes["type"]  # type: ignore[no-any-return]

    @property
    def datacontenttype(self) -> str | None:
        return self.attributes.get("datacontenttype")

    def get(self, name: str, default: Any = None) -> Any:
        return self.attributes.get(name, default)

    def extensions(self) -> dict[str, Any]:
        return {k: v for k, v in self.attributes.items() if k not in CORE}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Event):
            return NotImplemented
        return self.attributes == other.attributes and self.data == other.data

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Event({self.attributes!r}, data={self.data!r})"


def _restore(cls: type[Event], attributes: dict[str, Any], data: Any, raw: bytes | None, raw_data: bytes | None,
             unread: bool) -> Event:
    """Unpickle (and copy) an `Event`, raw text and unread data included."""
    if unread:
        return cls.unread(attributes, raw, raw_data)  # type: ignore[arg-type]  # both set with unread data
    event = cls(attributes, data)
    event.raw, event.raw_data = raw, raw_data
    return event


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def new_id() -> str:
    return str(uuid.uuid4())


def fill_defaults(attributes: dict[str, Any]) -> dict[str, Any]:
    """What a publisher may leave out: `id`, `time` and `specversion` are filled in when missing."""
    attributes.setdefault("specversion", SPECVERSION)
    if not attributes.get("id"):
        attributes["id"] = new_id()
    attributes.setdefault("time", now_rfc3339())
    return attributes
