"""Assembles a running gateway from a `Config`: store, pipeline, ingress, delivery workers and sources."""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from umcef.adapters import open_adapter
from umcef.adapters.local import LocalStore, Retention, TrimConsumed
from umcef.fabric import spools
from umcef.fabric.backpressure import CLASSES, Lane, SpoolGauge, backlog
from umcef.fabric.config import DEAD_LETTER, DEFAULTS_SOURCE, Config, SpoolLimit
from umcef.fabric.deadletter import DeadLetterQueue
from umcef.fabric.dedup import DedupStore, DedupWindow
from umcef.fabric.delivery import CURSOR_GROUP, SPOOL_PREFIX, DeliveryWorker
from umcef.fabric.delivery_host import DeliveryHost, destination_topics, finish
from umcef.fabric.delivery_host import RoutedAdapter as RoutedAdapter  # where tests and users found it
from umcef.fabric.ingress.http_server import start_http_server
from umcef.fabric.pacing import Pacer
from umcef.fabric.pipeline import LocalSpool, Pipeline
from umcef.fabric.sources import SourceRunner
from umcef.router.decide import Router
from umcef.router.estimator import Estimator
from umcef.router.table import compile_table

if TYPE_CHECKING:
    from umcef.fabric.delivery_process import DeliveryProcess

log = logging.getLogger("umcef.gateway")

# How often the gateway looks for appends of other processes to the delivery spools (`umcef dlq replay`): one
# small query (the store's per-topic appended counters), never on the ingress path.
SPOOL_LOOK_SECONDS = 0.5
# A delivery spool keeps a record only until its worker's cursor passed it (the broker acknowledged it, or it
# was dead-lettered or moved by failover). `_deadletter` and local destinations' topics (no leading `_`
# allowed) never match the prefix: they age out by `store.max_age_seconds` / `max_events_per_topic` only.
TRIM_DELIVERED = TrimConsumed(SPOOL_PREFIX, CURSOR_GROUP)
# How often delivered spool records are deleted. At 10,000 events/s a spool then holds ~10,000 delivered
# records (~7 MB) beyond the undelivered ones. The cost is per record deleted (~5 us, bench/store.py), so a
# longer interval saves nothing but grows the spool; a pass with nothing to delete is one index probe per
# spool and takes no write lock, one that deletes pays a commit (without an fsync of its own) per 1,000 records.
TRIM_SECONDS = 1.0
# How long a delivery worker's cursor move (`commit_cursor_later`) may wait to ride on the next append's commit
# instead of committing (and fsyncing) alone: a lost move only redelivers, and anything a caller waits for
# ends the wait.
CURSOR_DELAY_SECONDS = 0.1


def build_router(config: Config, estimator: Estimator | None = None) -> Router:
    """Compile the route table (CESQL filters, residency, scoring) and bind it to an RTT/health estimator."""
    routing = config.routing
    estimator = estimator if estimator is not None else Estimator(routing.estimator)
    for dest in routing.destinations:
        if dest.is_local:
            estimator.pin(dest.name, 0.0)  # the durable write is the delivery
    return Router(compile_table(routing, estimator.slot), estimator, sample_every=routing.explain_sample_every)


def open_store(config: Config, *, retain: bool = True) -> LocalStore:
    """`retain=False`: another process applies the retention (and trims delivered spool records) to this store
    (the gateway's, when delivery runs in its own process), so it runs once per store, not once per writer."""
    retention = Retention(config.store.max_age_seconds, config.store.max_events_per_topic, (TRIM_DELIVERED,)) \
        if retain else Retention(None, None)
    return LocalStore(config.data_dir, sync=config.store.sync, retention=retention,  # type: ignore[arg-type]
                      fsync_interval=config.store.fsync_interval, cursor_delay=CURSOR_DELAY_SECONDS,
                      trim_interval=TRIM_SECONDS)


def build_dedup(config: Config) -> DedupStore:
    dedup = config.dedup
    if dedup.store == "redis":
        from umcef.fabric.dedup_redis import RedisDedup

        assert dedup.url is not None  # the config parser insists on it
        return RedisDedup(dedup.url, dedup.window_seconds)
    return DedupWindow(dedup.window_seconds, dedup.max_entries)


def build_pipeline(config: Config, store: LocalStore, router: Router | None = None,
                   gauge: SpoolGauge | None = None) -> Pipeline:
    return Pipeline(
        build_dedup(config),
        router if router is not None else build_router(config),
        LocalSpool(store, destination_topics(config), gauge),
        config.limits,
        backpressure=gauge,
    )


@dataclass
class Endpoints:
    http_port: int
    grpc_port: int | None


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = open_store(config)
        self.router = build_router(config)
        self.topics = destination_topics(config)
        self._spool_topics: dict[Lane, str] = {}  # each remote destination's lane -> its spool topic
        self.spool_gauge = self._spool_gauge()
        self._warn_of_orphan_spools()
        self.pipeline = build_pipeline(config, self.store, self.router, self.spool_gauge)
        # Delivery runs here (`delivery`) or in a second process (`delivery_process`), never both.
        self.delivery: DeliveryHost | None = None
        self.delivery_process: DeliveryProcess | None = None
        self.pacer = Pacer({name: (self.spool_gauge.lanes[name], dest.delivery.pace_above_events)
                            for name, dest in config.destinations.items() if not dest.is_local})
        self.dead_letters = DeadLetterQueue(self.store)
        self.sources: dict[str, SourceRunner] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._spool_look: asyncio.Task[None] | None = None
        self._http: Any = None
        self._grpc: Any = None
        self.endpoints = Endpoints(0, None)

    @property
    def workers(self) -> dict[str, DeliveryWorker]:
        """The delivery workers of this process (none when delivery runs in its own process)."""
        return self.delivery.workers if self.delivery is not None else {}

    async def start(self) -> Endpoints:
        if any(not dest.is_local for dest in self.config.destinations.values()):
            if self.config.delivery.process:
                from umcef.fabric.delivery_process import DeliveryProcess

                self.delivery_process = DeliveryProcess(self.config, self.store, self.router.estimator,
                                                        self.spool_gauge.add)
                await self.delivery_process.start()
            else:
                self.delivery = DeliveryHost(self.config, self.store, self.router, self.spool_gauge.add)
                self.delivery.start()
            self.pipeline.pace = self.pacer.room_for
        if self._spool_topics:
            self._spool_look = asyncio.create_task(self._look_at_spools(), name="spool-look")
            self._tasks.append(self._spool_look)
        server = self.config.server
        self._http, http_port = await start_http_server(self.pipeline, server.host, server.port)
        grpc_port = None
        if server.grpc_port is not None:
            from umcef.fabric.ingress.grpc_server import start_grpc_server

            self._grpc, grpc_port = await start_grpc_server(
                self.pipeline, server.host, server.grpc_port, self.config.limits)
            self._warn_of_few_grpc_calls()
        for source in self.config.sources:
            # A local source reads the gateway's own store rather than opening a second writer on it.
            shared = {"store": self.store} if source.url.startswith("local:") else {}
            adapter = open_adapter(source.url, **shared, **source.options)
            runner = SourceRunner(source.name, adapter, self.pipeline, self.dead_letters, source.max_in_flight)
            self.sources[source.name] = runner
            self._spawn(runner.run(), f"source:{source.name}")
        self.endpoints = Endpoints(http_port, grpc_port)
        return self.endpoints

    def _warn_of_orphan_spools(self) -> None:
        """A spool whose destination is no longer configured keeps its undelivered events (no retention
        deletes them): say so at start, and how to re-drive them, or they would wait unseen."""
        config = "FILE" if self.config.source == DEFAULTS_SOURCE else self.config.source
        for state in spools.orphans(self.store, spools.remote_destinations(self.config)):
            dead_letter, replay = spools.redrive_commands(state.destination, config)
            log.warning("%s holds %d undelivered events (after seq %d) but no configured destination %r "
                        "delivers it: `%s` moves them to the dead-letter queue, `%s` then re-drives them",
                        state.topic, state.undelivered, state.cursor, state.destination, dead_letter, replay)

    def _spool_gauge(self) -> SpoolGauge:
        """Backpressure: a lane per remote destination's spool, seeded with what an earlier run left."""
        bp = self.config.backpressure
        gauge = SpoolGauge(bp.max_spooled_events, bp.retry_after_seconds, self._drained,
                           max_spooled_bytes=bp.max_spooled_bytes, shed_low_at=bp.shed_low_at,
                           shed_normal_at=bp.shed_normal_at, max_in_flight_bytes=bp.max_in_flight_bytes,
                           route_classes={name: CLASSES[cls] for name, cls in bp.route_classes.items()})
        dead_letter_spool = self.topics[DEAD_LETTER]
        for name, dest in self.config.destinations.items():
            if dest.is_local:
                continue
            own = bp.destinations.get(name, SpoolLimit())
            lane = gauge.lane(Lane(name, own.max_spooled_events, own.max_spooled_bytes,
                                   functools.partial(self._lane_drained, name),
                                   spooled_in=functools.partial(self._lane_spooled_in, name)),
                              *((DEAD_LETTER,) if dest.topic == dead_letter_spool else ()))
            # Counted only as far as the largest watermark that applies (a huge backlog is not read in full).
            events, nbytes = self._backlog(
                dest.topic, max((w for w in (bp.max_spooled_events, lane.max_events) if w), default=None),
                max((w for w in (bp.max_spooled_bytes, lane.max_bytes) if w), default=None))
            lane.add(events, nbytes)
            gauge.add(events)
            self._spool_topics[lane] = dest.topic
        appended = self.store.appended()
        for lane, topic in self._spool_topics.items():
            lane.baseline(appended.get(topic, 0))
        return gauge

    def _backlog(self, topic: str, max_events: int | None, max_bytes: int | None) -> tuple[int, int]:
        after = self.store.cursor(CURSOR_GROUP, topic)
        if max_bytes is None:  # only events count: one range of the topic's index, no payload read
            return self.store.count(topic, after), 0
        return backlog(lambda seq: [(r.seq, len(r.payload)) for r in self.store.read(topic, max(seq, after), 1000)],
                       max_events, max_bytes)

    def _lane_drained(self, name: str) -> int:
        if self.delivery_process is not None:
            return self.delivery_process.lane_drained(name)
        return self.delivery.lane_drained(name) if self.delivery is not None else 0

    def _lane_spooled_in(self, name: str) -> int:
        if self.delivery_process is not None:
            return self.delivery_process.lane_spooled_in(name)
        return self.delivery.lane_spooled_in(name) if self.delivery is not None else 0

    async def _look_at_spools(self) -> None:
        """Backpressure counts what other processes (`umcef dlq replay`) append to the delivery spools: the
        store's appended counter per spool against what this process was told of (`SpoolGauge.reconcile`).
        Not the record count: trimming lowers that all the time and would hide their appends."""
        while True:
            await asyncio.sleep(SPOOL_LOOK_SECONDS)
            try:
                appended = self.store.appended()
            except Exception as exc:  # the next look may succeed; ingress goes on with the counts it has
                log.warning("counting the delivery spools failed: %r", exc)
                continue
            self.spool_gauge.reconcile({lane: appended.get(topic, 0) for lane, topic in self._spool_topics.items()})

    def _drained(self) -> int:
        if self.delivery_process is not None:
            return self.delivery_process.drained()
        return self.delivery.drained() if self.delivery is not None else 0

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._report_exit)
        self._tasks.append(task)

    @staticmethod
    def _report_exit(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %r", task.get_name(), task.exception())

    def _warn_of_few_grpc_calls(self) -> None:
        """A gRPC call holds max_body_bytes until its message is read (its size is unknown before)."""
        budget, largest = self.config.backpressure.max_in_flight_bytes, self.config.limits.max_body_bytes
        if budget is not None and largest and budget < 8 * largest:
            log.warning("backpressure.max_in_flight_bytes (%d) admits %d gRPC call(s) at once while their messages "
                        "are read (each holds limits.max_body_bytes, %d, until then): lower max_body_bytes or raise "
                        "max_in_flight_bytes", budget, max(1, budget // largest), largest)

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown (issue 5 §6): stop accepting, let in-flight publishes finish (they are durable
        on return), stop sources, let delivery workers finish the publish they have in flight for up to
        `grace` seconds (default `delivery.drain_seconds`) and cancel what is still running then; every
        event not acknowledged stays in the spool for the next start. Then close adapters and the store."""
        grace = self.config.delivery.drain_seconds if grace is None else grace
        deadline = asyncio.get_running_loop().time() + grace
        self.pipeline.closing = True
        self.pacer.stop()  # (paced publishes are durable: their answers go now)
        if self._spool_look is not None:
            self._spool_look.cancel()  # `finish` below collects it with the sources' tasks
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http is not None:
            await self._http.cleanup()
        for runner in self.sources.values():
            await runner.stop()
        await finish(self._tasks, grace)
        left = max(0.0, deadline - asyncio.get_running_loop().time())
        if self.delivery is not None:
            await self.delivery.stop(left)
        if self.delivery_process is not None:
            await self.delivery_process.stop(left)
        for runner in self.sources.values():
            await runner.adapter.close()
        await self.pipeline.dedup.close()
        self.store.close()

    @staticmethod
    def signalled() -> asyncio.Event:
        """Set by SIGINT or SIGTERM from now on. Installed before the gateway starts and says it listens: a
        supervisor may signal as soon as it sees the banner, and a signal before the handler would kill the
        process without its graceful stop."""
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        return stop

    async def run_until(self, stop: asyncio.Event) -> None:
        try:
            await stop.wait()
        finally:
            await self.stop()
