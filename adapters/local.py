"""Embedded durable event log: the default ``local://TOPIC`` destination.

One SQLite database in WAL mode per store directory. A single writer thread owns the write connection and
group-commits whatever callers have queued into one transaction, so N concurrent appends cost one fsync,
not N. Readers (this process or others) use their own connections and never block the writer.
Measurements and the reasons for SQLite over hand-rolled segments are in ``docs/local-store.md``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Final, Literal

__all__ = ["DB_FILENAME", "LocalStore", "Record", "Retention", "StoredEvent"]

log = logging.getLogger(__name__)

DB_FILENAME: Final = "events.db"
_SCHEMA_VERSION: Final = 1
_APPLICATION_ID: Final = 0x554D4345  # "UMCE": lets us refuse somebody else's SQLite file.
# Bounds one transaction so a flood of appends cannot make a single commit (and everyone's latency) huge.
_MAX_GROUP_RECORDS: Final = 10_000
# Retention deletes in chunks and serves queued appends between them: a first pass over a large backlog
# must not stall ingestion for seconds.
_RETENTION_CHUNK: Final = 5_000
_BUSY_TIMEOUT_S: Final = 10.0

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY,
    topic TEXT NOT NULL,
    stored_at REAL NOT NULL,
    key TEXT,
    payload BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS events_topic_seq ON events (topic, seq);
CREATE INDEX IF NOT EXISTS events_stored_at ON events (stored_at);
CREATE TABLE IF NOT EXISTS topics (topic TEXT PRIMARY KEY, count INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    consumer TEXT NOT NULL,
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO counters (name, value) VALUES ('last_seq', 0);
"""

# SQLite primary result codes that mean "the OS said no" rather than "this file is not ours".
_OS_ERROR_CODES: Final = frozenset({3, 8, 10, 13, 14, 23})  # PERM, READONLY, IOERR, FULL, CANTOPEN, AUTH


@dataclass(frozen=True, slots=True)
class Record:
    """One thing to append."""

    topic: str
    payload: bytes  # the event in structured JSON (opaque to the store)
    key: str | None = None  # partition key / event id, stored for inspection


@dataclass(frozen=True, slots=True)
class StoredEvent:
    topic: str
    seq: int  # monotonically increasing per store, > 0, never reused (retention included)
    stored_at: float  # unix seconds
    key: str | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class Retention:
    max_age_seconds: float | None = 7 * 24 * 3600
    max_events_per_topic: int | None = None


@dataclass(slots=True)
class _Append:
    rows: list[tuple[str, str | None, bytes]]
    future: concurrent.futures.Future[list[int]]


@dataclass(slots=True)
class _Cursor:
    consumer: str
    topic: str
    seq: int
    future: concurrent.futures.Future[None]


@dataclass(slots=True)
class _Retain:
    now: float | None
    future: concurrent.futures.Future[int]


class _Stop:
    pass


_STOP: Final = _Stop()
_Op = _Append | _Cursor | _Retain | _Stop


def _open_error(db: Path, exc: sqlite3.Error) -> Exception:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in _OS_ERROR_CODES:
        return OSError(errno.EIO, f"cannot open local store: {exc}", str(db))
    return ValueError(f"{db}: not a usable UMCEF local store: {exc}")


class LocalStore:
    """Durable, append-only, multi-topic event log in ``<path>/events.db``.

    ``sync="full"`` fsyncs the WAL on every group commit (survives power loss); ``"normal"`` skips that fsync
    (survives a crash of this process, not of the machine). ``read_only=True`` opens an existing store
    without a writer thread, for inspecting a store another process is writing.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: Literal["full", "normal"] = "full",
        retention: Retention = Retention(),  # frozen, so one shared default is safe
        retention_interval: float = 60.0,
        read_only: bool = False,
    ) -> None:
        if sync not in ("full", "normal"):
            raise ValueError(f"sync must be 'full' or 'normal', not {sync!r}")
        self.path = Path(path)
        self.db_path = self.path / DB_FILENAME
        self.sync = sync
        self.retention = retention
        self.read_only = read_only
        self._retention_interval = retention_interval
        self._lock = threading.Lock()  # guards _closed, _waiters
        self._closed = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._deferred: list[_Op] = []
        self._commits = 0
        self._writer: threading.Thread | None = None

        if read_only:
            if not self.db_path.is_file():
                raise FileNotFoundError(errno.ENOENT, "no local store here", str(self.db_path))
        else:
            if self.path.exists() and not self.path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "local store path is not a directory", str(self.path))
            self.path.mkdir(parents=True, exist_ok=True)
            self._wconn = self._connect(read_only=False)
        try:
            self._rconn = self._connect(read_only=True)
        except BaseException:
            if not read_only:
                self._wconn.close()
            raise
        self._rlock = threading.Lock()  # sqlite3 connections are not safe to use from two threads at once
        if not read_only:
            self._writer = threading.Thread(
                target=self._writer_main, name=f"umcef-local:{self.path}", daemon=True
            )
            self._writer.start()

    # -- opening ---------------------------------------------------------------------------------------------

    def _connect(self, *, read_only: bool) -> sqlite3.Connection:
        db = self.db_path.resolve()
        mode = "ro" if read_only else "rwc"
        try:
            conn = sqlite3.connect(
                f"{db.as_uri()}?mode={mode}",
                uri=True,
                isolation_level=None,  # we issue BEGIN IMMEDIATE / COMMIT ourselves
                check_same_thread=False,  # opened here, used by the writer thread or under _rlock
                timeout=_BUSY_TIMEOUT_S,
            )
        except sqlite3.Error as exc:
            raise _open_error(db, exc) from exc
        try:
            if read_only:
                self._check_header(conn, db)
                conn.execute("PRAGMA query_only = ON")
            else:
                self._prepare(conn, db)
        except sqlite3.Error as exc:
            conn.close()
            raise _open_error(db, exc) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    def _check_header(self, conn: sqlite3.Connection, db: Path) -> int:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if app_id not in (0, _APPLICATION_ID):
            raise ValueError(f"{db}: SQLite file of another application (application_id={app_id:#x})")
        if version > _SCHEMA_VERSION:
            raise ValueError(f"{db}: store schema v{version} is newer than this code (v{_SCHEMA_VERSION})")
        if app_id == 0 and version == 0:
            if self.read_only:
                raise ValueError(f"{db}: not initialised as a UMCEF local store")
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise ValueError(f"{db}: SQLite file of another application (it has tables, none ours)")
        return int(version)

    def _prepare(self, conn: sqlite3.Connection, db: Path) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise OSError(errno.EINVAL, f"filesystem does not support SQLite WAL (got {mode})", str(db))
        conn.execute(f"PRAGMA synchronous = {self.sync.upper()}")
        if sys.platform == "darwin" and self.sync == "full":
            # macOS fsync() does not flush the drive cache; F_FULLFSYNC does.
            conn.execute("PRAGMA fullfsync = ON")
            conn.execute("PRAGMA checkpoint_fullfsync = ON")
        # Checkpointing would otherwise leave the WAL at its high-water mark forever.
        conn.execute("PRAGMA journal_size_limit = 67108864")
        # Check and create under the write lock: two processes opening a new store at once must not see
        # each other's half-made schema.
        conn.execute("BEGIN IMMEDIATE")
        try:
            if self._check_header(conn, db) == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # -- writing ---------------------------------------------------------------------------------------------

    def _submit(self, op: _Append | _Cursor | _Retain) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError(f"local store {self.path} is closed")
            if self._writer is None:
                raise PermissionError(errno.EROFS, "local store opened read-only", str(self.path))
            self._queue.put(op)

    @staticmethod
    def _rows(records: Sequence[Record]) -> list[tuple[str, str | None, bytes]]:
        # Validated here, in the caller, so one bad record fails its own call instead of a whole group commit.
        rows: list[tuple[str, str | None, bytes]] = []
        for i, r in enumerate(records):
            if not isinstance(r.topic, str) or not r.topic:
                raise ValueError(f"record[{i}]: topic must be a non-empty string, got {r.topic!r}")
            if r.key is not None and not isinstance(r.key, str):
                raise TypeError(f"record[{i}]: key must be str or None, got {type(r.key).__name__}")
            payload = r.payload
            if not isinstance(payload, bytes):
                if not isinstance(payload, bytearray | memoryview):
                    raise TypeError(f"record[{i}]: payload must be bytes, got {type(payload).__name__}")
                payload = bytes(payload)
            rows.append((r.topic, r.key, payload))
        return rows

    def _append_future(self, records: Sequence[Record]) -> concurrent.futures.Future[list[int]]:
        future: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        self._submit(_Append(self._rows(records), future))
        return future

    async def append(self, records: Sequence[Record]) -> list[int]:
        """Seq of each record, returned only once the records are committed (and fsynced if sync="full")."""
        if not records:
            return []
        return await asyncio.wrap_future(self._append_future(records))

    def append_sync(self, records: Sequence[Record]) -> list[int]:
        if not records:
            return []
        return self._append_future(records).result()

    def commit_cursor(self, consumer: str, topic: str, seq: int) -> None:
        """Durably sets the consumer's position (it may move backwards: that is how a replay is asked for)."""
        self._cursor_future(consumer, topic, seq).result()

    async def commit_cursor_async(self, consumer: str, topic: str, seq: int) -> None:
        await asyncio.wrap_future(self._cursor_future(consumer, topic, seq))

    def _cursor_future(self, consumer: str, topic: str, seq: int) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(_Cursor(consumer, topic, int(seq), future))
        return future

    def apply_retention(self, now: float | None = None) -> int:
        """Deletes what the retention policy has expired; returns how many events went."""
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._submit(_Retain(now, future))
        return future.result()

    @property
    def commit_count(self) -> int:
        """Group commits (write transactions) so far; appends / commit_count is the mean group size."""
        return self._commits

    # -- writer thread ---------------------------------------------------------------------------------------

    def _writer_main(self) -> None:
        # A pass at start-up catches up on whatever expired while we were down.
        next_retention = time.monotonic()
        try:
            while True:
                ops = self._take(max(0.0, next_retention - time.monotonic()))
                if not ops:
                    try:
                        self._retain(None)
                    except Exception:
                        log.exception("retention pass failed on %s", self.db_path)
                    next_retention = time.monotonic() + self._retention_interval
                    continue
                self._commit_writes(ops)
                for op in ops:
                    if isinstance(op, _Retain) and op.future.set_running_or_notify_cancel():
                        try:
                            op.future.set_result(self._retain(op.now))
                        except Exception as exc:
                            op.future.set_exception(exc)
                if ops[-1] is _STOP:  # close() guarantees nothing is queued after the stop
                    return
        except BaseException as exc:
            log.exception("writer thread of %s died", self.db_path)
            self._fail_pending(exc)
            raise
        finally:
            self._wconn.close()

    def _take(self, timeout: float) -> list[_Op]:
        ops, self._deferred = self._deferred, []
        if not ops:
            try:
                ops.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return []
        self._drain(ops)
        return ops

    def _drain(self, ops: list[_Op]) -> None:
        n = sum(len(op.rows) for op in ops if isinstance(op, _Append))
        while n < _MAX_GROUP_RECORDS:
            try:
                op = self._queue.get_nowait()
            except queue.Empty:
                return
            ops.append(op)
            if isinstance(op, _Append):
                n += len(op.rows)

    def _fail_pending(self, exc: BaseException) -> None:
        with self._lock:
            self._closed = True
        pending = self._deferred
        with contextlib.suppress(queue.Empty):
            while True:
                pending.append(self._queue.get_nowait())
        for op in pending:
            if not isinstance(op, _Stop) and op.future.set_running_or_notify_cancel():
                op.future.set_exception(RuntimeError(f"local store writer failed: {exc!r}"))

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        conn = self._wconn
        # IMMEDIATE takes the write lock up front, so last_seq cannot change under us (other processes too).
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _commit_writes(self, ops: list[_Op]) -> None:
        appends: list[_Append] = []
        cursors: list[_Cursor] = []
        for op in ops:
            # A caller cancelled before we got here: its records are not written (it never got a 202).
            if isinstance(op, _Append) and op.future.set_running_or_notify_cancel():
                appends.append(op)
            elif isinstance(op, _Cursor) and op.future.set_running_or_notify_cancel():
                cursors.append(op)
        if not appends and not cursors:
            return
        results: list[list[int]] = []
        try:
            with self._transaction() as conn:
                last: int = conn.execute("SELECT value FROM counters WHERE name = 'last_seq'").fetchone()[0]
                now = time.time()
                rows: list[tuple[int, str, float, str | None, bytes]] = []
                per_topic: Counter[str] = Counter()
                for a in appends:
                    first = last + 1
                    last += len(a.rows)
                    results.append(list(range(first, last + 1)))
                    new = range(first, last + 1)
                    rows.extend((s, t, now, k, p) for s, (t, k, p) in zip(new, a.rows, strict=True))
                    per_topic.update(t for t, _, _ in a.rows)
                conn.executemany(
                    "INSERT INTO events (seq, topic, stored_at, key, payload) VALUES (?, ?, ?, ?, ?)", rows
                )
                conn.executemany(
                    "INSERT INTO topics (topic, count) VALUES (?, ?) "
                    "ON CONFLICT (topic) DO UPDATE SET count = count + excluded.count",
                    per_topic.items(),
                )
                conn.execute("UPDATE counters SET value = ? WHERE name = 'last_seq'", (last,))
                conn.executemany(
                    "INSERT INTO cursors (consumer, topic, seq) VALUES (?, ?, ?) "
                    "ON CONFLICT (consumer, topic) DO UPDATE SET seq = excluded.seq",
                    [(c.consumer, c.topic, c.seq) for c in cursors],
                )
        except Exception as exc:
            failed: list[_Append | _Cursor] = [*appends, *cursors]
            for op in failed:
                op.future.set_exception(exc)
            return
        self._commits += 1
        for a, seqs in zip(appends, results, strict=True):
            a.future.set_result(seqs)
        for c in cursors:
            c.future.set_result(None)
        if appends:
            self._notify()

    def _serve_writes(self) -> None:
        """Between retention chunks: commit queued appends now, keep anything else for the main loop."""
        ops: list[_Op] = []
        self._drain(ops)
        self._commit_writes(ops)
        self._deferred.extend(op for op in ops if isinstance(op, _Retain | _Stop))

    def _retain(self, now: float | None) -> int:
        now = time.time() if now is None else now
        max_age, max_events = self.retention.max_age_seconds, self.retention.max_events_per_topic
        total = 0
        if max_age is not None:
            while True:
                n = self._delete_chunk("stored_at < ?", "stored_at", (now - max_age,), _RETENTION_CHUNK)
                total += n
                if n < _RETENTION_CHUNK:
                    break
                self._serve_writes()
        if max_events is not None:
            over = self._wconn.execute("SELECT topic FROM topics WHERE count > ?", (max_events,)).fetchall()
            for (topic,) in over:
                while n := self._trim_topic(topic, max_events):
                    total += n
                    self._serve_writes()
        return total

    def _delete_chunk(self, where: str, order: str, params: tuple[object, ...], limit: int) -> int:
        with self._transaction() as conn:
            return self._delete(conn, where, order, params, limit)

    def _trim_topic(self, topic: str, keep: int) -> int:
        with self._transaction() as conn:
            # Re-read inside the transaction: another process may have trimmed since we listed the topics.
            row = conn.execute("SELECT count FROM topics WHERE topic = ?", (topic,)).fetchone()
            excess = 0 if row is None else row[0] - keep
            if excess <= 0:
                return 0
            return self._delete(conn, "topic = ?", "seq", (topic,), min(excess, _RETENTION_CHUNK))

    @staticmethod
    def _delete(
        conn: sqlite3.Connection, where: str, order: str, params: tuple[object, ...], limit: int
    ) -> int:
        # `order` must match an index (stored_at, or seq within the topic index): ordering by seq alone
        # would make the age check scan the whole table when nothing has expired.
        gone = Counter(
            t
            for (t,) in conn.execute(
                "DELETE FROM events WHERE seq IN "
                f"(SELECT seq FROM events WHERE {where} ORDER BY {order} LIMIT ?) RETURNING topic",
                (*params, limit),
            ).fetchall()
        )
        conn.executemany(
            "UPDATE topics SET count = count - ? WHERE topic = ?", [(n, t) for t, n in gone.items()]
        )
        conn.execute("DELETE FROM topics WHERE count <= 0")
        return gone.total()

    def _notify(self) -> None:
        with self._lock:
            waiters = list(self._waiters)
        for loop, event in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed; its follower is gone
                loop.call_soon_threadsafe(event.set)

    # -- reading ---------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reader(self) -> Iterator[sqlite3.Connection]:
        with self._rlock:
            if self._closed:
                raise RuntimeError(f"local store {self.path} is closed")
            yield self._rconn

    def read(self, topic: str | None, after: int = 0, limit: int = 1000) -> list[StoredEvent]:
        """Events with seq > after, ascending; topic None means all topics."""
        if limit <= 0:  # SQLite reads a negative LIMIT as "no limit"
            return []
        with self._reader() as conn:
            if topic is None:
                rows = conn.execute(
                    "SELECT topic, seq, stored_at, key, payload FROM events "
                    "WHERE seq > ? ORDER BY seq LIMIT ?",
                    (after, limit),
                ).fetchall()
            else:
                rows = conn.execute(
                    "SELECT topic, seq, stored_at, key, payload FROM events "
                    "WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
                    (topic, after, limit),
                ).fetchall()
        return [StoredEvent(*row) for row in rows]

    def last_seq(self, topic: str | None = None) -> int:
        """Highest seq currently stored (in that topic), 0 if none: where a "from now on" follower starts."""
        with self._reader() as conn:
            if topic is None:
                row = conn.execute("SELECT max(seq) FROM events").fetchone()
            else:
                row = conn.execute("SELECT max(seq) FROM events WHERE topic = ?", (topic,)).fetchone()
        return int(row[0] or 0)

    def topics(self) -> dict[str, int]:
        """Topic -> number of stored events (topics emptied by retention are absent)."""
        with self._reader() as conn:
            return dict(conn.execute("SELECT topic, count FROM topics ORDER BY topic").fetchall())

    def cursor(self, consumer: str, topic: str) -> int:
        """Last committed seq of this consumer on this topic, 0 if none."""
        with self._reader() as conn:
            row = conn.execute(
                "SELECT seq FROM cursors WHERE consumer = ? AND topic = ?", (consumer, topic)
            ).fetchone()
        return 0 if row is None else int(row[0])

    async def follow(
        self, topic: str | None, after: int = 0, poll_interval: float = 0.1, *, batch: int = 1000
    ) -> AsyncGenerator[StoredEvent, None]:
        """Yields events with seq > after as they arrive; ends when the store is closed.

        An AsyncIterator[StoredEvent]; typed as a generator so callers can ``aclose()`` it deterministically.
        """
        async for events in self.follow_batches(topic, after, poll_interval, batch=batch):
            for event in events:
                yield event

    async def follow_batches(
        self, topic: str | None, after: int = 0, poll_interval: float = 0.1, *, batch: int = 1000
    ) -> AsyncGenerator[list[StoredEvent], None]:
        """Like `follow`, a page (at most `batch` events) at a time: what delivery workers want.

        Appends through this LocalStore wake followers at once; appends by other processes are seen by
        polling every ``poll_interval`` seconds.
        """
        wake = asyncio.Event()
        waiter = (asyncio.get_running_loop(), wake)
        with self._lock:
            self._waiters.add(waiter)
        try:
            while not self._closed:
                wake.clear()  # before reading: an append that lands after the read will set it again
                try:
                    events = self.read(topic, after, batch)
                except RuntimeError:
                    if self._closed:
                        return
                    raise
                if events:
                    after = events[-1].seq
                    yield events
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(wake.wait(), poll_interval)
        finally:
            with self._lock:
                self._waiters.discard(waiter)

    # -- lifecycle -------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Commits everything already queued, stops the writer and closes the files. Idempotent."""
        with self._lock:
            if self._closed:
                writer = None
            else:
                self._closed = True
                writer = self._writer
                if writer is not None:
                    self._queue.put(_STOP)
        if writer is not None:
            writer.join()
        with self._rlock:
            self._rconn.close()  # closing a closed sqlite3 connection is a no-op
        self._notify()  # followers see _closed and end

    def __enter__(self) -> LocalStore:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"LocalStore({str(self.path)!r}, sync={self.sync!r}, read_only={self.read_only})"
