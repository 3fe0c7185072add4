"""Inspect the delivery spools, and dead-letter an orphaned one (`umcef spool list|dead-letter`).

A remote destination's accepted events wait in its spool (`_spool.<name>`) until its broker acknowledged them;
the delivery cursor (`delivery`) marks how far that went, and the gateway trims what lies at or below it. No
retention ever deletes an undelivered spool record (that would lose accepted events), so when a destination
is removed from the configuration, its spool keeps whatever it had not delivered, with no worker left to
deliver it. `dead_letter` moves those events to the local dead-letter queue (`_deadletter`) with a reason,
in chunks, each chunk's copies and the cursor move past them in one transaction, conditional on the cursor
not having moved since it was read: a crash leaves every event either in the spool or in the dead-letter
queue, never both nor neither. `umcef dlq replay --destination <name> --to <new>` then re-drives them.

Which spools a gateway delivers is not read from a configuration file alone: a running gateway marks each
spool it has a worker for (`ALIVE_GROUP`), and a spool marked recently is refused.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from umcef.adapters.local import CursorMove, CursorMoved, LocalStore, Record
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC, is_dead_letter, with_reason
from umcef.fabric.delivery import ALIVE_GROUP, ALIVE_TIMEOUT, CURSOR_GROUP, SPOOL_PREFIX, spool_topic

if TYPE_CHECKING:
    from umcef.fabric.config import Config

CHUNK = 1000  # records per transaction when dead-lettering a spool


class SpoolError(Exception):
    """A user mistake or an unsafe request: one line for the CLI."""


@dataclass(frozen=True, slots=True)
class SpoolState:
    destination: str
    configured: bool | None  # a remote destination of the configuration (None: no configuration given)
    stored: int  # records in the store, including delivered ones the gateway has not trimmed yet
    undelivered: int  # after the delivery cursor
    cursor: int
    oldest_undelivered_at: float | None  # `stored_at` of the first undelivered record
    failing: int = 0  # undelivered events whose delivery failed at least once (noted attempts)
    most_attempts: int = 0  # the most attempts any of them has had

    @property
    def topic(self) -> str:
        return spool_topic(self.destination)

    @property
    def orphaned(self) -> bool:
        return self.configured is False and self.undelivered > 0

    def summary(self, now: float) -> dict[str, Any]:
        oldest = self.oldest_undelivered_at
        return {"destination": self.destination, "topic": self.topic, "configured": self.configured,
                "undelivered": self.undelivered, "stored": self.stored, "cursor": self.cursor,
                "oldest_undelivered_age_s": None if oldest is None else round(max(0.0, now - oldest), 3),
                "failing": self.failing, "most_attempts": self.most_attempts}


def remote_destinations(config: Config) -> set[str]:
    """The destinations whose delivery workers drain a spool."""
    return {name for name, dest in config.destinations.items() if not dest.is_local}


def states(store: LocalStore, remote: Collection[str] | None) -> list[SpoolState]:
    """Every spool in the store, and every remote destination of the configuration (`remote`: their names;
    None: no configuration), by destination name."""
    stored = {t: n for t, n in store.topics().items() if t.startswith(SPOOL_PREFIX)}
    names = {topic[len(SPOOL_PREFIX):] for topic in stored}
    names.update(remote or ())
    return [_state(store, name, None if remote is None else name in remote, stored.get(spool_topic(name), 0))
            for name in sorted(names)]


def orphans(store: LocalStore, remote: Collection[str]) -> list[SpoolState]:
    """`states` of the spools holding undelivered events that no destination of `remote` delivers. Reads only
    those: a configured spool's backlog (possibly huge) is not counted."""
    return [state for topic, n in store.topics().items()
            if topic.startswith(SPOOL_PREFIX) and (name := topic[len(SPOOL_PREFIX):]) not in remote
            and (state := _state(store, name, False, n)).orphaned]


def _state(store: LocalStore, name: str, configured: bool | None, stored: int) -> SpoolState:
    topic = spool_topic(name)
    cursor = store.cursor(CURSOR_GROUP, topic)
    first = store.read(topic, cursor, 1)
    attempts = store.attempts(topic, cursor)  # a row per failed event still undelivered: few
    return SpoolState(name, configured, stored, store.count(topic, cursor), cursor,
                      first[0].stored_at if first else None, len(attempts), max(attempts.values(), default=0))


def redrive_commands(destination: str, config: object) -> tuple[str, str]:
    """The two commands that empty an orphaned spool into the dead-letter queue and re-drive its events."""
    return (f"umcef spool dead-letter {destination} --config {config}",
            f"umcef dlq replay --destination {destination} --to NEW --all --config {config}")


def default_reason(destination: str) -> str:
    return f"destination {destination!r} is no longer configured; its undelivered spool was dead-lettered"


@dataclass(frozen=True, slots=True)
class Moved:
    events: int  # dead-lettered
    undecodable: int  # of those, records that are no JSON event: moved as they are, without a destination


def dead_letter(store: LocalStore, destination: str, reason: str, remote: Collection[str],
                chunk: int = CHUNK, now: Callable[[], float] = time.time) -> Moved:
    """Moves the undelivered events of `destination`'s spool to `_deadletter`, each with `fabricdest`,
    `fabricreason` and `fabricattempts` (the delivery attempts the store noted for it, else 0; an event that
    already is a dead letter, in the spool of a remote dead-letter destination, keeps its own). Refuses a
    destination `remote` still has, and a spool a running gateway marked as delivered within ALIVE_TIMEOUT
    (whatever `remote` says: the operator may have edited the file before restarting it); each chunk moves
    only if the delivery cursor is still where it was read."""
    topic = spool_topic(destination)
    if destination in remote:
        raise SpoolError(f"destination {destination!r} is configured: its delivery worker delivers {topic}; "
                         f"remove it from the configuration first")
    if topic not in store.appended():
        spools = ", ".join(t for t in store.appended() if t.startswith(SPOOL_PREFIX)) or "none"
        raise SpoolError(f"no spool {topic} in {store.path} (spools: {spools})")
    cursor = store.cursor(CURSOR_GROUP, topic)
    attempts = store.attempts(topic, cursor)
    moved = undecodable = 0
    while page := store.read(topic, cursor, chunk):
        _refuse_if_delivered(store, destination, now())
        records: list[Record] = []
        for stored in page:
            payload, event_id = _dead_letter_payload(stored.payload, destination, reason,
                                                     attempts.get(stored.seq, 0))
            records.append(Record(DEAD_LETTER_TOPIC, payload, event_id or stored.key))
            undecodable += event_id is None
        try:
            store.append_sync(records, [CursorMove(CURSOR_GROUP, topic, page[-1].seq, expected=cursor)])
        except CursorMoved:
            raise SpoolError(f"the delivery cursor of {topic} moved meanwhile: something else delivers this spool; "
                             f"stopped after {moved} events (they are in {DEAD_LETTER_TOPIC})") from None
        cursor = page[-1].seq
        moved += len(page)
    return Moved(moved, undecodable)


def _refuse_if_delivered(store: LocalStore, destination: str, now: float) -> None:
    alive = store.cursor(ALIVE_GROUP, spool_topic(destination))
    if alive and now - alive < ALIVE_TIMEOUT:
        raise SpoolError(f"a running gateway delivers {spool_topic(destination)} (its worker for {destination!r} "
                         f"said so {max(0.0, now - alive):.0f} s ago): restart it with the configuration without "
                         f"{destination!r}, then run this again")


def _dead_letter_payload(payload: bytes, destination: str, reason: str, attempts: int) -> tuple[bytes, str | None]:
    """The spooled event (structured JSON) with the dead-letter extensions, and its id; an undecodable record
    as it is, and None (`umcef dlq list` shows it as undecodable)."""
    try:
        event = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return payload, None
    if not isinstance(event, dict):
        return payload, None
    event_id = str(event.get("id", ""))
    if is_dead_letter(event):  # a dead letter already (from another destination): its details stay
        return payload, event_id
    return orjson.dumps(with_reason(event, destination, reason, attempts)), event_id


def age(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.1f} s"
