"""Embedded durable event log: the default ``local://TOPIC`` destination.

One SQLite database in WAL mode per store directory. A single writer thread owns the write connection and
group-commits whatever callers have queued into one transaction, so N concurrent appends cost one fsync,
not N (``sync="interval"``: one fsync per interval, however many commits it covers). Readers (this
process or others) use their own connections and never block the writer.
Measurements and the reasons for SQLite over hand-rolled segments are in ``docs/local-store.md``.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import functools
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncGenerator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Final, Literal, NamedTuple

__all__ = ["DB_FILENAME", "Committed", "CursorMove", "CursorMoved", "LocalStore", "Record", "Retention",
           "StoreFileError", "StoredEvent", "SyncPolicy", "TrimConsumed"]

log = logging.getLogger(__name__)

DB_FILENAME: Final = "events.db"
_SCHEMA_VERSION: Final = 3
# The oldest code (by the schema version it writes) that can use a file of this schema, stored in the file
# (`counters`, 'compatible_from'): code opens a newer file when that row says it can. A migration leaves it
# alone only if older code may ignore what it adds (an index; a column or table nothing keeps up to date on
# writes); anything every writer must maintain (as schema 2's `appended` counter) raises it. The check runs
# at open: migrate with the older processes stopped. (Code of schema 1 predates the row.)
_COMPATIBLE_FROM: Final = 2
_APPLICATION_ID: Final = 0x554D4345  # "UMCE": lets us refuse somebody else's SQLite file.
# Bounds one transaction so a flood of appends cannot make a single commit (and everyone's latency) huge.
_MAX_GROUP_RECORDS: Final = 10_000
# Retention deletes in chunks and serves queued appends between them: a first pass over a large backlog
# must not stall ingestion for seconds.
_RETENTION_CHUNK: Final = 5_000
# Trimming consumed records runs every `trim_interval` (a second in the gateway) under load, not once a
# minute: smaller chunks, so an append waits behind at most ~4-5 ms of deleting (bench/store.py: ~4-4.5 us
# per record when the rows share pages with other topics). Each chunk is one commit (without an fsync of its
# own, as every deleting commit: see `_trim_consumed`): ten a second at 10,000 events/s.
_TRIM_CHUNK: Final = 1_000
_BUSY_TIMEOUT_S: Final = 10.0
# The most rows one INSERT statement takes (5 parameters each; SQLite allows 32,766 per statement). The
# sqlite3 module releases the GIL around every statement step and must win it back each time; while the
# event loop's thread is busy that wait lasts up to the switch interval. bench/store.py, a 300-record
# commit beside a busy thread (p50): one INSERT per row 244 ms, a few multi-row INSERTs 47 ms (18 ms at
# the gateway's 1 ms switch interval, umcef.fabric.runtime); ~3 ms alone.
_ROWS_PER_INSERT: Final = 512
_MAX_SEQ: Final = 2**63 - 1  # SQLite's largest integer: "no upper bound" for a seq range
# sync="interval": the longest fsync interval accepted (a second of unacknowledged appends is plenty).
MAX_FSYNC_INTERVAL: Final = 1.0

SyncPolicy = Literal["full", "normal", "interval"]
_SYNC_POLICIES: Final = ("full", "normal", "interval")

# Delivery attempts a record has had so far (kept only for records that failed at least once), so a retry limit
# holds across restarts; deleted with the records they count (trimming).
_ATTEMPTS_TABLE: Final = """CREATE TABLE IF NOT EXISTS attempts (
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (topic, seq)
) WITHOUT ROWID;"""
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
CREATE TABLE IF NOT EXISTS topics (
    topic TEXT PRIMARY KEY,
    count INTEGER NOT NULL,  -- records stored now
    appended INTEGER NOT NULL DEFAULT 0  -- records ever appended: never lowered (retention, trimming)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS cursors (
    consumer TEXT NOT NULL,
    topic TEXT NOT NULL,
    seq INTEGER NOT NULL,
    PRIMARY KEY (consumer, topic)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL) WITHOUT ROWID;
INSERT OR IGNORE INTO counters (name, value) VALUES ('last_seq', 0);
""" + _ATTEMPTS_TABLE
# Statements that bring a store file of schema version N (the key) to N + 1.
class _Migration(NamedTuple):
    """Brings a file from schema N to N + 1: the column it adds (table, column, definition), not added again
    when it exists (a file taken back to N by hand with `PRAGMA user_version` migrates forward again), then
    its statements."""

    adds: tuple[str, str, str] | None
    then: tuple[str, ...] = ()


_MIGRATIONS: Final[dict[int, _Migration]] = {
    # v2: a per-topic appended counter (backpressure counts other processes' appends with it). Counting
    # starts from the records stored: only differences of it are ever used (so a recount is harmless).
    1: _Migration(("topics", "appended", "INTEGER NOT NULL DEFAULT 0"), ("UPDATE topics SET appended = count",)),
    # v3: delivery attempts per record. Older code may ignore the table: it neither notes attempts nor deletes rows
    # when it trims, and seqs are never reused, so what it leaves is either never read again (trimmed records) or
    # read back as an undercount (compatible_from stays).
    2: _Migration(None, (_ATTEMPTS_TABLE,)),
}
_NOTE_ATTEMPTS: Final = ("INSERT INTO attempts (topic, seq, count) VALUES (?, ?, ?) "
                         "ON CONFLICT (topic, seq) DO UPDATE SET count = excluded.count")
# The commit's per-topic upsert: the stored count and the appended counter in the one statement it already ran.
_COUNT_APPENDS: Final = (
    "INSERT INTO topics (topic, count, appended) VALUES (?1, ?2, ?2) "
    "ON CONFLICT (topic) DO UPDATE SET count = count + excluded.count, appended = appended + excluded.count"
)
# The oldest records of one topic, up to a seq, as one range of the (topic, seq) index: the chunk's last seq
# is found in the index alone, then one DELETE takes the range. (A DELETE ... RETURNING per record, as age
# retention needs, builds a Python row per deleted record and takes the GIL back for each.)
_NTH_OLDEST: Final = "SELECT seq FROM events WHERE topic = ? AND seq <= ? ORDER BY seq LIMIT 1 OFFSET ?"
_DELETE_UP_TO: Final = "DELETE FROM events WHERE topic = ? AND seq <= ?"
# Which cursors of a consumer have anything at or below them to trim: one index probe per cursor, outside
# any write transaction, so an idle pass takes no write lock and writes nothing.
_TRIMMABLE_SQL: Final = (
    "SELECT c.topic FROM cursors c WHERE c.consumer = ? "
    "AND EXISTS (SELECT 1 FROM events e WHERE e.topic = c.topic AND e.seq <= c.seq)"
)


def _delete_sql(where: str) -> str:
    """Deletes up to `LIMIT ?` records matching `where`, oldest stored first, and returns their topics (age
    retention: records of any topic). Ordered by the stored_at index: ordering by seq would make the age check
    scan the whole table when nothing has expired."""
    return (f"DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE {where} ORDER BY stored_at LIMIT ?) "
            "RETURNING topic")


def _has_column(conn: sqlite3.Connection, table: str, column: str) -> bool:
    return any(row[1] == column for row in conn.execute(f"PRAGMA table_info({table})"))


@functools.lru_cache(maxsize=16)
def _insert_sql(rows: int) -> str:
    return "INSERT INTO events (seq, topic, stored_at, key, payload) VALUES " + ",".join(["(?, ?, ?, ?, ?)"] * rows)


def _insert_events(conn: sqlite3.Connection, rows: Sequence[tuple[int, str, float, str | None, bytes]]) -> None:
    """Insert `rows` in a few statements (see `_ROWS_PER_INSERT` for why): chunks of powers of two, so that
    ten prepared statements serve every size (300 rows: 256 + 32 + 8 + 4)."""
    start = 0
    while start < len(rows):
        n = min(_ROWS_PER_INSERT, 1 << (len(rows) - start).bit_length() - 1)
        conn.execute(_insert_sql(n), [value for row in rows[start:start + n] for value in row])
        start += n


# SQLite primary result codes that mean "the OS said no" rather than "this file is not ours".
_OS_ERROR_CODES: Final = frozenset({3, 8, 10, 13, 14, 23})  # PERM, READONLY, IOERR, FULL, CANTOPEN, AUTH


@dataclass(slots=True)  # not frozen: one is built per event and destination, and a frozen init costs 4x
class Record:
    """One thing to append (treat it as immutable)."""

    topic: str
    payload: bytes  # the event in structured JSON (opaque to the store)
    key: str | None = None  # partition key / event id, stored for inspection
    # Not stored: handed to this process's commit listeners with the record (the event object the payload
    # was encoded from, so an in-process consumer need not decode it again).
    carry: object = field(default=None, compare=False)


# What a commit listener receives per record: (seq, stored_at, record), in seq order.
Committed = tuple[int, float, Record]
# (records committed to the topic, gap): gap is True when another writer (process or LocalStore instance)
# appended since this store's previous commit, so records may exist that no listener was given.
CommitListener = Callable[[list[Committed], bool], None]


@dataclass(frozen=True, slots=True)
class StoredEvent:
    topic: str
    seq: int  # monotonically increasing per store, > 0, never reused (retention included)
    stored_at: float  # unix seconds
    key: str | None
    payload: bytes


@dataclass(frozen=True, slots=True)
class TrimConsumed:
    """Topics whose name starts with `prefix` hold records only until `consumer` has consumed them: what is
    at or below its cursor on the topic is deleted (every `trim_interval`), and age and count retention
    leave such topics alone. A topic without a cursor of `consumer` is never trimmed."""

    prefix: str
    consumer: str

    def __post_init__(self) -> None:
        if not self.prefix or not self.consumer:
            raise ValueError(f"TrimConsumed needs a prefix and a consumer, got {self.prefix!r}, {self.consumer!r}")


@dataclass(frozen=True, slots=True)
class Retention:
    """What the writer deletes: records older than `max_age_seconds`, all but the newest
    `max_events_per_topic` of a topic (neither on a topic a `trim_consumed` rule covers), and what
    `trim_consumed` rules say their consumers have consumed."""

    max_age_seconds: float | None = 7 * 24 * 3600
    max_events_per_topic: int | None = None
    trim_consumed: tuple[TrimConsumed, ...] = ()

    def consumer_of(self, topic: str) -> str | None:
        """The consumer whose cursor bounds what may be deleted from `topic` (first matching rule), if any."""
        return next((rule.consumer for rule in self.trim_consumed if topic.startswith(rule.prefix)), None)


class CursorMove(NamedTuple):
    """A consumer's position set in an append's own transaction; with `expected`, only if the position committed
    before it is that (else the append fails with `CursorMoved` and writes nothing)."""

    consumer: str
    topic: str
    seq: int
    expected: int | None = None


class StoreFileError(ValueError):
    """The store's file is not one this code can use (not SQLite, another application's, a newer schema): the
    message starts with the file's path."""


class CursorMoved(Exception):
    """An append's `CursorMove.expected` did not hold: another writer moved that cursor first."""


@dataclass(slots=True)
class _Append:
    rows: list[tuple[str, str | None, bytes]]
    future: concurrent.futures.Future[list[int]]
    records: Sequence[Record]
    cursors: tuple[CursorMove, ...] = ()  # set in the records' transaction


@dataclass(slots=True)
class _Cursor:
    consumer: str
    topic: str
    seq: int
    future: concurrent.futures.Future[None]
    lazy: bool = False  # `commit_cursor_later`: nobody waits, so it may wait for an append to share a commit


@dataclass(slots=True)
class _Attempts:
    topic: str
    counts: list[tuple[int, int]]  # (seq, attempts so far)
    future: concurrent.futures.Future[None]
    lazy: bool = True  # nobody waits for it (as `_Cursor.lazy`)


@dataclass(slots=True)
class _Retain:
    now: float | None
    future: concurrent.futures.Future[int]
    trim_only: bool = False  # `trim_consumed()`: only the consumed-records pass, not age and count


class _Stop:
    pass


class _FsyncFailed(BaseException):
    """An fsync of the WAL failed: the writer must stop. A BaseException so that no handler on the way
    (retention logs and carries on after its own errors) can swallow it."""

    def __init__(self, message: str, cause: Exception) -> None:
        super().__init__(message)
        self.cause = cause  # the fsync's own error: what the callers it fails get


_STOP: Final = _Stop()
_Op = _Append | _Cursor | _Attempts | _Retain | _Stop


# One group commit not fsynced yet (sync="full" or "interval"): its futures wait for the fsync. (appends, their
# seqs, cursor moves): _acknowledge's arguments.
_Unsynced = tuple[list[_Append], list[list[int]], list[_Cursor | _Attempts]]


def _fsync_file(fd: int) -> None:
    """Flushes a file to stable storage, as SQLite's own sync would (F_FULLFSYNC on macOS, like
    ``PRAGMA fullfsync``: plain fsync there does not flush the drive cache)."""
    if sys.platform == "darwin":
        import fcntl

        fcntl.fcntl(fd, fcntl.F_FULLFSYNC)
    else:
        os.fsync(fd)


class _WalSyncer:
    """Fsyncs the WAL on a thread of its own and then acknowledges the commits it covers, in commit order.

    The writer hands each commit over (`submit`) and goes straight on to the next one, so a slow fsync (0.5 ms
    typical on a busy disk, tens of ms in its tail) delays acknowledgements but never the commits, nor the
    hand-over of their records to this process's consumers. One fsync covers every commit submitted before
    it started; with `interval` > 0 they start at most once per interval (sync="interval").

    A failed fsync fails every commit it would have covered, and every later one: after a failed fsync the
    kernel may have dropped the dirty pages and a later fsync can succeed without them, and WAL recovery
    stops at the first missing frame, so nothing committed after it could honestly be acknowledged."""

    def __init__(self, wal: Path, directory: Path, interval: float, on_failure: Callable[[], None]) -> None:
        self.wal = wal
        self.directory = directory
        self.interval = interval
        self.on_failure = on_failure  # called once, before any future fails: the store stops (writer included)
        self.count = 0  # fsyncs done
        self.failed: _FsyncFailed | None = None
        self._cond = threading.Condition()
        self._pending: list[_Unsynced] = []
        self._stopping = False
        self._fd: int | None = None
        self._thread = threading.Thread(target=self._main, name=f"umcef-fsync:{wal}", daemon=True)
        self._thread.start()

    def submit(self, group: _Unsynced) -> None:
        """A committed group, to acknowledge once an fsync covers it. Raises _FsyncFailed after a failure
        (the group's futures fail with it first)."""
        with self._cond:
            if self.failed is None:
                self._pending.append(group)
                self._cond.notify()
                return
        _fail_groups([group], self.failed.cause)
        raise self.failed

    def stop(self) -> None:
        """Fsyncs and acknowledges whatever is pending (without waiting out the interval), then ends. Idempotent."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _main(self) -> None:
        last = -float("inf")  # time.monotonic() when the last fsync started
        try:
            while True:
                with self._cond:
                    while not self._stopping and (not self._pending or time.monotonic() < last + self.interval):
                        self._cond.wait(None if not self._pending else last + self.interval - time.monotonic())
                    if not self._pending:
                        return  # stopping, nothing left
                    groups, self._pending = self._pending, []
                last = time.monotonic()
                try:
                    self._fsync()
                except Exception as exc:
                    self._fail(groups, exc)
                    return
                self.count += 1
                for appends, results, cursors in groups:
                    try:
                        LocalStore._acknowledge(appends, results, cursors)
                    except Exception:  # a bug; the syncer must live on, or every later caller waits forever
                        log.exception("acknowledging a commit of %s failed", self.wal)
        finally:
            if self._fd is not None:
                os.close(self._fd)

    def _fail(self, groups: list[_Unsynced], exc: Exception) -> None:
        failed = _FsyncFailed(f"fsync of {self.wal} failed: {exc!r}", exc)
        with self._cond:  # first: from here on the writer commits nothing more (`LocalStore._transaction`)
            self.failed = failed
            groups += self._pending
            self._pending = []
        log.error("%s; the store stops", failed)
        self.on_failure()  # before any future fails: whoever sees the failure finds the store refusing work
        _fail_groups(groups, exc)

    def _fsync(self) -> None:
        if self._fd is None:
            # The WAL exists from the first commit on and lives as long as the writer's connection (SQLite
            # deletes it only when the last connection closes), so one fd serves for good: fsync on any fd of
            # the inode flushes it.
            fd = os.open(self.wal, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
            try:
                _fsync_file(fd)
                # SQLite syncs the WAL's directory entry at its first sync of a new WAL, which with
                # synchronous=NORMAL is the first checkpoint: do it now, once.
                dfd = os.open(self.directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
                try:
                    os.fsync(dfd)
                finally:
                    os.close(dfd)
            except BaseException:
                os.close(fd)
                raise
            self._fd = fd
            return
        _fsync_file(self._fd)


def _fail_groups(groups: list[_Unsynced], exc: BaseException) -> None:
    for appends, _, cursors in groups:
        failed: list[_Append | _Cursor | _Attempts] = [*appends, *cursors]
        for op in failed:
            op.future.set_exception(exc)


def _open_error(db: Path, exc: sqlite3.Error) -> Exception:
    code = getattr(exc, "sqlite_errorcode", 0) & 0xFF
    if code in _OS_ERROR_CODES:
        return OSError(errno.EIO, f"cannot open local store: {exc}", str(db))
    return StoreFileError(f"{db}: not a usable UMCEF local store: {exc}")


class LocalStore:
    """Durable, append-only, multi-topic event log in ``<path>/events.db``.

    ``sync="full"`` fsyncs the WAL after every group commit before it resolves the commit's appends
    (survives power loss); ``"normal"`` skips that fsync (survives a crash of this process, not of the
    machine); ``"interval"`` fsyncs at most once per ``fsync_interval`` seconds and resolves every append
    only once an fsync covers it: as durable as ``"full"``, with fewer fsyncs under load and up to one
    interval of added latency. Whatever the policy, a commit's records go to this process's commit
    listeners and followers as soon as it is committed, before its fsync (as other processes' readers see
    them): in-process consumers do not wait for the disk; only the caller's acknowledgement does.
    ``read_only=True`` opens an existing store without a writer thread, for inspecting a store another
    process is writing. The writer also applies the `Retention` (age and count every
    ``retention_interval``, consumed records every ``trim_interval``).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        sync: SyncPolicy = "full",
        retention: Retention = Retention(),  # frozen, so one shared default is safe
        retention_interval: float = 60.0,
        read_only: bool = False,
        fsync_interval: float = 0.005,  # seconds; sync="interval" only
        cursor_delay: float = 0.0,  # seconds a `commit_cursor_later` move may wait for an append's commit
        trim_interval: float = 1.0,  # seconds between passes of `retention.trim_consumed`
    ) -> None:
        if sync not in _SYNC_POLICIES:
            raise ValueError(f"sync must be 'full', 'normal' or 'interval', not {sync!r}")
        if isinstance(fsync_interval, bool) or not isinstance(fsync_interval, int | float) or not (
            0 < fsync_interval <= MAX_FSYNC_INTERVAL
        ):
            raise ValueError(
                f"fsync_interval must be above 0 and at most {MAX_FSYNC_INTERVAL:g} seconds, not {fsync_interval!r}"
            )
        for name, value in (("retention_interval", retention_interval), ("trim_interval", trim_interval)):
            if not value > 0:  # the writer would run that pass on every turn, never waiting for work
                raise ValueError(f"{name} must be above 0 seconds, not {value!r}")
        self.path = Path(path)
        self.db_path = self.path / DB_FILENAME
        self.sync = sync
        self.retention = retention
        self.read_only = read_only
        self._retention_interval = retention_interval
        self._trim_interval = trim_interval
        self._next_retention = self._next_trim = 0.0  # time.monotonic() of the next pass (writer thread)
        self._lock = threading.Lock()  # guards _closed, _waiters
        self._closed = False
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        # topic -> (loop, callback); replaced, never mutated, so the writer thread reads it without the lock
        self._listeners: dict[str, tuple[asyncio.AbstractEventLoop, CommitListener]] = {}
        self._queue: queue.SimpleQueue[_Op] = queue.SimpleQueue()
        self._deferred: list[_Op] = []
        self._turn: list[_Op] = []  # what the writer took from the queue last (failed with it if the writer dies)
        self._commits = 0
        self._writer: threading.Thread | None = None
        self._last_written = 0
        # Fsyncs the WAL and acknowledges commits (None with sync="normal": SQLite syncs at checkpoints only).
        self._syncer: _WalSyncer | None = None
        self.fsync_interval = float(fsync_interval)
        self.cursor_delay = cursor_delay
        # Lazy cursor moves waiting for company (an append's commit) until `_held_until` (monotonic).
        self._held: list[_Op] = []
        self._held_until = float("inf")

        if read_only:
            if not self.db_path.is_file():
                raise FileNotFoundError(errno.ENOENT, "no local store here", str(self.db_path))
        else:
            if self.path.exists() and not self.path.is_dir():
                raise NotADirectoryError(errno.ENOTDIR, "local store path is not a directory", str(self.path))
            self.path.mkdir(parents=True, exist_ok=True)
            self._wconn = self._connect(read_only=False)
            self._last_written = self._last_seq_counter(self._wconn)  # to notice other writers' appends
        try:
            self._rconn = self._connect(read_only=True)
        except BaseException:
            if not read_only:
                self._wconn.close()
            raise
        self._rlock = threading.Lock()  # sqlite3 connections are not safe to use from two threads at once
        # A read-only store may look at a file of schema v1 (no appended counter: its count stands in).
        self._appended_column = "appended" if self._schema_version >= 2 else "count"
        self._has_attempts = self._schema_version >= 3  # a read-only look at an older file: none noted there
        if not read_only:
            if sync != "normal":
                interval = self.fsync_interval if sync == "interval" else 0.0
                self._syncer = _WalSyncer(Path(f"{self.db_path.resolve()}-wal"), self.path.resolve(), interval,
                                          self._stop_after_fsync_failure)
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
                self._schema_version = self._check_header(conn, db)
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
            raise StoreFileError(f"{db}: SQLite file of another application (application_id={app_id:#x})")
        if version > _SCHEMA_VERSION:
            # (Only a file of ours has the row: another application's file is refused as newer, as before.)
            row = conn.execute("SELECT value FROM counters WHERE name = 'compatible_from'").fetchone() \
                if app_id == _APPLICATION_ID else None
            if row is None or row[0] > _SCHEMA_VERSION:
                raise StoreFileError(f"{db}: store schema v{version} is newer than this code (v{_SCHEMA_VERSION}) and "
                                 f"needs code of schema v{version if row is None else row[0]} or later")
        if app_id == 0 and version == 0:
            if self.read_only:
                raise StoreFileError(f"{db}: not initialised as a UMCEF local store")
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                raise StoreFileError(f"{db}: SQLite file of another application (it has tables, none ours)")
        return int(version)

    def _prepare(self, conn: sqlite3.Connection, db: Path) -> None:
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode != "wal":
            raise OSError(errno.EINVAL, f"filesystem does not support SQLite WAL (got {mode})", str(db))
        # SQLite never syncs at commit: with "full" and "interval" the store fsyncs the WAL itself after the
        # commit (_WalSyncer), so the commit's records can be handed over before the fsync. (SQLite still
        # syncs around checkpoints.)
        conn.execute("PRAGMA synchronous = NORMAL")
        if sys.platform == "darwin" and self.sync in ("full", "interval"):
            # macOS fsync() does not flush the drive cache; F_FULLFSYNC does.
            conn.execute("PRAGMA fullfsync = ON")
            conn.execute("PRAGMA checkpoint_fullfsync = ON")
        # Checkpointing would otherwise leave the WAL at its high-water mark forever.
        conn.execute("PRAGMA journal_size_limit = 67108864")
        # Check and create under the write lock: two processes opening a new store at once must not see
        # each other's half-made schema.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._check_header(conn, db)
            if version == 0:
                for statement in _SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
                conn.execute(f"PRAGMA application_id = {_APPLICATION_ID}")
            else:
                for old in range(version, _SCHEMA_VERSION):  # an older store file: brought up to date
                    migration = _MIGRATIONS[old]
                    if migration.adds is not None:
                        table, column, definition = migration.adds
                        if not _has_column(conn, table, column):
                            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {definition}")
                    for statement in migration.then:
                        conn.execute(statement)
            if version < _SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {_SCHEMA_VERSION}")
            elif version == _SCHEMA_VERSION:  # a user_version set by hand: a note must not fail a group commit
                conn.execute(_ATTEMPTS_TABLE)
            if version <= _SCHEMA_VERSION:  # (also files of this schema made before the row existed)
                # The WHERE: an open that finds the row right writes nothing (no page, no WAL frame).
                conn.execute("INSERT INTO counters (name, value) VALUES ('compatible_from', ?) ON CONFLICT (name) "
                             "DO UPDATE SET value = excluded.value WHERE value != excluded.value", (_COMPATIBLE_FROM,))
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    @staticmethod
    def _last_seq_counter(conn: sqlite3.Connection) -> int:
        return int(conn.execute("SELECT value FROM counters WHERE name = 'last_seq'").fetchone()[0])

    # -- writing ---------------------------------------------------------------------------------------------

    def _submit(self, op: _Append | _Cursor | _Attempts | _Retain) -> None:
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
            topic, key, payload = r.topic, r.key, r.payload
            if type(topic) is str and topic and (key is None or type(key) is str) and type(payload) is bytes:
                rows.append((topic, key, payload))  # the usual record: exact types, nothing to convert
                continue
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

    def _append_future(self, records: Sequence[Record],
                       cursors: Sequence[CursorMove | tuple[str, str, int]] = ()) -> Future[list[int]]:
        moves = tuple(CursorMove(*move) for move in cursors)
        for consumer, topic, seq, expected in moves:
            if not (type(consumer) is str and type(topic) is str and type(seq) is int
                    and (expected is None or type(expected) is int)):
                raise TypeError(f"a cursor move is (str consumer, str topic, int seq[, int expected]), not {moves!r}")
        future: concurrent.futures.Future[list[int]] = concurrent.futures.Future()
        self._submit(_Append(self._rows(records), future, records, moves))
        return future

    async def append(self, records: Sequence[Record]) -> list[int]:
        """Seq of each record, returned only once the records are committed (and fsynced, unless sync="normal")."""
        if not records:
            return []
        return await asyncio.wrap_future(self._append_future(records))

    def append_sync(self, records: Sequence[Record],
                    cursors: Sequence[CursorMove | tuple[str, str, int]] = ()) -> list[int]:
        """`append` from a thread without an event loop. `cursors`: positions set in the records' own transaction,
        so that a crash leaves both or neither (moving records between topics); a move with `expected` makes the
        append conditional on that cursor's committed position (`CursorMoved` otherwise, nothing written)."""
        if not records and not cursors:
            return []
        return self._append_future(records, cursors).result()

    def commit_cursor(self, consumer: str, topic: str, seq: int) -> None:
        """Durably sets the consumer's position (it may move backwards: that is how a replay is asked for)."""
        self._cursor_future(consumer, topic, seq).result()

    async def commit_cursor_async(self, consumer: str, topic: str, seq: int) -> None:
        await asyncio.wrap_future(self._cursor_future(consumer, topic, seq))

    def commit_cursor_later(self, consumer: str, topic: str, seq: int) -> concurrent.futures.Future[None]:
        """Queues the cursor move into a later group commit without waiting for it (a lost cursor move only
        means redelivery after a crash, so delivery need not pay an fsync round trip per page). With a
        `cursor_delay` it waits up to that long for an append to share the commit (and its fsync)."""
        return self._cursor_future(consumer, topic, seq, lazy=True)

    def note_attempts_later(self, topic: str, counts: Sequence[tuple[int, int]]) -> concurrent.futures.Future[None]:
        """Queues (seq, attempts so far) of `topic`'s records into a later group commit, as `commit_cursor_later`
        does a cursor move (a lost note only means fewer attempts counted after a crash). Kept until trimming
        deletes the records; `attempts` reads them back."""
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(_Attempts(topic, [(int(seq), int(n)) for seq, n in counts], future))
        return future

    def listen(self, topic: str, callback: CommitListener) -> Callable[[], None]:
        """Calls `callback` on the calling event loop with every record this store commits to `topic`, once
        per group commit, in seq order; returns the function that stops it. Records appended by other
        writers are not handed over: the next commit of records here reports that they happened (`gap`), and an
        appended record with no commit here after it is only found by reading. One listener per topic."""
        loop = asyncio.get_running_loop()
        with self._lock:
            if topic in self._listeners:
                raise ValueError(f"{topic!r} already has a commit listener")
            self._listeners = {**self._listeners, topic: (loop, callback)}

        def unlisten() -> None:
            with self._lock:
                self._listeners = {t: v for t, v in self._listeners.items() if t != topic}

        return unlisten

    def hand_over(self, topic: str, committed: list[Committed], gap: bool) -> None:
        """What another writer's store committed to `topic` and relayed (its listener's arguments there: the
        delivery process hears the gateway's commits this way), handed to this store's listener of the topic
        as its own commits are. Call it on that listener's loop. Either writer's `gap` reports the other's
        commits in between, so the listener's view stays complete or knows it is not."""
        listener = self._listeners.get(topic)
        if listener is not None:
            _, callback = listener
            callback(committed, gap)

    def _cursor_future(self, consumer: str, topic: str, seq: int, *,
                       lazy: bool = False) -> concurrent.futures.Future[None]:
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        self._submit(_Cursor(consumer, topic, int(seq), future, lazy))
        return future

    def apply_retention(self, now: float | None = None) -> int:
        """Deletes what the retention policy has expired or its consumers consumed; returns how many
        events went."""
        return self._retention_future(now, trim_only=False).result()

    def trim_consumed(self) -> int:
        """Deletes now what `retention.trim_consumed` allows (the writer also does it every `trim_interval`);
        returns how many events went."""
        return self._retention_future(None, trim_only=True).result()

    def _retention_future(self, now: float | None, *, trim_only: bool) -> concurrent.futures.Future[int]:
        future: concurrent.futures.Future[int] = concurrent.futures.Future()
        self._submit(_Retain(now, future, trim_only))
        return future

    @property
    def last_seq_written_here(self) -> int:
        """The highest seq as of this store's last commit of records (its own, or another writer's below them): a
        stored record above it was appended by another writer since."""
        return self._last_written

    @property
    def commit_count(self) -> int:
        """Group commits (write transactions) so far; appends / commit_count is the mean group size."""
        return self._commits

    @property
    def fsync_count(self) -> int:
        """Fsyncs of the WAL that acknowledged commits so far (the store's own, on its syncer thread): one per
        group commit or fewer with sync="full", at most one per interval with "interval", none with "normal"."""
        return 0 if self._syncer is None else self._syncer.count

    # -- writer thread ---------------------------------------------------------------------------------------

    def _writer_main(self) -> None:
        # A pass of each at start-up catches up on whatever expired or was consumed while we were down.
        self._next_retention = self._next_trim = time.monotonic()
        try:
            while True:
                ops = self._turn = self._take(max(0.0, self._next_due() - time.monotonic()))
                self._commit_writes(ops)
                stopping = bool(ops) and ops[-1] is _STOP  # close() guarantees nothing is queued after it
                if not stopping:
                    # After every turn, not only when the queue is idle: a steady stream of appends must not
                    # starve the held cursor moves, trimming or retention.
                    self._do_due_work()
                for op in ops:
                    if isinstance(op, _Retain) and op.future.set_running_or_notify_cancel():
                        try:
                            op.future.set_result(self._apply_retention(op))
                        except Exception as exc:
                            op.future.set_exception(exc)
                if stopping:
                    return
        except _FsyncFailed as exc:  # an expected way to stop: logged; every pending caller fails
            log.error("writer of %s stopped: %s", self.db_path, exc)
            self._fail_pending(exc)
        except BaseException as exc:
            log.exception("writer thread of %s died", self.db_path)
            self._fail_pending(exc)
            raise
        finally:
            if self._syncer is not None:
                self._syncer.stop()  # acknowledges what was committed (if its fsync succeeds)
            self._wconn.close()

    def _next_due(self) -> float:
        """The earliest of the writer's own deadlines (retention, trimming, the commit of held cursor moves): no
        wait for the queue outlasts it."""
        due = self._next_retention
        if self.retention.trim_consumed:
            due = min(due, self._next_trim)
        if self._held:
            due = min(due, self._held_until)
        return due

    def _do_due_work(self) -> None:
        self._serve_due()
        if self.retention.trim_consumed and time.monotonic() >= self._next_trim:
            try:
                self._trim_consumed()
            except Exception:
                log.exception("trimming consumed records failed on %s", self.db_path)
            self._next_trim = time.monotonic() + self._trim_interval
        if time.monotonic() >= self._next_retention:
            try:
                self._retain(None)
            except Exception:
                log.exception("retention pass failed on %s", self.db_path)
            self._next_retention = time.monotonic() + self._retention_interval

    def _serve_due(self) -> None:
        """Commits held cursor moves whose wait is over."""
        if self._held and time.monotonic() >= self._held_until:
            held, self._held = self._held, []
            self._commit_writes(held)

    def _apply_retention(self, op: _Retain) -> int:
        trimmed = self._trim_consumed()
        return trimmed if op.trim_only else trimmed + self._retain(op.now)

    def _take(self, timeout: float) -> list[_Op]:
        ops, self._deferred = self._deferred, []
        if not ops:
            try:
                ops.append(self._queue.get(timeout=timeout))
            except queue.Empty:
                return []
        self._drain(ops)
        return self._with_held(ops)

    def _with_held(self, ops: list[_Op]) -> list[_Op]:
        """Lazy cursor moves alone (`commit_cursor_later`) are held up to `cursor_delay` for company: the
        next append's commit takes them along, so they cost no transaction and no fsync of their own (and a
        store shared with the delivery process takes a few per second, not one per page, each holding the
        write lock through an fsync). Anything else takes the held moves along, first (they are older)."""
        if self.cursor_delay and ops and all(isinstance(op, _Cursor | _Attempts) and op.lazy for op in ops):
            if not self._held:
                self._held_until = time.monotonic() + self.cursor_delay
            self._held += ops
            return []
        if self._held and ops:
            ops, self._held = [*self._held, *ops], []
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

    def _refuse_work(self) -> None:
        with self._lock:
            self._closed = True

    def _stop_after_fsync_failure(self) -> None:
        """The syncer's fsync failed: refuse new work and wake the writer so that it stops (an idle one would
        otherwise live on, trimming, until the process ends)."""
        self._refuse_work()
        self._queue.put(_STOP)

    def _fail_pending(self, exc: BaseException) -> None:
        self._refuse_work()
        failure = RuntimeError(f"local store writer failed: {exc!r}")
        # Already taken (this turn's retention requests): running, so failed here unless done. (Commits waiting
        # for their fsync are the syncer's: committed, they are acknowledged if it succeeds.)
        started: list[_Append | _Cursor | _Attempts | _Retain] = [op for op in self._turn if isinstance(op, _Retain)]
        for running in started:
            if not running.future.done():
                running.future.set_exception(failure)
        pending = [*self._held, *self._deferred]
        with contextlib.suppress(queue.Empty):
            while True:
                pending.append(self._queue.get_nowait())
        for op in pending:
            if not isinstance(op, _Stop) and op.future.set_running_or_notify_cancel():
                op.future.set_exception(failure)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        if self._syncer is not None and self._syncer.failed is not None:
            raise self._syncer.failed  # nothing is committed after a failed fsync: the writer stops
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
        notes: list[_Attempts] = []
        for op in ops:
            # A caller cancelled before we got here: its records are not written (it never got a 202).
            if isinstance(op, _Append) and op.future.set_running_or_notify_cancel():
                appends.append(op)
            elif isinstance(op, _Cursor) and op.future.set_running_or_notify_cancel():
                cursors.append(op)
            elif isinstance(op, _Attempts) and op.future.set_running_or_notify_cancel():
                notes.append(op)
        if not appends and not cursors and not notes:
            return
        marks: list[_Cursor | _Attempts] = [*cursors, *notes]
        results: list[list[int]] = []
        try:
            with self._transaction() as conn:
                if any(a.cursors for a in appends):
                    appends = self._where_expected(conn, appends)
                moves = self._moves(ops, appends, cursors)
                # One statement reserves the seqs and reads where they start (see `_ROWS_PER_INSERT`).
                total = sum(len(a.rows) for a in appends)
                last = int(conn.execute("UPDATE counters SET value = value + ? WHERE name = 'last_seq' "
                                        "RETURNING value", (total,)).fetchone()[0]) - total
                gap = total > 0 and last != self._last_written
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
                _insert_events(conn, rows)
                conn.executemany(_COUNT_APPENDS, per_topic.items())
                if moves:
                    conn.executemany(
                        "INSERT INTO cursors (consumer, topic, seq) VALUES (?, ?, ?) "
                        "ON CONFLICT (consumer, topic) DO UPDATE SET seq = excluded.seq",
                        moves,
                    )
                if notes:
                    conn.executemany(_NOTE_ATTEMPTS, [(n.topic, seq, count) for n in notes for seq, count in n.counts])
        except _FsyncFailed as exc:  # the syncer's fsync failed: not committed, and the writer stops
            _fail_groups([(appends, [], marks)], exc.cause)
            raise
        except Exception as exc:
            _fail_groups([(appends, [], marks)], exc)
            return
        self._commits += 1
        # A commit of cursor moves alone neither moves `_last_written` nor reports a gap: the next commit with
        # records reports other writers' appends before it. (It used to report them itself, moving
        # `_last_written` past them: then a delivery process, whose every cursor commit follows the gateway's
        # appends, read the store after each instead of taking the records relayed to it in memory.)
        if total:
            self._last_written = last
        # Handed over before the fsync: a delivery worker in this process publishes the records while the disk
        # syncs them (as another process's reader already could). They survive a crash of this process once
        # committed; a power cut before the fsync could lose a record that was published, whose caller was
        # never acknowledged: a retry publishes it again (at least once, as for any unacknowledged publish).
        try:
            if total:
                self._tell_listeners(appends, results, now, gap)
            if appends:
                self._notify()
        finally:  # whatever happens, the commit's callers get their answer
            if self._syncer is None:  # sync="normal"
                self._acknowledge(appends, results, marks)
            else:
                self._syncer.submit((appends, results, marks))

    def _where_expected(self, conn: sqlite3.Connection, appends: list[_Append]) -> list[_Append]:
        """The appends whose conditional cursor moves hold (read under the write lock); the others fail."""
        kept: list[_Append] = []
        for a in appends:
            stale = next(((m, now) for m in a.cursors if m.expected is not None
                          and (now := self._cursor_in(conn, m.consumer, m.topic)) != m.expected), None)
            if stale is None:
                kept.append(a)
            else:
                move, now = stale
                a.future.set_exception(CursorMoved(f"cursor of {move.consumer} on {move.topic} is at {now}, "
                                                   f"not {move.expected}"))
        return kept

    @staticmethod
    def _moves(ops: list[_Op], appends: list[_Append], cursors: list[_Cursor]) -> list[tuple[str, str, int]]:
        """The cursor positions to write, in queue order (a later move of one cursor wins)."""
        if not cursors and not any(a.cursors for a in appends):
            return []
        taken = {id(op) for op in (*appends, *cursors)}
        moves: list[tuple[str, str, int]] = []
        for op in ops:
            if id(op) not in taken:
                continue
            if isinstance(op, _Append):
                moves += [(m.consumer, m.topic, m.seq) for m in op.cursors]
            elif isinstance(op, _Cursor):
                moves.append((op.consumer, op.topic, op.seq))
        return moves

    @staticmethod
    def _acknowledge(appends: list[_Append], results: list[list[int]], cursors: list[_Cursor | _Attempts]) -> None:
        """A group commit as durable as the sync policy asks: its callers get their seqs."""
        for a, seqs in zip(appends, results, strict=True):
            a.future.set_result(seqs)
        for c in cursors:
            c.future.set_result(None)

    def _tell_listeners(self, appends: list[_Append], results: list[list[int]], now: float, gap: bool) -> None:
        # Looked up after COMMIT: a listener registered before it hears these records, one registered after it
        # finds them by reading the store (SpoolFeed reads before trusting memory).
        listeners = self._listeners
        if not listeners:
            return
        heard: dict[str, list[Committed]] = {}
        for a, seqs in zip(appends, results, strict=True):
            for seq, record in zip(seqs, a.records, strict=True):
                if record.topic in listeners:
                    heard.setdefault(record.topic, []).append((seq, now, record))
        for topic, (loop, callback) in listeners.items():
            committed = heard.get(topic)
            if committed or gap:
                with contextlib.suppress(RuntimeError):  # that loop is closed; its listener is gone
                    loop.call_soon_threadsafe(callback, committed or [], gap)

    def _serve_writes(self) -> None:
        """Between retention chunks: commit queued appends now, keep anything else for the main loop."""
        ops: list[_Op] = []
        self._drain(ops)
        self._deferred.extend(op for op in ops if isinstance(op, _Retain | _Stop))
        self._commit_writes(self._with_held([op for op in ops if not isinstance(op, _Retain | _Stop)]))
        self._serve_due()

    def _retain(self, now: float | None) -> int:
        now = time.time() if now is None else now
        max_age, max_events = self.retention.max_age_seconds, self.retention.max_events_per_topic
        total = 0
        if max_age is not None:
            # Never a topic a `trim_consumed` rule covers: its consumer has not consumed what is left (a
            # delivery spool's undelivered events; its worker dead-letters them at their own maximum age).
            rules = self.retention.trim_consumed
            where = "stored_at < ?" + " AND substr(topic, 1, ?) != ?" * len(rules)
            params = (now - max_age, *(v for rule in rules for v in (len(rule.prefix), rule.prefix)))
            while True:
                n = self._delete_chunk(where, params, _RETENTION_CHUNK)
                total += n
                if n < _RETENTION_CHUNK:
                    break
                self._serve_writes()
                if self._closing():
                    return total
        if max_events is not None:
            over = self._wconn.execute("SELECT topic FROM topics WHERE count > ?", (max_events,)).fetchall()
            for (topic,) in over:
                if self.retention.consumer_of(topic) is not None:
                    continue  # (as for age: what trimming left there, its consumer has not consumed)
                while n := self._trim_topic(topic, max_events):
                    total += n
                    self._serve_writes()
                    if self._closing():
                        return total
        return total

    def _closing(self) -> bool:
        """close() was called while a retention or trim pass ran: the rest waits for the next start's pass
        (which runs at once), rather than holding up the shutdown. (`_closed`, not the stop op: a request taken
        in the same turn as the stop would not see that op among the deferred ones.)"""
        return self._closed

    def _delete_chunk(self, where: str, params: tuple[object, ...], limit: int) -> int:
        with self._transaction() as conn:
            return self._delete(conn, where, params, limit)

    def _trim_topic(self, topic: str, keep: int) -> int:
        with self._transaction() as conn:
            # Re-read inside the transaction: another process may have trimmed since we listed the topics.
            row = conn.execute("SELECT count FROM topics WHERE topic = ?", (topic,)).fetchone()
            excess = 0 if row is None else row[0] - keep
            if excess <= 0:
                return 0
            return self._delete_oldest(conn, topic, _MAX_SEQ, min(excess, _RETENTION_CHUNK))

    @staticmethod
    def _cursor_in(conn: sqlite3.Connection, consumer: str, topic: str) -> int:
        row = conn.execute("SELECT seq FROM cursors WHERE consumer = ? AND topic = ?", (consumer, topic)).fetchone()
        return 0 if row is None else int(row[0])

    def _trim_consumed(self) -> int:
        """Deletes the records `retention.trim_consumed` allows, in chunks (appends are served in between)."""
        total = 0
        while True:
            n = self._trim_chunk()
            total += n
            if n < _TRIM_CHUNK:
                return total
            self._serve_writes()
            if self._closing():
                return total

    def _trimmable(self) -> list[tuple[str, str]]:
        """(topic, consumer) of the rules' topics with records at or below the consumer's cursor."""
        retention = self.retention
        return [(topic, consumer)
                for consumer in dict.fromkeys(rule.consumer for rule in retention.trim_consumed)
                for (topic,) in self._wconn.execute(_TRIMMABLE_SQL, (consumer,)).fetchall()
                if retention.consumer_of(topic) == consumer]

    def _trim_chunk(self) -> int:
        """One transaction deleting up to a chunk of consumed records, over every topic that has some (one
        commit for all of them)."""
        trimmable = self._trimmable()
        if not trimmable:
            return 0
        left = _TRIM_CHUNK
        # No fsync of its own (nor has age or count retention's): a trim lost in a power cut only brings back
        # records at or below a cursor committed before it (the WAL keeps commit order), trimmed again; the
        # next fsync covers it anyway (the WAL is synced up to its end).
        with self._transaction() as conn:
            for topic, consumer in trimmable:
                # The cursor as of now, under the write lock: another process may have moved it.
                left -= self._delete_oldest(conn, topic, self._cursor_in(conn, consumer, topic), left)
                if not left:
                    break
        return _TRIM_CHUNK - left

    @staticmethod
    def _delete_oldest(conn: sqlite3.Connection, topic: str, up_to: int, limit: int) -> int:
        """Deletes the oldest records of `topic` with seq <= up_to, at most `limit` of them."""
        if limit <= 0:  # (SQLite reads a negative OFFSET as 0: one record would go)
            return 0
        nth = conn.execute(_NTH_OLDEST, (topic, up_to, limit - 1)).fetchone()
        last = up_to if nth is None else nth[0]
        n = conn.execute(_DELETE_UP_TO, (topic, last)).rowcount
        if n:  # an emptied topic keeps its row (count 0): its `appended` counter must never go back
            conn.execute("UPDATE topics SET count = count - ? WHERE topic = ?", (n, topic))
            conn.execute("DELETE FROM attempts WHERE topic = ? AND seq <= ?", (topic, last))
        return n

    @staticmethod
    def _delete(conn: sqlite3.Connection, where: str, params: tuple[object, ...], limit: int) -> int:
        gone = Counter(t for (t,) in conn.execute(_delete_sql(where), (*params, limit)).fetchall())
        # An emptied topic keeps its row (count 0): its `appended` counter must never go back.
        conn.executemany(
            "UPDATE topics SET count = count - ? WHERE topic = ?", [(n, t) for t, n in gone.items()]
        )
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

    def read_payloads(self, topic: str, after: int = 0, limit: int = 1000) -> list[tuple[int, float, bytes]]:
        """(seq, stored_at, payload) of `topic`'s events with seq > after, ascending: what a delivery feed reads,
        at about half the cost per record of `read` (no key or topic column, no object per record)."""
        if limit <= 0:
            return []
        with self._reader() as conn:
            rows: list[tuple[int, float, bytes]] = conn.execute(
                "SELECT seq, stored_at, payload FROM events WHERE topic = ? AND seq > ? ORDER BY seq LIMIT ?",
                (topic, after, limit),
            ).fetchall()
        return rows

    def last_seq(self, topic: str | None = None) -> int:
        """Highest seq currently stored (in that topic), 0 if none: where a "from now on" follower starts."""
        with self._reader() as conn:
            if topic is None:
                row = conn.execute("SELECT max(seq) FROM events").fetchone()
            else:
                row = conn.execute("SELECT max(seq) FROM events WHERE topic = ?", (topic,)).fetchone()
        return int(row[0] or 0)

    def count(self, topic: str, after: int = 0) -> int:
        """How many events of `topic` have seq > after (one range of the topic index)."""
        with self._reader() as conn:
            return int(conn.execute("SELECT count(*) FROM events WHERE topic = ? AND seq > ?",
                                    (topic, after)).fetchone()[0])

    def topics(self) -> dict[str, int]:
        """Topic -> number of stored events (topics emptied by retention are absent)."""
        with self._reader() as conn:
            return dict(conn.execute("SELECT topic, count FROM topics WHERE count > 0 ORDER BY topic").fetchall())

    def appended(self) -> dict[str, int]:
        """Topic -> records appended to it by any writer, counted since the store file has the counter (only
        its growth means anything). Retention and trimming never lower it, so unlike `topics()` a growth
        always means appends (what backpressure counts other processes' appends with)."""
        with self._reader() as conn:
            column = self._appended_column
            return dict(conn.execute(f"SELECT topic, {column} FROM topics ORDER BY topic").fetchall())

    def attempts(self, topic: str, after: int = 0) -> dict[int, int]:
        """Seq -> delivery attempts noted (`note_attempts_later`) for `topic`'s records with seq > after."""
        if not self._has_attempts:
            return {}
        with self._reader() as conn:
            return dict(conn.execute("SELECT seq, count FROM attempts WHERE topic = ? AND seq > ?",
                                     (topic, after)).fetchall())

    def cursor(self, consumer: str, topic: str) -> int:
        """Last committed seq of this consumer on this topic, 0 if none."""
        with self._reader() as conn:
            return self._cursor_in(conn, consumer, topic)

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
            if not self._closed:
                self._closed = True
                if self._writer is not None:
                    self._queue.put(_STOP)
        # Joined even when the store was closed already: a failed fsync closes it and stops the writer itself.
        if self._writer is not None and self._writer is not threading.current_thread():
            self._writer.join()
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
