"""The price of sending one event to a destination: bytes x egress price + the per-request price.

    cost_usd = size_bytes * egress_usd_per_gb / 1e9 + usd_per_million / 1e6

The route table stores both prices pre-divided (USD per byte, USD per request) so the decision does one
multiply-add per candidate. The size is an estimate of the encoded event, computed at most once per
decision and only when a route weighs cost among two or more candidates.
"""

from __future__ import annotations

from typing import Any

import orjson

from umcef.fabric.event import Event

BYTES_PER_GB = 1e9
REQUESTS_PER_MILLION = 1e6


def per_byte(egress_usd_per_gb: float) -> float:
    return egress_usd_per_gb / BYTES_PER_GB


def per_request(usd_per_million: float) -> float:
    return usd_per_million / REQUESTS_PER_MILLION


def cost_usd(size_bytes: int, usd_per_byte: float, usd_per_request: float) -> float:
    return size_bytes * usd_per_byte + usd_per_request


def event_size(event: Event) -> int:
    """Approximate size of the event on the wire: attribute names and values plus the data."""
    size = 0
    for name, value in event.attributes.items():
        size += len(name) + (len(value) if value.__class__ is str else 8)
    if event.raw_data is not None:  # its JSON text, without parsing an unread event's data
        return size + len(event.raw_data)
    data = event.data
    if data is None:
        return size
    if data.__class__ is bytes or data.__class__ is str:
        return size + len(data)
    return size + _json_size(data)


def _json_size(data: Any) -> int:
    try:
        return len(orjson.dumps(data))
    except TypeError:
        return len(repr(data))
