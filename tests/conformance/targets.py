"""What the conformance suite needs from each backend: how to make fresh entities and bad URLs.

A backend's fixture `target_<backend>` (in `target_<backend>.py`) returns a `Target`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from umcef.adapters import open_adapter
from umcef.adapters.contract import Adapter


@dataclass(frozen=True)
class Entity:
    sink_url: str    # publish here
    source_url: str  # consume here (same entity, through a subscription/group where the broker needs one)


@dataclass
class Target:
    name: str
    # A fresh, empty entity; `ordered=True` asks for one that keeps per-key order (e.g. an SQS FIFO queue).
    new_entity: Callable[..., Awaitable[Entity]]
    # URLs of an entity that does not exist on a running broker.
    missing_entity: Callable[[], Entity]
    # A URL whose broker is down (nothing listening).
    unreachable_url: Callable[[], str]
    options: dict[str, Any] = field(default_factory=dict)
    # Seconds after which an unsettled delivery of a crashed consumer comes back (lock/visibility/ack deadline).
    redelivery_seconds: float = 5.0

    def open(self, url: str) -> Adapter:
        return open_adapter(url, **self.options)
