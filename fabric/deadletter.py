"""The dead-letter queue: a local-store topic of events that could not be delivered, with the reason.

The reason, the destination and the attempt count travel as extensions (`fabricreason`,
`fabricdest`, `fabricattempts`) so `umcef tail --topic _deadletter` shows why.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from umcef.adapters.local import LocalStore, Record
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

log = logging.getLogger("umcef.deadletter")
DEAD_LETTER_TOPIC = "_deadletter"
MAX_REASON_CHARS = 1024
IDS_LOGGED = 5  # per log line of a batch of dead letters: the first ids, then how many more


def is_dead_letter(attributes: Mapping[str, Any]) -> bool:
    """Whether an event already carries the dead-letter extensions (then it keeps them when dead-lettered again:
    where it came from and why is what an operator needs, and what sends a replay back there)."""
    return "fabricreason" in attributes


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
        await self.put_many([(event, reason, attempts)], destination=destination)

    async def put_many(self, letters: Sequence[tuple[Event, str, int]], *, destination: str) -> None:
        """Each (event, reason, attempts) with the dead-letter extensions, in one durable append (a page that
        expires or is refused at once is one commit, not one per event) and one log line per reason. An event
        that already is a dead letter (its remote dead-letter destination could not take it either) keeps its
        own extensions (`is_dead_letter`); this hop's reason is in the log line."""
        if not letters:
            return
        records: list[Record] = []
        by_reason: dict[str, list[str]] = {}
        for event, reason, attempts in letters:
            if is_dead_letter(event.attributes):
                reason = f"{reason} (a dead letter of {event.attributes.get('fabricdest')!s} already, kept as it was)"
                payload = json_format.encode(event)
            else:
                payload = json_format.encode(Event(with_reason(event.attributes, destination, reason, attempts),
                                                   event.data))
            records.append(Record(self.topic, payload, event.id))
            by_reason.setdefault(reason, []).append(event.id)
        await self.store.append(records)
        self.count += len(records)
        for reason, ids in by_reason.items():
            _log_letters(ids, reason)

    async def put_raw(self, payload: bytes, key: str | None, reason: str) -> None:
        await self.store.append([Record(self.topic, payload, key)])
        self.count += 1
        _log_letters([key], reason)


def _log_letters(ids: Sequence[str | None], reason: str) -> None:
    if len(ids) == 1:
        log.error("dead-lettered %s: %s", ids[0], reason)
        return
    more = f" and {len(ids) - IDS_LOGGED} more" if len(ids) > IDS_LOGGED else ""
    log.error("dead-lettered %d events (%s%s): %s", len(ids), ", ".join(map(str, ids[:IDS_LOGGED])), more, reason)
