"""Inspect and re-drive the dead-letter queue (`umcef dlq list|replay`).

The DLQ is the `_deadletter` topic of the local store; each entry is identified by its store sequence
number. The store has no delete-by-seq, so a replay appends, in the same transaction as the replayed
events, one marker per entry to `_deadletter.replayed` (key = the entry's seq): an entry with a marker
is no longer pending, so a replay is never done twice, and a crash mid-replay leaves either both or
neither. Replayed events go to their destination's spool (`_spool.<dest>`; the delivery worker of a
running gateway picks them up within its poll interval) or to the topic of a local destination, with
the dead-letter extensions (`fabricreason`, `fabricdest`, `fabricattempts`) removed.

Works on a stopped gateway's data directory and on a running one's (SQLite WAL allows a second process).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from umcef.adapters.local import DB_FILENAME, LocalStore, Record, Retention
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC
from umcef.fabric.delivery import spool_topic

REPLAYED_TOPIC = DEAD_LETTER_TOPIC + ".replayed"
DLQ_EXTENSIONS = ("fabricreason", "fabricdest", "fabricattempts")
ROUTER_DEST = "(router)"  # what the pipeline writes when no destination was allowed
LOCAL_PREFIX = "local://"


class DlqError(Exception):
    """A user mistake or an impossible replay: one line for the CLI."""


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    stored_at: float
    event: dict[str, Any]  # structured-mode CloudEvent, dead-letter extensions included

    @property
    def id(self) -> str:
        return str(self.event.get("id", ""))

    @property
    def destination(self) -> str:
        return str(self.event.get("fabricdest", ""))

    def summary(self) -> dict[str, Any]:
        e = self.event
        return {"seq": self.seq, "id": self.id, "source": e.get("source"), "type": e.get("type"),
                "destination": self.destination, "reason": e.get("fabricreason"),
                "attempts": e.get("fabricattempts"), "stored_at": self.stored_at}


def open_store(data_dir: Path, *, write: bool = False) -> LocalStore:
    if not (data_dir / DB_FILENAME).exists():
        raise DlqError(f"no UMCEF store in {data_dir} (start the gateway with --data-dir {data_dir})")
    if not write:
        return LocalStore(data_dir, read_only=True)
    # No retention here: the gateway's own settings decide what ages out, never this short-lived writer.
    return LocalStore(data_dir, retention=Retention(None, None))


def _read_all(store: LocalStore, topic: str) -> Iterable[tuple[int, float, bytes, str | None]]:
    after = 0
    while page := store.read(topic, after, 1000):
        for stored in page:
            yield stored.seq, stored.stored_at, stored.payload, stored.key
        after = page[-1].seq


def pending(store: LocalStore, destination: str | None = None) -> list[DeadLetter]:
    """Dead letters not replayed yet, oldest first (optionally only those of one destination)."""
    replayed = {int(key) for _, _, _, key in _read_all(store, REPLAYED_TOPIC) if key and key.isdigit()}
    out = []
    for seq, stored_at, payload, _key in _read_all(store, DEAD_LETTER_TOPIC):
        if seq in replayed:
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            event = {"id": f"(undecodable #{seq})", "fabricreason": "undecodable record"}
        if not isinstance(event, dict):
            continue
        letter = DeadLetter(seq, stored_at, event)
        if destination is None or letter.destination == destination:
            out.append(letter)
    return out


def target_topic(name: str, local_topics: Mapping[str, str]) -> str:
    """Where a replay for destination `name` goes: `local://TOPIC` is that topic; a configured local
    destination its topic; anything else a remote destination's spool."""
    if name.startswith(LOCAL_PREFIX):
        topic = name[len(LOCAL_PREFIX):].strip("/")
        if not topic or "/" in topic or topic.startswith("_"):
            raise DlqError(f"--to {name!r}: expected local://TOPIC with a topic name not starting with '_'")
        return topic
    if not name or name == ROUTER_DEST:
        raise DlqError(f"no destination {name!r} to replay to")
    return local_topics.get(name, spool_topic(name))


def select(letters: Sequence[DeadLetter], ids: Sequence[str], replay_all: bool) -> list[DeadLetter]:
    if replay_all:
        return list(letters)
    if not ids:
        raise DlqError("replay needs --id ID (repeatable) or --all")
    wanted = set(ids)
    chosen = [d for d in letters if d.id in wanted]
    missing = wanted - {d.id for d in chosen}
    if missing:
        raise DlqError(f"no pending dead letter with id {', '.join(sorted(missing))}")
    return chosen


def replay(store: LocalStore, letters: Sequence[DeadLetter], to: str | None = None,
           local_topics: Mapping[str, str] | None = None) -> list[tuple[DeadLetter, str]]:
    """Append the events (without the dead-letter extensions) and their replay markers in one write."""
    local_topics = local_topics or {}
    plan: list[tuple[DeadLetter, str]] = []
    for letter in letters:
        dest = to if to is not None else letter.destination
        if to is None and dest in ("", ROUTER_DEST):
            raise DlqError(f"dead letter {letter.id} (#{letter.seq}) was refused by the router and has no "
                           f"destination; replay it with --to DEST")
        plan.append((letter, target_topic(dest, local_topics)))
    records: list[Record] = []
    now = time.time()
    for letter, topic in plan:
        event = {k: v for k, v in letter.event.items() if k not in DLQ_EXTENSIONS}
        key = event.get("partitionkey") or event.get("id")
        records.append(Record(topic, orjson.dumps(event), None if key is None else str(key)))
        marker = {"seq": letter.seq, "id": letter.id, "to": topic, "at": now}
        records.append(Record(REPLAYED_TOPIC, orjson.dumps(marker), str(letter.seq)))
    if records:
        store.append_sync(records)
    return plan
