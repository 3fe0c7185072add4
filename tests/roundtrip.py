"""What a broker mapping's round trip promises to keep, shared by the binding tests and conformance."""

from __future__ import annotations

import json
from typing import Any

from umcef.fabric.bindings.http import attribute_to_string, data_to_bytes
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format


def spec_example(data: Any = None, **attrs: Any) -> Event:
    """The bindings specs' example event; an attribute given as None is left out."""
    base = {"specversion": "1.0", "id": "1234-1234-1234", "source": "/mycontext/subcontext",
            "type": "com.example.someevent", "time": "2018-04-05T03:56:24Z"}  # fmt: skip
    base.update(attrs)
    return Event({k: v for k, v in base.items() if v is not None}, data)


def canonical(event: Event, mode: str = "binary") -> tuple[dict[str, str], Any]:
    """Attributes as canonical strings (the binary modes carry every attribute as a string, which is
    lossless within the CloudEvents type system); data as its bytes, except JSON data in structured
    mode, which the JSON format carries as a JSON value (so compare the parsed value:
    `"\\u00a0"` and `"\u00a0"` are the same JSON)."""
    attributes = {k: attribute_to_string(v) for k, v in event.attributes.items()}
    raw = data_to_bytes(event)
    if mode == "structured" and raw and json_format.is_json_media_type(event.datacontenttype):
        return attributes, json.loads(raw)
    return attributes, raw
