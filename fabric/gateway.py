"""Assembles a running gateway from a `Config`: store, pipeline, ingress, delivery workers and sources."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from umcef.adapters import open_adapter
from umcef.adapters.contract import Adapter, Handler, PublishOutcome, Rejected, Throttled
from umcef.adapters.local import LocalStore, Retention
from umcef.fabric.backpressure import CLASSES, Lane, SpoolGauge, backlog
from umcef.fabric.config import DEAD_LETTER, Config, DeliveryLimits, SpoolLimit
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC, DeadLetterQueue
from umcef.fabric.dedup import DedupStore, DedupWindow
from umcef.fabric.delivery import CURSOR_GROUP, SPOOL_PREFIX, DeliveryWorker, RetryPolicy, RouterFailover, spool_topic
from umcef.fabric.event import Event
from umcef.fabric.ingress.http_server import start_http_server
from umcef.fabric.pipeline import LocalSpool, Pipeline
from umcef.fabric.sources import SourceRunner
from umcef.router.decide import Router
from umcef.router.estimator import Estimator, ProbeLoop
from umcef.router.table import compile_table

log = logging.getLogger("umcef.gateway")


def build_router(config: Config, estimator: Estimator | None = None) -> Router:
    """Compile the route table (CESQL filters, residency, scoring) and bind it to an RTT/health estimator."""
    routing = config.routing
    estimator = estimator if estimator is not None else Estimator(routing.estimator)
    for dest in routing.destinations:
        if dest.is_local:
            estimator.pin(dest.name, 0.0)  # the durable write is the delivery
    return Router(compile_table(routing, estimator.slot), estimator, sample_every=routing.explain_sample_every)


class RoutedAdapter:
    """The delivery-side router layer around a destination's adapter (composed like a tower layer):

    - residency is checked again just before publishing: an event the active table does not allow here
      (it was spooled under an older table) is `Rejected`, so delivery dead-letters it with the reason;
    - every publish reports its latency (acknowledged) or failure (nothing acknowledged, not a
      per-event rejection or throttling) to the estimator, next to the probes."""

    def __init__(self, inner: Adapter, name: str, router: Router) -> None:
        self.inner = inner
        self.name = name
        self.router = router
        self.url = inner.url
        self.capabilities = inner.capabilities

    def encoded_size(self, event: Event) -> int:
        return self.inner.encoded_size(event)

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        outcomes: list[PublishOutcome | None] = []
        allowed: list[Event] = []
        for event in batch:
            why = self.router.residency_violation(event, self.name)
            outcomes.append(None if why is None else PublishOutcome(event.id, Rejected(why)))
            if why is None:
                allowed.append(event)
        if not allowed:
            return [o for o in outcomes if o is not None]
        estimator = self.router.estimator
        started = time.perf_counter()
        try:
            results = await self.inner.publish(allowed)
        except Exception as exc:
            estimator.failure(self.name, f"publish raised {type(exc).__name__}: {exc}")
            raise
        elapsed = time.perf_counter() - started
        if any(r.error is None for r in results):
            estimator.delivered(self.name, elapsed)
        else:
            failures = [r.error for r in results if not isinstance(r.error, Rejected | Throttled)]
            if failures:
                estimator.failure(self.name, f"{type(failures[0]).__name__}: {failures[0]}")
        published = iter(results)
        return [o if o is not None else next(published) for o in outcomes]

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        await self.inner.consume(handler, max_in_flight=max_in_flight)

    async def stop_consuming(self) -> None:
        await self.inner.stop_consuming()

    async def probe(self) -> float:
        return await self.inner.probe()

    async def close(self) -> None:
        await self.inner.close()


def open_store(config: Config) -> LocalStore:
    retention = Retention(config.store.max_age_seconds, config.store.max_events_per_topic)
    return LocalStore(config.data_dir, sync=config.store.sync, retention=retention,  # type: ignore[arg-type]
                      fsync_interval=config.store.fsync_interval)


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


def destination_topics(config: Config) -> dict[str, str]:
    """Destination name -> topic: local destinations are written to their topic, remote ones to the spool
    topic their worker drains; `_deadletter` (router refusals) to the configured dead-letter destination."""
    topics = {name: d.topic for name, d in config.destinations.items()}
    target = config.delivery.defaults.dead_letter
    topics[DEAD_LETTER] = DEAD_LETTER if target == DEAD_LETTER else config.destinations[target].topic
    return topics


def retry_policy(limits: DeliveryLimits) -> RetryPolicy:
    return RetryPolicy(limits.backoff_base_seconds, limits.backoff_cap_seconds, limits.max_attempts,
                       limits.max_age_seconds)


@dataclass
class Endpoints:
    http_port: int
    grpc_port: int | None


class Gateway:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.store = open_store(config)
        self.router = build_router(config)
        self.adapters: dict[str, Adapter] = {}
        self.workers: dict[str, DeliveryWorker] = {}
        self.topics = destination_topics(config)
        self.spool_gauge = self._spool_gauge()
        self.pipeline = build_pipeline(config, self.store, self.router, self.spool_gauge)
        self.probes: ProbeLoop | None = None
        self.dead_letters = DeadLetterQueue(self.store)
        self._worker_dead_letters: list[DeadLetterQueue] = []
        self._dead_letter_spools: list[DeadLetterQueue] = []
        self.sources: dict[str, SourceRunner] = {}
        self._tasks: list[asyncio.Task[None]] = []
        self._http: Any = None
        self._grpc: Any = None
        self.endpoints = Endpoints(0, None)

    async def start(self) -> Endpoints:
        for name, dest in self.config.destinations.items():
            if not dest.is_local:
                adapter = open_adapter(dest.url, **dest.options)
                self.adapters[name] = adapter
                page = self.config.routing.destination(name).max_in_flight
                # A DLQ per worker: its count is what left this spool by dead-lettering (backpressure).
                limits = dest.delivery
                # `_deadletter` named here means the local topic itself, not the global target (which may be
                # a remote destination whose own dead letters would otherwise loop back into its spool).
                dlq_topic = DEAD_LETTER_TOPIC if limits.dead_letter == DEAD_LETTER else self.topics[limits.dead_letter]
                dead_letters = DeadLetterQueue(self.store, dlq_topic)
                self._worker_dead_letters.append(dead_letters)
                if dlq_topic.startswith(SPOOL_PREFIX):  # dead letters to a remote destination wait in its spool
                    self._dead_letter_spools.append(dead_letters)
                failover = RouterFailover(name, self.router, self.store, self.topics, self.spool_gauge.add)
                self.workers[name] = DeliveryWorker(name, RoutedAdapter(adapter, name, self.router), self.store,
                                                    dead_letters, policy=retry_policy(limits), page_size=page,
                                                    failover=failover, memory_capacity=limits.memory_events,
                                                    pages_in_flight=limits.pages_in_flight)
                self._spawn(self.workers[name].run(), f"deliver:{name}")
        if self.adapters:
            self.probes = ProbeLoop(self.router.estimator, {n: a.probe for n, a in self.adapters.items()})
            self._spawn(self.probes.run(), "probe")
        server = self.config.server
        self._http, http_port = await start_http_server(self.pipeline, server.host, server.port)
        grpc_port = None
        if server.grpc_port is not None:
            from umcef.fabric.ingress.grpc_server import start_grpc_server

            self._grpc, grpc_port = await start_grpc_server(
                self.pipeline, server.host, server.grpc_port, self.config.limits)
        for source in self.config.sources:
            # A local source reads the gateway's own store rather than opening a second writer on it.
            shared = {"store": self.store} if source.url.startswith("local:") else {}
            adapter = open_adapter(source.url, **shared, **source.options)
            runner = SourceRunner(source.name, adapter, self.pipeline, self.dead_letters, source.max_in_flight)
            self.sources[source.name] = runner
            self._spawn(runner.run(), f"source:{source.name}")
        self.endpoints = Endpoints(http_port, grpc_port)
        return self.endpoints

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
                                   functools.partial(self._lane_drained, name)),
                              *((DEAD_LETTER,) if dest.topic == dead_letter_spool else ()))
            # Counted only as far as the largest watermark that applies (a huge backlog is not read in full).
            events, nbytes = self._backlog(
                dest.topic, max((w for w in (bp.max_spooled_events, lane.max_events) if w), default=None),
                max((w for w in (bp.max_spooled_bytes, lane.max_bytes) if w), default=None))
            lane.add(events, nbytes)
            gauge.add(events)
        return gauge

    def _backlog(self, topic: str, max_events: int | None, max_bytes: int | None) -> tuple[int, int]:
        after = self.store.cursor(CURSOR_GROUP, topic)
        return backlog(lambda seq: [(r.seq, len(r.payload)) for r in self.store.read(topic, max(seq, after), 1000)],
                       max_events, max_bytes)

    def _lane_drained(self, name: str) -> int:
        """What left `name`'s spool in this run: its worker's drained and dead-lettered events, minus the
        dead letters other workers appended to it (it is their dead-letter destination)."""
        topic = spool_topic(name)
        worker = self.workers.get(name)
        out = worker.drained + worker.dead_letters.count if worker is not None else 0
        return out - sum(w.dead_letters.count for w in self.workers.values() if w.dead_letters.topic == topic)

    def _drained(self) -> int:
        """Events that left the delivery spools in this run: acknowledged, moved by failover (the move adds
        them to their new spool) or dead-lettered (minus dead letters that went into another spool)."""
        return (sum(w.drained for w in self.workers.values()) + sum(d.count for d in self._worker_dead_letters)
                - sum(d.count for d in self._dead_letter_spools))

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(self._report_exit)
        self._tasks.append(task)

    @staticmethod
    def _report_exit(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("%s stopped: %r", task.get_name(), task.exception())

    async def stop(self, grace: float | None = None) -> None:
        """Graceful shutdown (issue 5 §6): stop accepting, let in-flight publishes finish (they are durable
        on return), stop sources, let delivery workers finish the publish they have in flight for up to
        `grace` seconds (default `delivery.drain_seconds`) and cancel what is still running then; every
        event not acknowledged stays in the spool for the next start. Then close adapters and the store."""
        grace = self.config.delivery.drain_seconds if grace is None else grace
        self.pipeline.closing = True
        if self._grpc is not None:
            await self._grpc.stop(grace)
        if self._http is not None:
            await self._http.cleanup()
        for runner in self.sources.values():
            await runner.stop()
        for worker in self.workers.values():
            await worker.stop()
        if self.probes is not None:
            await self.probes.stop()
        if self._tasks:
            _done, pending = await asyncio.wait(self._tasks, timeout=grace)
            for task in pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.gather(*pending, return_exceptions=True)
        for runner in self.sources.values():
            await runner.adapter.close()
        for adapter in self.adapters.values():
            await adapter.close()
        await self.pipeline.dedup.close()
        self.store.close()

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            await self.stop()
