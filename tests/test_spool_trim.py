"""Delivered records leave the delivery spools: `Retention.trim_consumed` deletes what a consumer's cursor
has passed (the gateway: `_spool.*` topics, the delivery cursor), in chunks, from the writer thread; count
retention never deletes past that cursor; the per-topic appended counter survives it all; and the
delivery worker's lazy cursor moves ride on append commits instead of committing alone."""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

import umcef.adapters.local as local
from tests.brokers import KafkaBroker, closed_port, eventually, unique_name
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory, gateway_config, http_url
from tests.test_failover import UNREACHABLE_OPTIONS
from umcef.adapters.local import LocalStore, Record, Retention, TrimConsumed
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC
from umcef.fabric.delivery import CURSOR_GROUP, SPOOL_PREFIX, spool_topic
from umcef.fabric.dlq import REPLAYED_TOPIC, pending
from umcef.fabric.event import Event
from umcef.fabric.gateway import CURSOR_DELAY_SECONDS, Gateway, open_store

RULE = TrimConsumed(SPOOL_PREFIX, CURSOR_GROUP)
PAYLOAD = b'{"specversion":"1.0","id":"x","source":"/trim","type":"t","data":"' + b"p" * 540 + b'"}'
MODES = pytest.mark.parametrize("process", [False, True], ids=["in-process", "delivery-process"])


def records(topic: str, n: int) -> list[Record]:
    return [Record(topic, PAYLOAD, f"k{i}") for i in range(n)]


def spool_store(path: Path, **kw: Any) -> LocalStore:
    """A store that trims `_spool.*` by the delivery cursor only on demand (`trim_consumed`)."""
    kw.setdefault("retention", Retention(None, None, (RULE,)))
    return LocalStore(path, sync="normal", trim_interval=3600, **kw)


def seqs(store: LocalStore, topic: str) -> list[int]:
    return [e.seq for e in store.read(topic, 0, 100_000)]


# -- the store ---------------------------------------------------------------------------------------------


def test_records_at_or_below_the_consumers_cursor_are_trimmed_and_nothing_else(tmp_path: Path) -> None:
    with spool_store(tmp_path) as s:
        a = s.append_sync(records("_spool.a", 10))
        b = s.append_sync(records("_spool.b", 4))
        c = s.append_sync(records("_spool.c", 3))  # never delivered: no cursor
        dead = s.append_sync(records(DEAD_LETTER_TOPIC, 5))
        s.append_sync(records("orders", 5))
        s.commit_cursor(CURSOR_GROUP, "_spool.a", a[6])  # seven delivered, three waiting
        s.commit_cursor("someone-else", "_spool.b", b[-1])  # another consumer's cursor does not count
        s.commit_cursor(CURSOR_GROUP, DEAD_LETTER_TOPIC, dead[-1])  # not a spool: the rule never matches it
        assert s.trim_consumed() == 7
        assert seqs(s, "_spool.a") == a[7:] and seqs(s, "_spool.b") == b and seqs(s, "_spool.c") == c
        assert seqs(s, DEAD_LETTER_TOPIC) == dead
        assert s.topics() == {"_spool.a": 3, "_spool.b": 4, "_spool.c": 3, DEAD_LETTER_TOPIC: 5, "orders": 5}
        assert s.trim_consumed() == 0
        s.commit_cursor(CURSOR_GROUP, "_spool.a", a[-1])
        assert s.apply_retention() == 3  # apply_retention trims too
        # An emptied topic leaves topics() but keeps counting its appends.
        assert "_spool.a" not in s.topics() and s.appended()["_spool.a"] == 10
        s.append_sync(records("_spool.a", 2))
        assert s.appended() == {"_spool.a": 12, "_spool.b": 4, "_spool.c": 3, DEAD_LETTER_TOPIC: 5, "orders": 5}


def test_the_writer_trims_on_its_own_every_trim_interval(tmp_path: Path) -> None:
    with LocalStore(tmp_path, sync="normal", retention=Retention(None, None, (RULE,)), trim_interval=0.05) as s:
        delivered = s.append_sync(records("_spool.a", 5))
        s.commit_cursor(CURSOR_GROUP, "_spool.a", delivered[-1])
        waiting = s.append_sync(records("_spool.a", 2))
        deadline = time.monotonic() + 30
        while s.topics().get("_spool.a") != 2:
            assert time.monotonic() < deadline, "the writer never trimmed the delivered records"
            time.sleep(0.02)
        assert seqs(s, "_spool.a") == waiting


def test_trimming_deletes_in_chunks_and_commits_queued_writes_between_them(tmp_path: Path) -> None:
    with spool_store(tmp_path) as s:
        delivered = s.append_sync(records("_spool.a", local._TRIM_CHUNK * 2 + 10))
        s.commit_cursor(CURSOR_GROUP, "_spool.a", delivered[-1])
        statements: list[str] = []
        queued: list[object] = []

        def trace(sql: str) -> None:  # runs in the writer thread, for each statement of its connection
            if sql.startswith(("DELETE FROM events", "INSERT INTO cursors")):
                statements.append(sql.split()[0] + " " + sql.split()[2])
            if sql.startswith("DELETE FROM events") and not queued:
                queued.append(s.commit_cursor_later("other", "t", 1))  # arrives while the first chunk runs

        s._wconn.set_trace_callback(trace)  # the writer is idle: nothing else uses the connection now
        assert s.trim_consumed() == local._TRIM_CHUNK * 2 + 10
        # Two full chunks and ten, the queued write committed after the first chunk rather than after all.
        assert statements == ["DELETE events", "INSERT cursors", "DELETE events", "DELETE events"]
        assert s.cursor("other", "t") == 1 and "_spool.a" not in s.topics()


def test_trimming_deletes_through_the_topic_seq_index(tmp_path: Path) -> None:
    with spool_store(tmp_path) as s:
        s.append_sync(records("_spool.a", 1))
    conn = sqlite3.connect(tmp_path / "events.db")
    try:
        for sql, params, use in ((local._NTH_OLDEST, ("_spool.a", 10, 999), "COVERING INDEX"),
                                 (local._DELETE_UP_TO, ("_spool.a", 10), "INDEX"),
                                 (local._TRIMMABLE_SQL, (CURSOR_GROUP,), "COVERING INDEX")):
            plan = [row[-1] for row in conn.execute("EXPLAIN QUERY PLAN " + sql, params)]
            assert f"USING {use} events_topic_seq (topic=? AND seq<?)" in " ".join(plan), plan
            assert not any(step.startswith("SCAN") for step in plan), plan
    finally:
        conn.close()


def test_trim_commits_skip_their_own_fsync_with_sync_full(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A trim lost in a power cut only brings back records at or below a durable cursor (trimmed again later),
    # so it gets no fsync of its own; every commit that acknowledges a caller does.
    fsyncs: list[int] = []
    monkeypatch.setattr(local, "_fsync_file", fsyncs.append)
    with LocalStore(tmp_path, sync="full", retention=Retention(None, None, (RULE,)), trim_interval=3600) as s:
        spooled = s.append_sync(records("_spool.a", 3))
        s.commit_cursor(CURSOR_GROUP, "_spool.a", spooled[-1])
        assert len(fsyncs) == 2
        assert s.trim_consumed() == 3
        assert len(fsyncs) == 2
        s.append_sync(records("_spool.a", 1))
        assert len(fsyncs) == 3 == s.fsync_count
        assert s._wconn.execute("PRAGMA synchronous").fetchone()[0] == 1  # NORMAL: the writer syncs, not SQLite


def test_count_retention_never_deletes_what_the_consumer_has_not_consumed(tmp_path: Path) -> None:
    with spool_store(tmp_path, retention=Retention(None, 2, (RULE,))) as s:
        spool = s.append_sync(records("_spool.a", 10))
        s.append_sync(records("orders", 10))
        assert s.apply_retention() == 8  # orders keeps its newest two; the spool has no cursor: all kept
        assert seqs(s, "_spool.a") == spool
        s.commit_cursor(CURSOR_GROUP, "_spool.a", spool[3])
        assert s.apply_retention() == 4  # the four delivered; the six waiting stay although 6 > 2
        assert seqs(s, "_spool.a") == spool[4:]


def test_age_retention_never_deletes_what_the_consumer_has_not_consumed(tmp_path: Path) -> None:
    # A gateway down longer than store.max_age_seconds: its spools' undelivered events must not go silently;
    # its workers dead-letter them at their own maximum age (delivery.max_age_seconds) when they start.
    with spool_store(tmp_path, retention=Retention(60, None, (RULE,))) as s:
        spool = s.append_sync(records("_spool.a", 5))
        s.append_sync(records("orders", 3))
        s.append_sync(records("_spoolish", 2))  # not the rule's prefix (`_` is no wildcard here)
        assert s.apply_retention(now=time.time() + 3600) == 5
        assert s.topics() == {"_spool.a": 5}
        s.commit_cursor(CURSOR_GROUP, "_spool.a", spool[1])
        assert s.apply_retention(now=time.time() + 3600) == 2  # consumed: trimmed
        assert seqs(s, "_spool.a") == spool[2:]


def test_the_store_file_stops_growing_once_delivered_records_are_trimmed(tmp_path: Path) -> None:
    def pages() -> int:
        conn = sqlite3.connect(tmp_path / "events.db")
        try:
            return int(conn.execute("PRAGMA page_count").fetchone()[0])
        finally:
            conn.close()

    sizes: list[int] = []
    with spool_store(tmp_path) as s:
        for _ in range(12):  # 24,000 records of ~600 bytes through the spool, 2,000 at a time
            delivered = s.append_sync(records("_spool.a", 2_000))
            s.commit_cursor(CURSOR_GROUP, "_spool.a", delivered[-1])
            assert s.trim_consumed() == 2_000
            sizes.append(pages())
    # Freed pages are reused: the file holds about one round, not twelve.
    assert sizes[-1] <= sizes[1] * 1.1, sizes


V1_SCHEMA = """
CREATE TABLE events (seq INTEGER PRIMARY KEY, topic TEXT NOT NULL, stored_at REAL NOT NULL, key TEXT,
                     payload BLOB NOT NULL);
CREATE INDEX events_topic_seq ON events (topic, seq);
CREATE INDEX events_stored_at ON events (stored_at);
CREATE TABLE topics (topic TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE cursors (consumer TEXT NOT NULL, topic TEXT NOT NULL, seq INTEGER NOT NULL,
                      PRIMARY KEY (consumer, topic)) WITHOUT ROWID;
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT INTO counters VALUES ('last_seq', 3);
INSERT INTO events VALUES (1, 'a', 0.0, NULL, x'7b7d'), (2, 'a', 0.0, NULL, x'7b7d'), (3, 'b', 0.0, NULL, x'7b7d');
INSERT INTO topics VALUES ('a', 2), ('b', 1);
PRAGMA application_id = 1431126853;  -- "UMCE"
PRAGMA user_version = 1;
"""


def test_noted_attempts_are_read_back_after_a_reopen_and_trimmed_with_their_records(tmp_path: Path) -> None:
    topic = "_spool.a"
    with spool_store(tmp_path) as s:
        a = s.append_sync(records(topic, 3))
        s.append_sync(records("_spool.b", 1))
        s.note_attempts_later(topic, [(a[0], 1), (a[1], 1)]).result()
        s.note_attempts_later(topic, [(a[0], 2)]).result()  # a later count replaces the earlier one
        assert s.attempts(topic) == {a[0]: 2, a[1]: 1}
        assert s.attempts(topic, after=a[0]) == {a[1]: 1} and s.attempts("_spool.b") == {}
    with spool_store(tmp_path) as s:  # durable: what a restarted worker reads
        assert s.attempts(topic) == {a[0]: 2, a[1]: 1}
        s.commit_cursor(CURSOR_GROUP, topic, a[0])
        assert s.trim_consumed() == 1
        assert s.attempts(topic) == {a[1]: 1}  # gone with its record
    with LocalStore(tmp_path, read_only=True) as ro:
        assert ro.attempts(topic) == {a[1]: 1}


def test_a_store_file_of_schema_v1_opens_and_gets_the_appended_counter(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "events.db")
    conn.executescript(V1_SCHEMA)
    conn.close()
    with LocalStore(tmp_path, read_only=True) as ro:  # not migrated by a reader: its counts stand in
        assert ro.topics() == ro.appended() == {"a": 2, "b": 1}
    with spool_store(tmp_path) as s:
        assert s.topics() == s.appended() == {"a": 2, "b": 1}
        assert s.append_sync(records("a", 3)) == [4, 5, 6]
        assert s.topics() == s.appended() == {"a": 5, "b": 1}
    conn = sqlite3.connect(tmp_path / "events.db")
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == 3
        assert conn.execute("SELECT value FROM counters WHERE name = 'compatible_from'").fetchone() == (2,)
        assert conn.execute("SELECT count(*) FROM attempts").fetchone() == (0,)  # v3's table, created
    finally:
        conn.close()
    with LocalStore(tmp_path, read_only=True) as ro:
        assert ro.appended() == {"a": 5, "b": 1} and [e.seq for e in ro.read("a")] == [1, 2, 4, 5, 6]


def test_a_newer_store_file_opens_when_it_says_this_code_can_use_it(tmp_path: Path) -> None:
    # A release whose migration only adds keeps `compatible_from`: rolling back to this code needs nothing
    # done by hand. One that raises it, or a file without the row, is refused with the versions named.
    with spool_store(tmp_path) as s:
        s.append_sync(records("a", 2))
    db = tmp_path / "events.db"

    def set_header(version: int, compatible_from: int | None) -> None:
        conn = sqlite3.connect(db, isolation_level=None)
        try:
            conn.execute(f"PRAGMA user_version = {version}")
            if compatible_from is None:
                conn.execute("DELETE FROM counters WHERE name = 'compatible_from'")
            else:
                conn.execute("UPDATE counters SET value = ? WHERE name = 'compatible_from'", (compatible_from,))
        finally:
            conn.close()

    def header() -> tuple[int, int | None]:
        conn = sqlite3.connect(db)
        try:
            row = conn.execute("SELECT value FROM counters WHERE name = 'compatible_from'").fetchone()
            return conn.execute("PRAGMA user_version").fetchone()[0], None if row is None else row[0]
        finally:
            conn.close()

    assert header() == (3, 2)
    set_header(4, 3)
    with spool_store(tmp_path) as s:
        assert s.append_sync(records("a", 1)) == [3] and seqs(s, "a") == [1, 2, 3]
    with LocalStore(tmp_path, read_only=True) as ro:
        assert ro.appended() == {"a": 3}
    assert header() == (4, 3)  # left as the newer code wrote it
    set_header(4, 4)
    with pytest.raises(ValueError, match=r"store schema v4 is newer than this code \(v3\) and needs code of schema "
                                         r"v4 or later"):
        spool_store(tmp_path)
    set_header(5, None)
    with pytest.raises(ValueError, match=r"schema v5 is newer than this code \(v3\) and needs code of schema v5"):
        LocalStore(tmp_path, read_only=True)
    set_header(3, None)  # a file of this schema written before the row existed gets it
    spool_store(tmp_path).close()
    assert header() == (3, 2)


def test_a_file_taken_back_to_schema_v1_by_hand_migrates_forward_again(tmp_path: Path) -> None:
    # The documented rollback to schema-1 code: `PRAGMA user_version = 1`. Schema-1 code then appends without
    # the appended counter; the next schema-2 open must not trip over the column it already has.
    with spool_store(tmp_path) as s:
        s.append_sync(records("a", 2))
    conn = sqlite3.connect(tmp_path / "events.db", isolation_level=None)
    try:
        conn.execute("PRAGMA user_version = 1")
        conn.execute("INSERT INTO events VALUES (3, 'a', 0.0, NULL, x'7b7d')")  # as schema-1 code appends
        conn.execute("UPDATE topics SET count = count + 1 WHERE topic = 'a'")
        conn.execute("UPDATE counters SET value = 3 WHERE name = 'last_seq'")
    finally:
        conn.close()
    with spool_store(tmp_path) as s:
        assert s.topics() == s.appended() == {"a": 3}  # recounted from what is stored
        assert s.append_sync(records("a", 1)) == [4] and s.appended() == {"a": 4}


# -- lazy cursor moves ------------------------------------------------------------------------------------


def test_the_gateways_store_trims_spools_and_holds_lazy_cursor_moves(tmp_path: Path) -> None:
    config = gateway_config(tmp_path)
    store = open_store(config)
    try:
        assert store.retention.trim_consumed == (RULE,) and store.cursor_delay == CURSOR_DELAY_SECONDS > 0
        # What `umcef dlq list/replay` read is never trimmed by the rule (local topics cannot start with `_`).
        assert store.retention.consumer_of(DEAD_LETTER_TOPIC) is None
        assert store.retention.consumer_of(REPLAYED_TOPIC) is None
        assert store.retention.consumer_of(spool_topic("eu")) == CURSOR_GROUP
    finally:
        store.close()
    child = open_store(config, retain=False)  # the delivery process: the gateway trims for it
    try:
        assert child.retention.trim_consumed == ()
    finally:
        child.close()


async def test_awaited_cursor_commits_are_never_held(tmp_path: Path) -> None:
    # A delay no test could wait out: only lazy moves may be held by it.
    store = LocalStore(tmp_path, sync="normal", cursor_delay=3600)
    try:
        await asyncio.wait_for(store.commit_cursor_async("c", "t", 1), 30)
        await asyncio.wait_for(asyncio.to_thread(store.commit_cursor, "c", "t", 2), 30)
        assert store.cursor("c", "t") == 2 and store.commit_count == 2
        commits = store.commit_count
        lazy = store.commit_cursor_later("c", "t", 3)
        await store.append(records("t", 1))
        lazy.result(timeout=5)
        assert store.commit_count == commits + 1 and store.cursor("c", "t") == 3
    finally:
        store.close()


def test_a_held_cursor_move_does_not_hold_back_trimming_or_retention(tmp_path: Path) -> None:
    retention = Retention(None, 1, (RULE,))
    with LocalStore(tmp_path, sync="normal", retention=retention, retention_interval=0.05, trim_interval=0.05,
                    cursor_delay=3600) as s:
        s.append_sync(records("orders", 3))
        delivered = s.append_sync(records("_spool.a", 2))
        s.commit_cursor(CURSOR_GROUP, "_spool.a", delivered[0])
        held = s.commit_cursor_later("other", "t", 9)  # nothing else comes: held for an hour
        deadline = time.monotonic() + 30
        while s.topics() != {"orders": 1, "_spool.a": 1}:
            assert time.monotonic() < deadline, f"the writer waited for the held move: {s.topics()}"
            time.sleep(0.02)
        assert not held.done() and s.cursor("other", "t") == 0


# -- the gateway ------------------------------------------------------------------------------------------


def batch(start: int, n: int) -> bytes:
    return orjson.dumps([{"specversion": "1.0", "id": f"e{i}", "source": "/trim", "type": "t"}
                         for i in range(start, start + n)])


async def post(client: httpx.AsyncClient, gateway: Gateway, body: bytes) -> None:
    response = await client.post(http_url(gateway) + "/v1/events", content=body,
                                 headers={"content-type": "application/cloudevents-batch+json"})
    assert response.status_code == 202, response.text


@MODES
async def test_the_gateway_trims_what_was_delivered_and_keeps_what_waits(
        make_gateway: GatewayFactory, kafka_broker: KafkaBroker, process: bool) -> None:
    topic = unique_name("trim")
    await create_topic(kafka_broker.bootstrap, topic, partitions=1)
    gateway = await make_gateway(
        destinations={"up": f"kafka://{kafka_broker.bootstrap}/{topic}",
                      "down": {"url": f"kafka://127.0.0.1:{closed_port()}/t", "options": UNREACHABLE_OPTIONS}},
        routes=[{"name": "both", "to": ["up", "down"]}],  # mode all: every event in both spools
        router={"estimator": {"eject_after_failures": 1000}}, delivery={"process": process})
    letter = Event({"specversion": "1.0", "id": "dead-1", "source": "/trim", "type": "t"})
    await gateway.dead_letters.put(letter, "Rejected: no", destination="up", attempts=1)
    async with httpx.AsyncClient(timeout=30) as client:
        for start in range(0, 60, 20):
            await post(client, gateway, batch(start, 20))
    store = gateway.store
    await eventually(lambda: gateway._lane_drained("up") == 60 and spool_topic("up") not in store.topics(), 30,
                     "the 60 events delivered to `up` and trimmed from its spool")
    assert store.appended()[spool_topic("up")] == 60
    # `down` never acknowledged anything: its spool keeps every record, its cursor never moved.
    assert store.topics()[spool_topic("down")] == 60 and store.cursor(CURSOR_GROUP, spool_topic("down")) == 0
    assert [d.id for d in pending(store)] == ["dead-1"]  # what `umcef dlq list` reads


async def test_delivery_cursor_moves_ride_on_the_next_append_commit(make_gateway: GatewayFactory,
                                                                   kafka_broker: KafkaBroker) -> None:
    topic = unique_name("trim-cursor")
    await create_topic(kafka_broker.bootstrap, topic, partitions=1)
    gateway = await make_gateway(destinations={"k": f"kafka://{kafka_broker.bootstrap}/{topic}"}, default="k")
    store, n = gateway.store, 100
    store.cursor_delay = 5.0  # not 0.1 s: on a loaded machine no move may commit alone before the next append
    commits = store.commit_count
    async with httpx.AsyncClient(timeout=30) as client:
        for i in range(n):  # one event per request, one after the other: one append commit each
            await post(client, gateway, batch(i, 1))
            # Polled often: the next append must come well within the cursor delay of the move.
            await eventually(lambda i=i: gateway._lane_drained("k") > i, 30, f"event {i} delivered",  # type: ignore[misc]
                             poll=0.002)
    # Each delivery's cursor move waits for the next request's append and shares its commit; committed
    # alone, it would take one transaction (and fsync) per event.
    assert store.commit_count - commits <= n + 5, store.commit_count - commits
    await eventually(lambda: store.cursor(CURSOR_GROUP, spool_topic("k")) == store.appended()[spool_topic("k")], 30,
                     "the last cursor move committed on its own")


async def test_a_spool_whose_destination_is_gone_is_named_at_start(
        tmp_path: Path, make_gateway: GatewayFactory, caplog: pytest.LogCaptureFixture) -> None:
    # No retention deletes a spool's undelivered events, so one left by a removed destination must not wait
    # unseen: the gateway names it at start (and says nothing of a removed destination that had delivered all).
    with LocalStore(tmp_path / "gw0", sync="normal") as store:  # make_gateway's first data_dir
        store.append_sync(records(spool_topic("gone"), 3))
        done = store.append_sync(records(spool_topic("done"), 2))
        store.commit_cursor(CURSOR_GROUP, spool_topic("done"), done[-1])
    with caplog.at_level(logging.WARNING, logger="umcef.gateway"):
        await make_gateway()
    warnings = [r.getMessage() for r in caplog.records if r.name == "umcef.gateway"]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("_spool.gone holds 3 undelivered events (after seq 0) but no configured "
                                  "destination 'gone' delivers it")
