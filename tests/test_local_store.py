"""The embedded event log behind ``local://TOPIC``: durability, group commit, retention, readers."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import umcef.adapters.local as local
from tests.brokers import eventually, eventually_sync
from umcef.adapters.local import CursorMove, CursorMoved, LocalStore, Record, Retention, StoredEvent, SyncPolicy


@pytest.fixture
def store(tmp_path: Path) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "store")
    yield s
    s.close()


def records(topic: str, n: int, prefix: str = "e") -> list[Record]:
    return [Record(topic, f'{{"id":"{prefix}{i}"}}'.encode(), key=f"{prefix}{i}") for i in range(n)]


# -- append and read -------------------------------------------------------------------------------------


def test_append_returns_increasing_seqs_and_read_returns_what_was_written(store: LocalStore) -> None:
    first = store.append_sync(records("orders", 3))
    second = store.append_sync([Record("audit", b"{}", key=None), *records("orders", 2, "x")])
    assert first == [1, 2, 3]
    assert second == [4, 5, 6]

    everything = store.read(None)
    assert [e.seq for e in everything] == [1, 2, 3, 4, 5, 6]
    assert everything[0] == StoredEvent("orders", 1, everything[0].stored_at, "e0", b'{"id":"e0"}')
    assert everything[3].topic == "audit" and everything[3].key is None
    assert abs(everything[0].stored_at - time.time()) < 60

    assert [e.seq for e in store.read("orders")] == [1, 2, 3, 5, 6]
    assert [e.seq for e in store.read("orders", after=3)] == [5, 6]
    assert [e.seq for e in store.read(None, after=1, limit=2)] == [2, 3]
    assert store.read("nope") == []
    assert store.topics() == {"audit": 1, "orders": 5}
    orders = [(e.seq, e.stored_at, e.payload) for e in store.read("orders")]
    assert store.read_payloads("orders") == orders
    assert store.read_payloads("orders", after=2, limit=2) == orders[2:4]
    assert store.read_payloads("orders", limit=0) == [] and store.read_payloads("nope") == []


@pytest.mark.parametrize("n", [1, 2, 300, 511, 512, 513, 1500])
def test_appends_of_any_size_keep_their_order_and_seqs(store: LocalStore, n: int) -> None:
    # A commit's rows go out as a few multi-row INSERTs (powers of two up to 512): every size must come
    # back whole, in order, under the seqs the append returned.
    store.append_sync(records("warm", 5))
    seqs = store.append_sync(records("orders", n))
    assert seqs == list(range(6, 6 + n))
    back = store.read("orders", limit=n + 1)
    assert [(e.seq, e.key, e.payload) for e in back] == [
        (seq, f"e{i}", f'{{"id":"e{i}"}}'.encode()) for i, seq in enumerate(seqs)]
    assert store.topics() == {"warm": 5, "orders": n}


def test_last_seq(store: LocalStore) -> None:
    assert store.last_seq() == store.last_seq("a") == 0
    store.append_sync(records("a", 2) + records("b", 1))
    assert (store.last_seq(), store.last_seq("a"), store.last_seq("b"), store.last_seq("c")) == (3, 2, 3, 0)


def test_empty_append_is_a_no_op(store: LocalStore) -> None:
    assert store.append_sync([]) == []
    assert store.commit_count == 0


def test_bad_records_fail_their_own_call_only(store: LocalStore) -> None:
    with pytest.raises(ValueError, match="topic"):
        store.append_sync([Record("", b"x")])
    with pytest.raises(TypeError, match="payload"):
        store.append_sync([Record("t", "not bytes")])  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="key"):
        store.append_sync([Record("t", b"x", key=7)])  # type: ignore[arg-type]
    assert store.append_sync([Record("t", bytearray(b"ok"))]) == [1]  # type: ignore[arg-type]
    assert store.read("t")[0].payload == b"ok"


def test_records_survive_close_and_reopen(tmp_path: Path) -> None:
    with LocalStore(tmp_path) as s:
        seqs = s.append_sync(records("t", 10))
    with LocalStore(tmp_path) as s:
        assert [e.seq for e in s.read("t")] == seqs
        assert s.append_sync(records("t", 1)) == [11]


async def test_concurrent_async_appends_get_distinct_seqs(store: LocalStore) -> None:
    calls = [store.append(records(f"t{i % 3}", 1 + i % 4, f"c{i}-")) for i in range(40)]
    results = await asyncio.gather(*calls)
    flat = [s for seqs in results for s in seqs]
    assert len(flat) == len(set(flat)) == sum(1 + i % 4 for i in range(40))
    for i, seqs in enumerate(results):
        assert seqs == list(range(seqs[0], seqs[0] + 1 + i % 4))  # a call's records are contiguous
        assert [e.key for e in store.read(f"t{i % 3}", seqs[0] - 1, len(seqs))] == [
            f"c{i}-{j}" for j in range(len(seqs))
        ]


async def test_concurrent_appends_are_group_committed(store: LocalStore) -> None:
    # Hold SQLite's write lock from outside so the writer cannot commit while the callers queue up: with
    # group commit the 50 calls then need at most 2 transactions (the one already picked up and the rest).
    blocker = sqlite3.connect(store.db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        before = store.commit_count
        tasks = [asyncio.create_task(store.append(records("t", 2, f"g{i}-"))) for i in range(50)]
        await asyncio.sleep(0)  # one loop turn: every task has queued its records and is awaiting
        assert not any(t.done() for t in tasks)
        blocker.execute("COMMIT")
    finally:
        blocker.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    assert len({s for seqs in results for s in seqs}) == 100
    assert store.commit_count - before <= 2


def test_appends_from_many_threads(store: LocalStore) -> None:
    out: list[list[int]] = []
    lock = threading.Lock()

    def work(n: int) -> None:
        for i in range(25):
            seqs = store.append_sync(records("t", 2, f"{n}-{i}-"))
            with lock:
                out.append(seqs)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    flat = sorted(s for seqs in out for s in seqs)
    assert flat == list(range(1, 401))
    assert store.topics() == {"t": 400}


def test_two_writers_on_one_store_never_share_a_seq(tmp_path: Path) -> None:
    # Two LocalStore instances have two writer connections, just like two processes would.
    with LocalStore(tmp_path) as one, LocalStore(tmp_path) as two:
        out: list[int] = []

        def work(s: LocalStore, tag: str) -> None:
            for i in range(40):
                out.extend(s.append_sync(records("t", 3, f"{tag}{i}-")))

        threads = [threading.Thread(target=work, args=(s, tag)) for s, tag in ((one, "a"), (two, "b"))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(out) == list(range(1, 241))
        assert [e.seq for e in one.read(None, limit=1000)] == list(range(1, 241))
        assert one.topics() == two.topics() == {"t": 240}
        assert one.read(None, limit=0) == one.read(None, limit=-1) == []


# -- durability across SIGKILL ---------------------------------------------------------------------------

_CHILD = textwrap.dedent(
    """
    import asyncio, sys
    from umcef.adapters.local import LocalStore, Record

    async def main() -> None:
        store = LocalStore(sys.argv[1], sync=sys.argv[2])

        async def worker(w: int) -> None:
            i = 0
            while True:
                batch = [Record(f"t{w % 3}", f"{w}:{i}:{j}".encode(), key=f"k{w}") for j in range(1 + i % 4)]
                seqs = await store.append(batch)
                # One write() per append: the parent reads whatever reached the pipe before the kill.
                lines = [f"{s} {r.topic} {r.payload.decode()}\\n" for s, r in zip(seqs, batch)]
                sys.stdout.write("".join(lines))
                sys.stdout.flush()
                i += 1

        await asyncio.gather(*(worker(w) for w in range(8)))

    asyncio.run(main())
    """
)


@pytest.mark.parametrize("sync", ["full", "normal", "interval"])
def test_sigkill_after_append_returned_loses_nothing(tmp_path: Path, sync: str) -> None:
    child = subprocess.Popen(
        [sys.executable, "-c", _CHILD, str(tmp_path), sync], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert child.stdout is not None
    printed: list[str] = []
    deadline = time.monotonic() + 60
    try:
        while len(printed) < 3000:  # well past the first checkpoint (~1000 pages) for the WAL's sake
            line = child.stdout.readline().decode()
            if not line:
                raise AssertionError(f"child died early: {child.wait()} {child.stderr.read()!r}")  # type: ignore[union-attr]
            printed.append(line)
            assert time.monotonic() < deadline, "child too slow"
        os.kill(child.pid, signal.SIGKILL)  # mid-stream: appends are in flight at this moment
        rest, _ = child.communicate(timeout=30)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    assert child.returncode == -signal.SIGKILL
    printed += rest.decode().splitlines(keepends=True)
    acknowledged: dict[int, tuple[str, bytes]] = {}
    for line in printed:
        if line.endswith("\n"):  # a torn last line was never fully acknowledged; ignore it
            seq, topic, payload = line.split()
            acknowledged[int(seq)] = (topic, payload.encode())

    with LocalStore(tmp_path) as s:
        stored: dict[int, tuple[str, bytes]] = {}
        after = 0
        while batch := s.read(None, after, 5000):
            stored.update((e.seq, (e.topic, e.payload)) for e in batch)
            after = batch[-1].seq
        missing = sorted(set(acknowledged) - set(stored))
        assert not missing, f"{len(missing)} acknowledged records lost, e.g. {missing[:5]}"
        assert all(stored[seq] == value for seq, value in acknowledged.items())
        assert sum(s.topics().values()) == len(stored)
        # The store stays usable and keeps counting where the dead process left off.
        assert s.append_sync(records("t0", 1))[0] > max(stored)


# -- retention -------------------------------------------------------------------------------------------


def test_retention_by_age(tmp_path: Path) -> None:
    with LocalStore(tmp_path, retention=Retention(max_age_seconds=3600)) as s:
        s.append_sync(records("a", 3))
        s.append_sync(records("b", 2))
        old = s.read(None)
        boundary = old[3].stored_at  # first event of the second commit
        assert old[2].stored_at < boundary
        assert s.apply_retention(now=boundary + 3600) == 3
        assert s.topics() == {"b": 2}
        assert [e.seq for e in s.read(None)] == [4, 5]
        assert s.apply_retention(now=boundary + 3600) == 0
        assert s.apply_retention(now=time.time() + 3601) == 2
        assert s.topics() == {}
        # Seqs are never reused, even when retention emptied the store.
        assert s.append_sync(records("a", 1)) == [6]


def test_retention_by_count_keeps_the_newest(tmp_path: Path) -> None:
    with LocalStore(tmp_path, retention=Retention(max_age_seconds=None, max_events_per_topic=2)) as s:
        s.append_sync(records("a", 5))
        s.append_sync(records("b", 1))
        assert s.apply_retention() == 3
        assert [e.seq for e in s.read("a")] == [4, 5]
        assert s.topics() == {"a": 2, "b": 1}


def test_retention_larger_than_one_chunk(tmp_path: Path) -> None:
    with LocalStore(tmp_path, retention=Retention(max_age_seconds=60, max_events_per_topic=1000)) as s:
        s.append_sync(records("a", 12_000))
        assert s.apply_retention(now=time.time()) == 11_000
        assert s.topics() == {"a": 1000}
        assert s.read("a", limit=1)[0].seq == 11_001
        assert s.apply_retention(now=time.time() + 120) == 1000
        assert s.topics() == {}


@pytest.mark.parametrize("retention", [Retention(max_age_seconds=60), Retention(None, max_events_per_topic=5)])
def test_a_close_during_a_long_retention_pass_waits_for_one_chunk_only(
        tmp_path: Path, retention: Retention, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_RETENTION_CHUNK", 10)
    s = LocalStore(tmp_path, retention=retention, retention_interval=3600)
    s.append_sync(records("a", 45))
    closer = threading.Thread(target=s.close)
    serve_writes = LocalStore._serve_writes

    def closed_meanwhile(self: LocalStore) -> None:  # between two chunks, close() is called
        if not closer.is_alive() and closer.ident is None:
            closer.start()
            eventually_sync(lambda: not self._queue.empty(), what="close() queued its stop")
        serve_writes(self)

    monkeypatch.setattr(LocalStore, "_serve_writes", closed_meanwhile)
    assert s.apply_retention(now=time.time() + 120) == 10  # one chunk, then the close goes first
    closer.join(10)
    assert not closer.is_alive()
    monkeypatch.setattr(LocalStore, "_serve_writes", serve_writes)
    with LocalStore(tmp_path, retention=retention) as reopened:  # a later pass does the rest
        reopened.apply_retention(now=time.time() + 120)
        assert reopened.count("a") == (0 if retention.max_age_seconds else 5)


def test_a_retention_request_taken_together_with_the_close_stops_after_one_chunk(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(local, "_RETENTION_CHUNK", 10)
    s = LocalStore(tmp_path, retention=Retention(max_age_seconds=60), retention_interval=3600)
    s.append_sync(records("a", 45))
    gate, held = threading.Event(), threading.Event()
    take = LocalStore._take

    def gated(self: LocalStore, timeout: float) -> list[local._Op]:
        if held.is_set() and not gate.is_set():
            gate.wait(10)  # the writer waits here while both requests are queued
        return take(self, timeout)

    monkeypatch.setattr(LocalStore, "_take", gated)
    held.set()
    s.commit_cursor("c", "t", 1)  # wakes the writer, which then holds at its next take
    result: list[int] = []
    request = threading.Thread(target=lambda: result.append(s.apply_retention(now=time.time() + 120)))
    request.start()
    eventually_sync(lambda: s._queue.qsize() == 1, what="the retention request queued")
    closer = threading.Thread(target=s.close)
    closer.start()
    eventually_sync(lambda: s._queue.qsize() == 2, what="the stop queued behind it")
    gate.set()  # one turn takes both
    request.join(10)
    closer.join(10)
    assert result == [10] and not closer.is_alive()


def test_retention_runs_periodically_in_the_writer(tmp_path: Path) -> None:
    retention = Retention(max_age_seconds=None, max_events_per_topic=1)
    with LocalStore(tmp_path, retention=retention, retention_interval=0.05) as s:
        s.append_sync(records("a", 3))
        eventually_sync(lambda: s.topics() == {"a": 1}, what="periodic retention")
        assert [e.seq for e in s.read("a")] == [3]


def test_default_retention_keeps_recent_events(store: LocalStore) -> None:
    store.append_sync(records("a", 3))
    assert store.apply_retention() == 0
    assert store.apply_retention(now=time.time() + 6 * 24 * 3600) == 0
    assert store.apply_retention(now=time.time() + 8 * 24 * 3600) == 3


# -- cursors ---------------------------------------------------------------------------------------------


def test_cursors_are_per_consumer_and_topic_and_durable(tmp_path: Path) -> None:
    with LocalStore(tmp_path) as s:
        assert s.cursor("c1", "a") == 0
        s.commit_cursor("c1", "a", 5)
        s.commit_cursor("c2", "a", 7)
        s.commit_cursor("c1", "b", 9)
        s.commit_cursor("c1", "a", 6)
        positions = [s.cursor(c, t) for c, t in [("c1", "a"), ("c2", "a"), ("c1", "b"), ("c2", "b")]]
        assert positions == [6, 7, 9, 0]
    with LocalStore(tmp_path) as s:
        assert s.cursor("c1", "a") == 6


def test_an_append_moves_cursors_in_its_own_transaction(tmp_path: Path) -> None:
    # Moving records between topics (umcef spool dead-letter): the copies and the cursor past the originals
    # commit together, so a crash leaves both or neither.
    with LocalStore(tmp_path, cursor_delay=5.0) as s:
        s.append_sync(records("src", 3))
        s.commit_cursor_later("c", "src", 3)  # held (cursor_delay) until an append shares its commit
        commits = s.commit_count
        seqs = s.append_sync(records("dst", 2), [("c", "src", 2), ("c", "other", 1)])
        assert s.commit_count == commits + 1  # the held move, the records and both moves: one transaction
        assert [e.seq for e in s.read("dst")] == seqs
        assert (s.cursor("c", "src"), s.cursor("c", "other")) == (2, 1)  # queued later: the append's move wins
        assert s.count("src") == 3 and s.count("src", after=2) == 1 and s.count("dst", after=seqs[0]) == 1
        assert s.append_sync([], [("c", "src", 3)]) == [] and s.cursor("c", "src") == 3
        with pytest.raises(TypeError, match="cursor move"):
            s.append_sync(records("dst", 1), [("c", "src", "4")])  # type: ignore[list-item]
        assert s.count("dst") == 2 and s.cursor("c", "src") == 3  # refused before anything was queued


@pytest.mark.parametrize("sync", ["full", "interval"])
def test_a_conditional_cursor_move_fails_its_append_alone_when_the_cursor_moved(tmp_path: Path, sync: str) -> None:
    with LocalStore(tmp_path, sync=sync) as s:  # type: ignore[arg-type]
        s.commit_cursor("c", "src", 5)
        with pytest.raises(CursorMoved, match="cursor of c on src is at 5, not 4"):
            s.append_sync(records("dst", 2), [CursorMove("c", "src", 9, expected=4)])
        assert s.count("dst") == 0 and s.cursor("c", "src") == 5
        assert s.append_sync(records("dst", 2), [CursorMove("c", "src", 9, expected=5)]) == [1, 2]
        assert s.cursor("c", "src") == 9


async def test_async_cursor_commit(store: LocalStore) -> None:
    await store.commit_cursor_async("c", "t", 3)
    assert store.cursor("c", "t") == 3


# -- follow ----------------------------------------------------------------------------------------------


async def test_follow_yields_backlog_then_wakes_on_local_append(store: LocalStore) -> None:
    store.append_sync(records("a", 2) + records("b", 1))
    # A poll interval far beyond the deadline below: only the local wake-up can deliver in time.
    follower = store.follow("a", after=0, poll_interval=60)
    assert [(await asyncio.wait_for(anext(follower), 5)).seq for _ in range(2)] == [1, 2]
    pending = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)
    assert not pending.done()
    await store.append(records("b", 1) + records("a", 1, "new"))
    event = await asyncio.wait_for(pending, 5)
    assert (event.topic, event.key, event.seq) == ("a", "new0", 5)
    await follower.aclose()


async def test_follow_all_topics_from_a_position(store: LocalStore) -> None:
    store.append_sync(records("a", 2) + records("b", 2))
    follower = store.follow(None, after=2, poll_interval=60)
    got = [await asyncio.wait_for(anext(follower), 5) for _ in range(2)]
    assert [(e.topic, e.seq) for e in got] == [("b", 3), ("b", 4)]
    await follower.aclose()


async def test_follow_sees_appends_by_another_writer_by_polling(tmp_path: Path) -> None:
    with LocalStore(tmp_path) as reader, LocalStore(tmp_path) as other:
        follower = reader.follow("a", poll_interval=0.05)
        pending = asyncio.ensure_future(anext(follower))
        await asyncio.sleep(0)
        other.append_sync(records("a", 1))
        assert (await asyncio.wait_for(pending, 5)).seq == 1
        await follower.aclose()


async def test_follow_ends_when_the_store_closes(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    follower = s.follow(None, poll_interval=60)
    pending = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)
    s.close()
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(pending, 5)


_READER = textwrap.dedent(
    """
    import asyncio, sys
    from umcef.adapters.local import LocalStore

    async def main() -> None:
        with LocalStore(sys.argv[1], read_only=True) as store:
            print("ready", flush=True)
            seen = 0
            async for event in store.follow("a", poll_interval=0.02):
                seen += 1
                if seen == int(sys.argv[2]):
                    print("done", event.seq, len(store.read(None, 0, 10_000)), flush=True)
                    return

    asyncio.run(main())
    """
)


def test_another_process_reads_while_we_write(tmp_path: Path) -> None:
    with LocalStore(tmp_path) as s:
        s.append_sync(records("b", 1))
        reader = subprocess.Popen(
            [sys.executable, "-c", _READER, str(tmp_path), "100"], stdout=subprocess.PIPE, text=True
        )
        try:
            assert reader.stdout is not None and reader.stdout.readline() == "ready\n"
            for i in range(20):
                s.append_sync(records("a", 5, f"r{i}-") + records("b", 1, f"r{i}-"))
            out, _ = reader.communicate(timeout=30)
        finally:
            if reader.poll() is None:
                reader.kill()
                reader.wait()
    assert reader.returncode == 0
    assert out.split() == ["done", "120", "121"]


# -- opening, closing, errors ----------------------------------------------------------------------------


def test_path_that_is_a_file_is_refused_with_its_name(tmp_path: Path) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        LocalStore(f)
    with pytest.raises(OSError) as info:
        LocalStore(f / "below")
    assert str(f) in str(info.value)


def test_garbage_database_is_refused_with_its_name(tmp_path: Path) -> None:
    (tmp_path / "events.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(ValueError, match=str(tmp_path)):
        LocalStore(tmp_path)


def test_someone_elses_sqlite_file_is_refused(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "events.db")
    conn.execute("CREATE TABLE x (y)")
    conn.commit()
    conn.close()
    with pytest.raises(ValueError, match="another application"):
        LocalStore(tmp_path)


def test_read_only(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"events\.db"):
        LocalStore(tmp_path / "missing", read_only=True)
    with LocalStore(tmp_path) as s:
        s.append_sync(records("a", 2))
        s.commit_cursor("c", "a", 1)
    with LocalStore(tmp_path, read_only=True) as ro:
        assert [e.seq for e in ro.read("a")] == [1, 2]
        assert ro.cursor("c", "a") == 1
        with pytest.raises(PermissionError):
            ro.append_sync(records("a", 1))


def test_bad_sync_mode(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="'full', 'normal' or 'interval'"):
        LocalStore(tmp_path, sync="off")  # type: ignore[arg-type]


async def test_close_flushes_queued_appends_and_is_idempotent(tmp_path: Path) -> None:
    s = LocalStore(tmp_path)
    tasks = [asyncio.create_task(s.append(records("a", 3, f"q{i}-"))) for i in range(20)]
    await asyncio.sleep(0)  # all 20 are queued
    s.close()
    s.close()
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert sorted(x for seqs in results for x in seqs) == list(range(1, 61))
    with pytest.raises(RuntimeError, match="closed"):
        s.append_sync(records("a", 1))
    with pytest.raises(RuntimeError, match="closed"):
        s.read(None)
    with LocalStore(tmp_path) as again:
        assert again.topics() == {"a": 60}


async def test_cursor_moves_alone_wait_for_company_and_an_append_ends_the_wait(tmp_path: Path) -> None:
    # A long delay: only the append can end the wait within the 10 s the test gives it.
    store = LocalStore(tmp_path / "s", sync="normal", cursor_delay=30.0)
    try:
        await store.append(records("t", 3))
        commits = store.commit_count
        moves = [store.commit_cursor_later("c", "t", seq) for seq in (1, 2, 3)]
        seqs = await asyncio.wait_for(store.append(records("u", 1)), 10)  # committed with the waiting moves
        for move in moves:
            move.result(timeout=5)
        assert store.commit_count == commits + 1, "three cursor moves and the append share one transaction"
        assert store.cursor("c", "t") == 3 and seqs == [4]
    finally:
        store.close()


def test_close_commits_cursor_moves_that_were_waiting(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s", sync="normal", cursor_delay=30.0)
    store.append_sync(records("t", 2))
    move = store.commit_cursor_later("c", "t", 2)
    store.close()
    move.result(timeout=5)
    with LocalStore(tmp_path / "s") as reopened:
        assert reopened.cursor("c", "t") == 2


async def test_hand_over_gives_relayed_records_to_the_topics_listener_alone(store: LocalStore) -> None:
    heard: list[tuple[str, list[int], bool]] = []
    store.listen("a", lambda committed, gap: heard.append(("a", [seq for seq, _, _ in committed], gap)))
    store.listen("b", lambda committed, gap: heard.append(("b", [seq for seq, _, _ in committed], gap)))
    store.hand_over("a", [(7, 1.0, Record("a", b"{}"))], False)
    store.hand_over("b", [], True)
    store.hand_over("c", [(8, 1.0, Record("c", b"{}"))], False)  # nobody listens: dropped
    assert heard == [("a", [7], False), ("b", [], True)]


@pytest.mark.parametrize("sync", ["normal", "interval"])
async def test_another_writers_appends_are_reported_by_the_next_commit_with_records(tmp_path: Path,
                                                                                  sync: SyncPolicy) -> None:
    # Not by a commit of cursor moves alone: that one leaves this store's last-written seq where it was.
    with LocalStore(tmp_path, sync=sync) as store, LocalStore(tmp_path, sync=sync) as other:
        heard: list[tuple[list[int], bool]] = []
        store.listen("t", lambda committed, gap: heard.append(([seq for seq, _, _ in committed], gap)))
        await other.append(records("t", 1))
        await store.commit_cursor_async("c", "t", 0)
        assert store.last_seq_written_here == 0
        await store.append(records("t", 1))
        await eventually(lambda: heard, what="the append's report")
        assert heard == [([2], True)]
        assert store.last_seq_written_here == 2
        await store.append(records("t", 1))
        await eventually(lambda: len(heard) == 2, what="the second append's report")
        assert heard == [([2], True), ([3], False)]
