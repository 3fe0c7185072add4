"""Inspect and re-drive the dead-letter queues (`umcef dlq list|replay`).

Dead letters go to `delivery.dead_letter` (globally, and per destination): the local topic
`_deadletter` (the default) or a configured destination. `targets()` reads that from the gateway's
configuration; `_deadletter` is always one of them (sources dead-letter there whatever the setting).

- A local target (`_deadletter`, or a `local://TOPIC` destination): each entry is identified by its
  store sequence number. The store has no delete-by-seq, so a replay appends, in the same transaction
  as the replayed events, one marker per entry to `<topic>.replayed` (key = the entry's seq): an entry
  with a marker is no longer pending, so a replay is never done twice, and a crash mid-replay leaves
  either both or neither. Replayed events go to their destination's spool (`_spool.<dest>`; the
  delivery worker of a running gateway picks them up within its poll interval) or to the topic of a
  local destination, with the dead-letter extensions (`fabricreason`, `fabricdest`, `fabricattempts`)
  removed. A local destination's topic can also receive routed events: only entries carrying
  `fabricreason` are dead letters.
- A remote target (kafka://, sqs://, pubsub://, servicebus://): dead letters wait in its spool
  (`_spool.<name>`) until its broker acknowledged them. Those after the delivery cursor are listed;
  they are not replayable (the gateway's worker delivers them to the broker whatever we do, so a
  re-drive would send them both ways). Those already delivered live in the broker only: read and
  re-publish them there (docs/delivery.md says how, and why the CLI does not consume from brokers).

Works on a stopped gateway's data directory and on a running one's (SQLite WAL allows a second process).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from umcef.adapters.local import DB_FILENAME, LocalStore, Record, Retention
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC
from umcef.fabric.delivery import CURSOR_GROUP, spool_topic

if TYPE_CHECKING:
    from umcef.fabric.config import Config

REPLAYED_SUFFIX = ".replayed"
REPLAYED_TOPIC = DEAD_LETTER_TOPIC + REPLAYED_SUFFIX
DLQ_EXTENSIONS = ("fabricreason", "fabricdest", "fabricattempts")
ROUTER_DEST = "(router)"  # what the pipeline writes when no destination was allowed
LOCAL_PREFIX = "local://"


class DlqError(Exception):
    """A user mistake or an impossible replay: one line for the CLI."""


@dataclass(frozen=True, slots=True)
class DlqTarget:
    """One dead-letter destination: `_deadletter`, a local destination's topic or a remote one's spool."""

    name: str  # `_deadletter` or the configured destination's name
    topic: str  # the local topic, or the spool topic (`_spool.<name>`) of a remote destination
    url: str = ""  # the destination's URL ("" for `_deadletter`)
    feeds: tuple[str, ...] = ()  # whose dead letters land here: destination names, `(router)`

    @property
    def remote(self) -> bool:
        return bool(self.url) and not self.url.startswith(LOCAL_PREFIX)

    @property
    def marker_topic(self) -> str:
        return self.topic + REPLAYED_SUFFIX

    @property
    def where(self) -> str:
        if self.name == DEAD_LETTER_TOPIC:
            return f"local topic {self.topic}"
        if self.remote:
            return f"{self.url}, waiting in spool {self.topic}"
        return f"{self.url}, local topic {self.topic}"


DEFAULT_TARGET = DlqTarget(DEAD_LETTER_TOPIC, DEAD_LETTER_TOPIC)


@dataclass(frozen=True, slots=True)
class DeadLetter:
    seq: int
    stored_at: float
    event: dict[str, Any]  # structured-mode CloudEvent, dead-letter extensions included
    dlq: DlqTarget = DEFAULT_TARGET  # where it is

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
                "attempts": e.get("fabricattempts"), "stored_at": self.stored_at,
                "dlq": self.dlq.name, "topic": self.dlq.topic, "url": self.dlq.url or None,
                "replayable": not self.dlq.remote}


def targets(config: Config | None) -> list[DlqTarget]:
    """The dead-letter destinations of a configuration: `_deadletter` first (always: the default, and where
    sources dead-letter), then every destination named by `delivery.dead_letter` in configuration order."""
    if config is None:
        return [DEFAULT_TARGET]
    feeds: dict[str, list[str]] = {DEAD_LETTER_TOPIC: []}
    feeds.setdefault(config.delivery.defaults.dead_letter, []).append(ROUTER_DEST)
    for name, dest in config.destinations.items():
        if not dest.is_local:  # only remote destinations have delivery workers that dead-letter
            feeds.setdefault(dest.delivery.dead_letter, []).append(name)
    out = [DlqTarget(DEAD_LETTER_TOPIC, DEAD_LETTER_TOPIC, "", tuple(feeds[DEAD_LETTER_TOPIC]))]
    for name, dest in config.destinations.items():
        if name in feeds and name != DEAD_LETTER_TOPIC:
            out.append(DlqTarget(name, dest.topic, dest.url, tuple(feeds[name])))
    return out


def choose(available: Sequence[DlqTarget], names: Sequence[str], config_path: str | None) -> list[DlqTarget]:
    """The targets `--dlq NAME` picks (all of them when none is named)."""
    if not names:
        return list(available)
    by_name = {t.name: t for t in available}
    unknown = [n for n in names if n not in by_name]
    if unknown:
        known = ", ".join(by_name)
        if config_path is None:
            raise DlqError(f"--dlq {unknown[0]!r}: without --config the only dead-letter queue is {known}; "
                           f"give --config FILE to use the gateway's dead-letter destinations")
        raise DlqError(f"--dlq {unknown[0]!r} is not a dead-letter destination in {config_path} "
                       f"(dead-letter destinations: {known})")
    return [by_name[n] for n in dict.fromkeys(names)]


def open_store(data_dir: Path, *, write: bool = False) -> LocalStore:
    if not (data_dir / DB_FILENAME).exists():
        raise DlqError(f"no UMCEF store in {data_dir} (start the gateway with --data-dir {data_dir})")
    if not write:
        return LocalStore(data_dir, read_only=True)
    # No retention here: the gateway's own settings decide what ages out, never this short-lived writer.
    return LocalStore(data_dir, retention=Retention(None, None))


def _read_all(store: LocalStore, topic: str, after: int = 0) -> Iterable[tuple[int, float, bytes, str | None]]:
    while page := store.read(topic, after, 1000):
        for stored in page:
            yield stored.seq, stored.stored_at, stored.payload, stored.key
        after = page[-1].seq


def _letters(store: LocalStore, target: DlqTarget) -> Iterable[DeadLetter]:
    if target.remote:
        # Waiting for the broker: after the delivery worker's cursor (it moves once a page is acknowledged).
        replayed: set[int] = set()
        after = store.cursor(CURSOR_GROUP, target.topic)
    else:
        replayed = {int(key) for _, _, _, key in _read_all(store, target.marker_topic) if key and key.isdigit()}
        after = 0
    everything = target.name == DEAD_LETTER_TOPIC  # only dead letters go there; other topics are shared
    for seq, stored_at, payload, _key in _read_all(store, target.topic, after):
        if seq in replayed:
            continue
        try:
            event = orjson.loads(payload)
        except orjson.JSONDecodeError:
            if not everything:
                continue
            event = {"id": f"(undecodable #{seq})", "fabricreason": "undecodable record"}
        if not isinstance(event, dict) or (not everything and "fabricreason" not in event):
            continue  # an event routed or spooled to this destination, not a dead letter
        yield DeadLetter(seq, stored_at, event, target)


def pending(store: LocalStore, destination: str | None = None,
            dlqs: Sequence[DlqTarget] = (DEFAULT_TARGET,)) -> list[DeadLetter]:
    """Dead letters not replayed (local) or not delivered yet (remote spool), per target oldest first,
    optionally only those dead-lettered from one destination."""
    return [letter for target in dlqs for letter in _letters(store, target)
            if destination is None or letter.destination == destination]


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


def not_replayable(target: DlqTarget) -> str:
    return (f"{target.name} is a remote dead-letter destination ({target.url}): its dead letters are delivered "
            f"to that broker, so replay them from the broker; umcef dlq replay only re-drives local dead-letter "
            f"topics")


def select(letters: Sequence[DeadLetter], ids: Sequence[str], replay_all: bool,
           dlqs: Sequence[DlqTarget] = ()) -> list[DeadLetter]:
    """The entries to replay: `--all` takes every replayable one (remote spools are not), `--id` exactly
    those ids, and fails if one is missing or only waiting in a remote destination's spool."""
    if replay_all:
        return [d for d in letters if not d.dlq.remote]
    if not ids:
        raise DlqError("replay needs --id ID (repeatable) or --all")
    wanted = set(ids)
    chosen = [d for d in letters if d.id in wanted]
    remote = [d for d in chosen if d.dlq.remote]
    if remote:
        raise DlqError(f"dead letter {remote[0].id} is waiting in the spool of {remote[0].dlq.name}, not "
                       f"replayable: " + not_replayable(remote[0].dlq))
    missing = wanted - {d.id for d in chosen}
    if missing:
        brokers = sorted(t.name for t in dlqs if t.remote)
        hint = (f" (dead letters already delivered to {', '.join(brokers)} are in "
                f"{'its broker' if len(brokers) == 1 else 'their brokers'})") if brokers else ""
        raise DlqError(f"no pending dead letter with id {', '.join(sorted(missing))}{hint}")
    return chosen


def replay(store: LocalStore, letters: Sequence[DeadLetter], to: str | None = None,
           local_topics: Mapping[str, str] | None = None) -> list[tuple[DeadLetter, str]]:
    """Append the events (without the dead-letter extensions) and their replay markers in one write."""
    local_topics = local_topics or {}
    plan: list[tuple[DeadLetter, str]] = []
    for letter in letters:
        if letter.dlq.remote:
            raise DlqError(not_replayable(letter.dlq))
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
        records.append(Record(letter.dlq.marker_topic, orjson.dumps(marker), str(letter.seq)))
    if records:
        store.append_sync(records)
    return plan
