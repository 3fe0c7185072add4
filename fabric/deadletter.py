"""The dead-letter queue: a local-store topic of events that could not be delivered, with the reason.

The reason, the destination and the attempt count travel as extensions (`fabricreason`,
`fabricdest`, `fabricattempts`) so `umcef tail --topic _deadletter` shows why.
"""

from __future__ import annotations

import logging
from typing import Any

from umcef.adapters.local import LocalStore, Record
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

log = logging.getLogger("umcef.deadletter")
DEAD_LETTER_TOPIC = "_deadletter"
MAX_REASON_CHARS = 1024


def with_reason(attributes: dict[str, Any], destination: str, reason: str, attempts: int) -> dict[str, Any]:
    """`attributes` plus the dead-letter extensions."""
    return {**attributes, "fabricdest": destination, "fabricreason": reason[:MAX_REASON_CHARS],
            "fabricattempts": attempts}


class DeadLetterQueue:
    def __init__(self, store: LocalStore, topic: str = DEAD_LETTER_TOPIC) -> None:
        self.store = store
        self.topic = topic
        self.count = 0

    async def put(self, event: Event, reason: str, *, destination: str, attempts: int) -> None:
        """`event` with the dead-letter extensions. An event that already is a dead letter (its remote dead-letter
        destination could not take it either) keeps its own: where it came from and why is what an operator
        needs, and what sends a replay back there; this hop's reason is in the log line."""
        if "fabricreason" in event.attributes:
            reason = f"{reason} (a dead letter of {event.attributes.get('fabricdest')!s} already, kept as it was)"
            await self.put_raw(json_format.encode(event), event.id, reason)
            return
        attrs = with_reason(event.attributes, destination, reason, attempts)
        await self.put_raw(json_format.encode(Event(attrs, event.data)), event.id, reason)

    async def put_raw(self, payload: bytes, key: str | None, reason: str) -> None:
        await self.store.append([Record(self.topic, payload, key)])
        self.count += 1
        log.error("dead-lettered %s: %s", key, reason)
