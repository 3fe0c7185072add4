"""Delivery in a second process (`delivery.process: true`).

One Python interpreter runs one core: with ingress (HTTP, decoding, validation, dedup, routing, the spool
write) and delivery (encoding for the broker, the client library, acknowledgements) in one process they
share it. Here the gateway's process keeps ingress and a child process runs the `DeliveryHost`. They share
only what already is the hand-over between the two halves, the durable spool in the store (SQLite in WAL
mode takes two writers; each commit holds the write lock briefly), plus one pipe each way:

- parent -> child: each group commit's records of every delivery spool, relayed (umcef.fabric.commit_relay:
  the child's workers take them from memory, as in one process, instead of reading the store) while the
  child's feed of the spool is caught up, a gap alone otherwise; and a final ("stop", grace) message;
- child -> parent, every `REPORT_SECONDS`: the estimator's health and RTT per destination (the parent's
  router decides with it), what left each spool and what dead-lettering put into one (backpressure
  depths), and what failover moved where.

The child exits when the parent goes away (its pipe reads EOF), so a SIGKILLed gateway leaves no
deliverer behind for long; a lock file keeps a lingering one from running beside its successor. A child
that dies is restarted, with backoff; events wait in the spool meanwhile, as during a broker outage.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from umcef.adapters.local import Committed, LocalStore
from umcef.fabric.commit_relay import CommitReceiver, CommitSender
from umcef.fabric.config import Config
from umcef.fabric.delivery import spool_topic
from umcef.fabric.delivery_host import DeliveryHost
from umcef.fabric.runtime import configure_logging, tune_interpreter
from umcef.router.estimator import Estimator

log = logging.getLogger("umcef.delivery")

REPORT_SECONDS = 0.05  # how stale the ingress router's view of health and RTT may be
LOCK_FILE = "delivery.lock"
LOCK_WAIT_SECONDS = 60.0  # a predecessor finishing its in-flight publishes (drain_seconds) fits easily
START_SECONDS = 60.0
RESTART_BACKOFF = (0.5, 30.0)


class Report(NamedTuple):
    """What the child tells the gateway every `REPORT_SECONDS` (sent as ("report", Report))."""

    health: list[tuple[str, float, int, float, str]]  # Estimator.snapshot()
    drained: int  # what left the delivery spools (DeliveryHost.drained)
    lanes: dict[str, int]  # the same per destination
    spooled_in: dict[str, int]  # dead letters the child appended to a destination's spool
    moved: dict[str, int]  # what failover moved where since the last report
    caught_up: list[str]  # spool topics whose feed was caught up at some moment since the last report
    from_memory: int  # events the feeds took from memory (relayed), not from the store


class DeliveryProcess:
    """The parent's handle on the delivery child: starts, mirrors, restarts and stops it."""

    def __init__(self, config: Config, store: LocalStore, estimator: Estimator,
                 moved: Callable[[Mapping[str, int]], None]) -> None:
        self.config = config
        self.store = store
        self.estimator = estimator
        self._moved = moved
        self._context = multiprocessing.get_context("spawn")  # no fork: the parent runs threads
        self._process: Any = None
        self._conn: multiprocessing.connection.Connection | None = None
        self._relay: multiprocessing.connection.Connection | None = None
        self._sender: CommitSender | None = None
        self._caught_up: frozenset[str] = frozenset()  # spool topics whose child feed keeps up (last report)
        self.from_memory = 0  # events the current child's feeds took from memory, not the store (last report)
        self._ready: asyncio.Future[None] | None = None
        self._stopping = False
        self._restarts = 0
        self._drained = self._drained_base = 0
        self._lanes: Counter[str] = Counter()
        self._lanes_base: Counter[str] = Counter()
        self._spooled_in: Counter[str] = Counter()
        self._spooled_in_base: Counter[str] = Counter()
        self._unlisten: list[Callable[[], None]] = []
        self._relaunching: asyncio.Future[None] | None = None
        self.pid: int | None = None

    async def start(self) -> None:
        for name, dest in self.config.destinations.items():
            if not dest.is_local:
                topic = spool_topic(name)
                self._unlisten.append(self.store.listen(topic, functools.partial(self._committed, topic)))
        await self._launch()

    async def _launch(self) -> None:
        loop = asyncio.get_running_loop()
        conn, child_conn = self._context.Pipe()
        relay_read, relay = self._context.Pipe(duplex=False)
        process = self._context.Process(target=child_main, name="umcef-delivery", daemon=False,
                                        args=(self.config, child_conn, relay_read))
        process.start()
        child_conn.close()
        relay_read.close()
        self._process, self._conn, self._relay, self.pid = process, conn, relay, process.pid
        self._sender = CommitSender(relay.fileno())
        self._ready = loop.create_future()
        loop.add_reader(conn.fileno(), self._receive)
        loop.add_reader(process.sentinel, self._exited)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), START_SECONDS)
        except TimeoutError:
            raise RuntimeError(f"the delivery process did not start within {START_SECONDS:g} s") from None

    def _committed(self, topic: str, committed: list[Committed], gap: bool) -> None:
        if self._sender is None:
            return
        if topic not in self._caught_up:
            # The child reads this spool from the store (catching up, or starting): the records would be dropped
            # there. A gap alone says there is more to read, as soon as its feed looks.
            committed, gap = [], True
        self._sender.send(topic, committed, gap)

    def _receive(self) -> None:
        assert self._conn is not None
        try:
            message = self._conn.recv()
        except (EOFError, OSError):  # the child is gone: `_exited` takes over
            asyncio.get_running_loop().remove_reader(self._conn.fileno())
            return
        self._handle(message)

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == "ready":
            if self._ready is not None and not self._ready.done():
                self._ready.set_result(None)
        elif kind == "failed":
            if self._ready is not None and not self._ready.done():
                self._ready.set_exception(RuntimeError(message[1]))
        elif kind == "report":
            report: Report = message[1]
            self._caught_up = frozenset(report.caught_up)
            self.from_memory = report.from_memory
            self.estimator.mirror(report.health)
            self._drained = report.drained
            self._lanes = Counter(report.lanes)
            self._spooled_in = Counter(report.spooled_in)
            if report.moved:
                self._moved(report.moved)

    def drained(self) -> int:
        """What left the delivery spools since this gateway started (`DeliveryHost.drained`)."""
        return self._drained_base + self._drained

    def lane_drained(self, name: str) -> int:
        return self._lanes_base[name] + self._lanes[name]

    def lane_spooled_in(self, name: str) -> int:
        """Dead letters the children appended to `name`'s spool (`DeliveryHost.lane_spooled_in`)."""
        return self._spooled_in_base[name] + self._spooled_in[name]

    def _exited(self) -> None:
        loop = asyncio.get_running_loop()
        process = self._process
        loop.remove_reader(process.sentinel)
        if self._conn is not None:
            with contextlib.suppress(ValueError, OSError):
                loop.remove_reader(self._conn.fileno())
            with contextlib.suppress(EOFError, OSError):  # a report sent just before exiting still counts
                while self._conn.poll():
                    self._handle(self._conn.recv())
        process.join()
        self._close_pipes()
        # A new child counts from zero: keep what this one reported. (What it delivered without moving
        # the cursor is delivered again and counted twice; depths are clamped at zero.)
        self._drained_base += self._drained
        self._lanes_base.update(self._lanes)
        self._spooled_in_base.update(self._spooled_in)
        self._drained, self._lanes, self._spooled_in = 0, Counter(), Counter()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError(f"the delivery process exited at start ({process.exitcode})"))
            return
        if self._stopping:
            return
        delay = min(RESTART_BACKOFF[1], RESTART_BACKOFF[0] * 2 ** self._restarts)
        self._restarts += 1
        log.error("the delivery process exited (%s); restarting it in %.1f s", process.exitcode, delay)
        loop.call_later(delay, self._schedule_relaunch)

    def _schedule_relaunch(self) -> None:
        # Kept: the loop holds only weak references to tasks.
        self._relaunching = asyncio.ensure_future(self._relaunch())

    async def _relaunch(self) -> None:
        if self._stopping:
            return
        try:
            await self._launch()
        except Exception as exc:
            log.error("restarting the delivery process failed: %s", exc)  # its exit schedules another try

    def _close_pipes(self) -> None:
        if self._sender is not None:
            self._sender.close()
            self._sender = None
        self._caught_up = frozenset()  # a new child starts by reading the store
        for conn in (self._conn, self._relay):
            if conn is not None:
                conn.close()
        self._conn = self._relay = None

    async def stop(self, grace: float) -> None:
        """The child lets in-flight publishes finish for up to `grace` seconds and exits; killed if it has not
        exited a little after that."""
        self._stopping = True
        for unlisten in self._unlisten:
            unlisten()
        process = self._process
        if process is None or process.exitcode is not None:
            return
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send(("stop", grace))
        deadline = asyncio.get_running_loop().time() + grace + 10.0
        while process.exitcode is None and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.02)
        if process.exitcode is None:
            log.error("the delivery process did not stop in time; killing it")
            process.kill()
            await asyncio.to_thread(process.join, 5)


# -- the child ----------------------------------------------------------------------------------------------


def child_main(config: Config, conn: multiprocessing.connection.Connection,
               relay: multiprocessing.connection.Connection) -> None:
    # Ctrl-C reaches the whole process group; the parent drives this process's shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    configure_logging()
    try:
        asyncio.run(_serve(config, conn, relay))
    except Exception as exc:  # reported to the parent, which fails its start or logs the exit
        with contextlib.suppress(OSError):
            conn.send(("failed", f"delivery process: {type(exc).__name__}: {exc}"))
        raise SystemExit(1) from None


async def _serve(config: Config, conn: multiprocessing.connection.Connection,
                 relay: multiprocessing.connection.Connection) -> None:
    from umcef.fabric.gateway import build_router, open_store

    lock = await _exclusive(Path(config.data_dir) / LOCK_FILE)
    try:
        # Retention is the gateway's (the parent's) alone: two writers deleting the same events would only
        # contend for the write lock, and a child's pass at each (re)start would not follow the schedule.
        # (open_store's cursor delay matters more here: the parent's group commits contend with ours for the
        # store's write lock, and a waiting writer sleeps at least a millisecond.)
        store = open_store(config, retain=False)
        try:
            await _deliver(config, store, build_router(config), conn, relay)
        finally:
            store.close()
    finally:
        os.close(lock)


async def _deliver(config: Config, store: LocalStore, router: Any, conn: multiprocessing.connection.Connection,
                   relay: multiprocessing.connection.Connection) -> None:
    loop = asyncio.get_running_loop()
    moved: Counter[str] = Counter()
    host = DeliveryHost(config, store, router, moved.update)
    stop = asyncio.Event()
    grace = config.delivery.drain_seconds

    def from_parent() -> None:
        nonlocal grace
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the parent is gone
            stop.set()
            return
        if message[0] == "stop":
            grace = message[1]
            stop.set()

    def report() -> None:
        feeds = [w.feed for w in host.workers.values() if w.feed is not None]
        message = ("report", Report(
            health=router.estimator.snapshot(),
            drained=host.drained(),
            lanes={name: host.lane_drained(name) for name in host.workers},
            spooled_in={name: host.lane_spooled_in(name) for name in host.workers},
            moved=dict(moved),
            caught_up=[feed.topic for feed in feeds if feed.caught_up_lately()],
            from_memory=sum(feed.from_memory for feed in feeds),
        ))
        moved.clear()
        try:
            conn.send(message)
        except OSError:
            stop.set()

    receiver = CommitReceiver(relay.fileno(), store.hand_over, stop.set)  # (EOF: the parent is gone)
    loop.add_reader(relay.fileno(), receiver.readable)
    loop.add_reader(conn.fileno(), from_parent)
    host.start()
    tune_interpreter()  # this process is the gateway's own, like `umcef serve`
    conn.send(("ready",))
    try:
        while not stop.is_set():
            report()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), REPORT_SECONDS)
    finally:
        loop.remove_reader(relay.fileno())
        loop.remove_reader(conn.fileno())
        await host.stop(grace)
        with contextlib.suppress(OSError):
            report()


async def _exclusive(path: Path) -> int:
    """An exclusive lock on `path`, waiting for a predecessor (whose gateway was killed) to finish."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + LOCK_WAIT_SECONDS
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            if loop.time() > deadline:
                os.close(fd)
                raise RuntimeError(f"another delivery process holds {path}") from None
            await asyncio.sleep(0.05)
