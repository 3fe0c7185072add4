"""How the store syncs: SQLite commits without fsync and the store's syncer thread fsyncs the WAL, after every commit
(`sync: full`) or at most once per interval (`sync: interval`). Nothing is acknowledged before an fsync covers
it; commit listeners and followers get the records at commit, without waiting for the disk."""

from __future__ import annotations

import asyncio
import errno
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import umcef.adapters.local as local
from umcef.adapters.local import Committed, LocalStore, Record
from umcef.fabric.config import Config, ConfigError, load
from umcef.fabric.gateway import open_store


def records(topic: str, n: int, prefix: str = "e") -> list[Record]:
    return [Record(topic, f'{{"id":"{prefix}{i}"}}'.encode(), key=f"{prefix}{i}") for i in range(n)]


class FsyncShim:
    """Stands in for the store's own fsync (`local._fsync_file`): counts, logs, can hold or fail it."""

    def __init__(self) -> None:
        self.calls: list[str] = []  # the path of each fsynced fd
        self.log: list[str] = []  # "fsync" entries interleaved with what the test records
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_from: int | None = None  # the call number (1-based) from which fsync raises EIO
        self.real = local._fsync_file

    def __call__(self, fd: int) -> None:
        path = os.readlink(f"/proc/self/fd/{fd}") if sys.platform == "linux" else str(fd)
        self.calls.append(path)
        self.entered.set()
        self.gate.wait(10)
        if self.fail_from is not None and len(self.calls) >= self.fail_from:
            raise OSError(errno.EIO, "simulated fsync failure")
        self.real(fd)
        self.log.append("fsync")


@pytest.fixture
def shim(monkeypatch: pytest.MonkeyPatch) -> FsyncShim:
    s = FsyncShim()
    monkeypatch.setattr(local, "_fsync_file", s)
    return s


@pytest.fixture
def store(tmp_path: Path, shim: FsyncShim) -> Iterator[LocalStore]:
    s = LocalStore(tmp_path / "store", sync="interval", fsync_interval=1.0)
    yield s
    shim.gate.set()
    s.close()


@pytest.fixture(params=["full", "interval"])
def synced_store(request: pytest.FixtureRequest, tmp_path: Path, shim: FsyncShim) -> Iterator[LocalStore]:
    """A store of each policy whose appends wait for the store's own fsync (interval: 1 s)."""
    s = LocalStore(tmp_path / "store", sync=request.param, fsync_interval=1.0)
    yield s
    shim.gate.set()
    s.close()


async def settle(predicate: object, what: str) -> None:
    assert callable(predicate)
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


async def test_append_is_acknowledged_only_after_an_fsync_of_the_wal(synced_store: LocalStore,
                                                                     shim: FsyncShim) -> None:
    store = synced_store
    shim.gate.clear()  # the syncer's fsync blocks until the test lets it go
    task = asyncio.create_task(store.append(records("a", 3)))
    await settle(shim.entered.is_set, "the syncer's fsync")
    # Committed (a reader sees it) but not fsynced: no acknowledgement yet.
    assert store.commit_count == 1 and [e.seq for e in store.read("a")] == [1, 2, 3]
    await asyncio.sleep(0.05)
    assert not task.done()
    shim.gate.set()
    assert await asyncio.wait_for(task, 5) == [1, 2, 3]
    assert store.fsync_count == 1
    if sys.platform == "linux":
        assert shim.calls == [str((store.path / "events.db-wal").resolve())]


async def test_commits_within_one_interval_share_one_fsync(store: LocalStore, shim: FsyncShim) -> None:
    await store.append(records("a", 1))  # idle store: fsynced at once; the next fsync is due 1 s later
    commits, fsyncs = store.commit_count, len(shim.calls)
    tasks = []
    for wave in range(5):  # five waves, each committed on its own, all within the interval
        tasks += [asyncio.create_task(store.append(records("a", 2, f"w{wave}-{i}-"))) for i in range(10)]
        await settle(lambda w=wave: store.commit_count > commits + w, f"commit of wave {wave}")  # type: ignore[misc]
    assert not any(t.done() for t in tasks) and len(shim.calls) == fsyncs
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert len({s for seqs in results for s in seqs}) == 100
    assert store.commit_count - commits >= 5
    assert len(shim.calls) - fsyncs == 1 and store.fsync_count == 2


async def test_listeners_and_followers_get_records_at_commit_before_the_fsync(synced_store: LocalStore,
                                                                              shim: FsyncShim) -> None:
    store = synced_store
    heard: list[Committed] = []

    def listener(committed: list[Committed], gap: bool) -> None:
        shim.log.append("heard")
        heard.extend(committed)

    unlisten = store.listen("a", listener)
    follower = store.follow_batches("b", poll_interval=60)  # only a wake-up from the writer can deliver
    woken = asyncio.ensure_future(anext(follower))
    await asyncio.sleep(0)
    shim.gate.clear()
    task = asyncio.create_task(store.append(records("a", 2) + records("b", 1)))
    await settle(shim.entered.is_set, "the syncer's fsync")
    # Committed, the fsync not done: the listener and the follower have the records, the caller waits.
    await settle(lambda: len(heard) == 2, "the listener")
    assert [e.seq for e in await asyncio.wait_for(woken, 5)] == [3]
    assert [seq for seq, _, _ in heard] == [1, 2] and store.commit_count == 1
    await asyncio.sleep(0.05)
    assert not task.done() and shim.log == ["heard"]
    shim.gate.set()
    assert await asyncio.wait_for(task, 5) == [1, 2, 3]
    assert shim.log == ["heard", "fsync"]
    unlisten()
    await follower.aclose()


async def test_cursor_moves_resolve_with_the_fsync(store: LocalStore, shim: FsyncShim) -> None:
    shim.gate.clear()
    moved = asyncio.wrap_future(store.commit_cursor_later("c", "a", 7))
    await settle(shim.entered.is_set, "the syncer's fsync")
    await asyncio.sleep(0.05)
    assert store.cursor("c", "a") == 7 and not moved.done()  # committed, not yet durable
    shim.gate.set()
    await asyncio.wait_for(moved, 5)


async def test_a_held_cursor_move_does_not_delay_the_fsync_of_parked_appends(tmp_path: Path, shim: FsyncShim) -> None:
    # The move waits up to an hour for company; the append committed before it must still be fsynced (and
    # acknowledged) when its interval is up, not when the move's wait ends.
    s = LocalStore(tmp_path, sync="interval", fsync_interval=0.2, cursor_delay=3600)
    try:
        await s.append(records("a", 1))  # idle store: fsynced at once; the next fsync is due 0.2 s later
        parked = asyncio.ensure_future(s.append(records("a", 1, "p")))
        await settle(lambda: s.commit_count == 2, "the second append's commit")  # committed, waiting for fsync
        held = asyncio.wrap_future(s.commit_cursor_later("c", "a", 2))
        assert await asyncio.wait_for(parked, 10) == [2]
        assert s.fsync_count == 2 and s.commit_count == 2 and not held.done()  # the move is still waiting
        assert await s.append(records("a", 1, "n")) == [3]  # and rides on the next append's commit and fsync
        await asyncio.wait_for(held, 5)
        assert s.commit_count == 3 and s.cursor("c", "a") == 2
    finally:
        s.close()


async def test_close_fsyncs_and_resolves_what_is_pending(tmp_path: Path, shim: FsyncShim) -> None:
    s = LocalStore(tmp_path, sync="interval", fsync_interval=1.0)
    await s.append(records("a", 1))  # fsynced at once: the next fsync would be due in 1 s
    fsyncs = len(shim.calls)
    tasks = [asyncio.create_task(s.append(records("a", 3, f"q{i}-"))) for i in range(20)]
    await settle(lambda: s.commit_count > 1, "a commit of the queued appends")
    assert not any(t.done() for t in tasks)
    s.close()  # commits whatever is still queued, fsyncs, resolves: does not wait for the interval
    results = await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert sorted(x for seqs in results for x in seqs) == list(range(2, 62))
    assert len(shim.calls) - fsyncs == 1
    with LocalStore(tmp_path) as again:
        assert again.topics() == {"a": 61}


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_a_failed_fsync_fails_the_pending_appends_and_stops_the_writer(
    tmp_path: Path, shim: FsyncShim
) -> None:
    s = LocalStore(tmp_path, sync="interval", fsync_interval=0.05)
    try:
        assert await s.append(records("a", 1)) == [1]
        shim.fail_from = len(shim.calls) + 1
        tasks = [asyncio.create_task(s.append(records("a", 2, f"f{i}-"))) for i in range(10)]
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        assert outcomes and all(isinstance(o, OSError) and o.errno == errno.EIO for o in outcomes), outcomes
        assert s.fsync_count == 1
        # Nothing is acknowledged any more: the store is closed for writes (and reads) until reopened, and its
        # writer stops by itself (an idle one too: it would otherwise go on trimming).
        with pytest.raises(RuntimeError, match="closed"):
            s.append_sync(records("a", 1))
        assert s._writer is not None
        await settle(lambda: not s._writer.is_alive(), "the writer to stop")  # type: ignore[union-attr]
    finally:
        s.close()
    shim.fail_from = None
    with LocalStore(tmp_path, sync="interval") as again:  # reopening recovers whatever reached the disk
        assert again.append_sync(records("a", 1))[0] > 1


async def test_the_writer_commits_and_hands_over_while_an_fsync_is_slow(tmp_path: Path, shim: FsyncShim) -> None:
    # The fsync runs on a thread of its own: a held fsync delays acknowledgements, not the next commits, their
    # hand-over to listeners, or a retention request.
    heard: list[int] = []
    s = LocalStore(tmp_path, sync="full")
    try:
        unlisten = s.listen("a", lambda committed, gap: heard.extend(seq for seq, _, _ in committed))
        shim.gate.clear()
        first = asyncio.create_task(s.append(records("a", 1)))
        await settle(shim.entered.is_set, "the first fsync")
        later = [asyncio.create_task(s.append(records("a", 1, f"l{i}-"))) for i in range(3)]
        await settle(lambda: len(heard) == 4, "the later commits' hand-over")
        assert s.apply_retention() == 0  # served meanwhile (nothing to delete)
        assert not first.done() and not any(t.done() for t in later) and len(shim.calls) == 1
        shim.gate.set()
        assert await asyncio.wait_for(first, 5) == [1]
        assert sorted(x for seqs in await asyncio.wait_for(asyncio.gather(*later), 5) for x in seqs) == [2, 3, 4]
        assert len(shim.calls) == 2  # one fsync covered the three commits made during the first
        unlisten()
    finally:
        shim.gate.set()
        s.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
async def test_after_a_failed_fsync_nothing_more_is_committed_or_acknowledged(tmp_path: Path, shim: FsyncShim) -> None:
    s = LocalStore(tmp_path, sync="full")
    try:
        assert await s.append(records("a", 1)) == [1]
        shim.gate.clear()
        shim.fail_from = len(shim.calls) + 1
        failing = asyncio.create_task(s.append(records("a", 1, "f")))
        await settle(shim.entered.is_set, "the failing fsync")
        commits = s.commit_count
        queued = [asyncio.create_task(s.append(records("a", 1, f"q{i}-"))) for i in range(3)]
        await settle(lambda: s.commit_count > commits, "the queued appends' commit")  # waiting for the next fsync
        shim.gate.set()
        outcomes = await asyncio.wait_for(asyncio.gather(failing, *queued, return_exceptions=True), 5)
        assert all(isinstance(o, OSError) and o.errno == errno.EIO for o in outcomes), outcomes
        with pytest.raises(RuntimeError, match="closed"):
            s.append_sync(records("a", 1))
        assert s.fsync_count == 1
        commits = s.commit_count
    finally:
        s.close()
    assert s._writer is not None and not s._writer.is_alive()  # close() joined it
    assert s.commit_count == commits


@pytest.mark.parametrize("name", ["retention_interval", "trim_interval"])
@pytest.mark.parametrize("value", [0, -1.0])
def test_pass_intervals_must_be_positive(tmp_path: Path, name: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"{name} must be above 0"):
        LocalStore(tmp_path, **{name: value})  # type: ignore[arg-type]


def test_an_idle_store_fsyncs_every_commit_at_once(tmp_path: Path, shim: FsyncShim) -> None:
    # The interval bounds how often the store fsyncs, it is not a delay added to every append: a commit
    # more than an interval after the last fsync is fsynced straight away.
    with LocalStore(tmp_path, sync="interval", fsync_interval=0.001) as s:
        for i in range(3):
            s.append_sync(records("a", 1, f"i{i}-"))
            threading.Event().wait(0.01)
        assert s.fsync_count == len(shim.calls) == s.commit_count == 3


def test_fsync_counts_per_policy(tmp_path: Path, shim: FsyncShim) -> None:
    for sync in ("full", "normal"):
        with LocalStore(tmp_path / sync, sync=sync) as s:  # type: ignore[arg-type]
            s.append_sync(records("a", 1))
            s.append_sync(records("a", 1))
            assert s.fsync_count == (2 if sync == "full" else 0)
    # full: the store's own fsync of the WAL, one per commit; normal: none (SQLite syncs at checkpoints only)
    assert shim.calls == [str((tmp_path / "full" / "events.db-wal").resolve())] * 2 if sys.platform == "linux" \
        else len(shim.calls) == 2


@pytest.mark.parametrize("interval", [0, -1, 1.5, True, "5"])
def test_bad_fsync_interval(tmp_path: Path, interval: object) -> None:
    with pytest.raises(ValueError, match="fsync_interval"):
        LocalStore(tmp_path, sync="interval", fsync_interval=interval)  # type: ignore[arg-type]


# -- configuration ---------------------------------------------------------------------------------------


def load_config(tmp_path: Path, text: str, env: dict[str, str] | None = None) -> Config:
    path = tmp_path / "umcef.yaml"
    path.write_text(f"data_dir: {tmp_path / 'data'}\n{text}")
    return load(path, env=env or {})


def test_config_interval_policy_and_env_override(tmp_path: Path) -> None:
    cfg = load_config(tmp_path, "store: {sync: interval, fsync_interval_ms: 20}")
    assert (cfg.store.sync, cfg.store.fsync_interval_ms, cfg.store.fsync_interval) == ("interval", 20.0, 0.02)
    cfg = load_config(tmp_path, "store: {sync: full}", {"UMCEF_STORE__SYNC": "interval"})
    assert (cfg.store.sync, cfg.store.fsync_interval_ms) == ("interval", 5.0)
    cfg = load_config(tmp_path, "", {"UMCEF_STORE__SYNC": "interval", "UMCEF_STORE__FSYNC_INTERVAL_MS": "2.5"})
    assert cfg.store.fsync_interval == 0.0025
    store = open_store(cfg)
    try:
        assert (store.sync, store.fsync_interval) == ("interval", 0.0025)
    finally:
        store.close()


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("store: {sync: sometimes}", {}, "store.sync: expected one of full, normal, interval, got 'sometimes'"),
        ("store: {sync: full, fsync_interval_ms: 5}", {},
         "store.fsync_interval_ms: only used with sync: interval, got sync: full"),
        ("store: {fsync_interval_ms: 5}", {}, "store.fsync_interval_ms: only used with sync: interval, got sync: full"),
        ("store: {sync: interval, fsync_interval_ms: 0}", {},
         "store.fsync_interval_ms: expected a number of milliseconds above 0 and at most 1000, got 0"),
        ("store: {sync: interval, fsync_interval_ms: 1001}", {},
         "store.fsync_interval_ms: expected a number of milliseconds above 0 and at most 1000, got 1001"),
        ("store: {sync: interval, fsync_interval_ms: fast}", {},
         "store.fsync_interval_ms: expected a number of milliseconds above 0 and at most 1000, got 'fast'"),
        ("store: {sync: interval}", {"UMCEF_STORE__FSYNC_INTERVAL_MS": "true"},
         "store.fsync_interval_ms: expected a number of milliseconds above 0 and at most 1000, got True"),
        ("store: {sync: normal}", {"UMCEF_STORE__FSYNC_INTERVAL_MS": "5"},
         "store.fsync_interval_ms: only used with sync: interval, got sync: normal"),
    ],
)
def test_config_mistakes(tmp_path: Path, text: str, env: dict[str, str], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path, text, env)
    assert str(info.value).endswith(message)
