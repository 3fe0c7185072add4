"""The delivery side of a gateway: one worker per remote destination draining its spool, their adapters,
dead-letter queues and failover, and the probe loop feeding the router's estimator.

It runs inside the gateway's process, or on its own in a second process (`delivery.process: true`,
`umcef.fabric.delivery_process`); either way the spool in the store is the only hand-over from ingress.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from umcef.adapters import open_adapter
from umcef.adapters.contract import Adapter, Handler, PublishOutcome, Rejected, Throttled
from umcef.adapters.local import LocalStore
from umcef.fabric.config import DEAD_LETTER, Config, DeliveryLimits
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC, DeadLetterQueue
from umcef.fabric.delivery import (
    ALIVE_GROUP,
    ALIVE_INTERVAL,
    SPOOL_PREFIX,
    DeliveryWorker,
    RetryPolicy,
    RouterFailover,
    spool_topic,
)
from umcef.fabric.event import Event
from umcef.router.decide import Router
from umcef.router.estimator import ProbeLoop

log = logging.getLogger("umcef.delivery")


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


def retry_policy(limits: DeliveryLimits) -> RetryPolicy:
    return RetryPolicy(limits.backoff_base_seconds, limits.backoff_cap_seconds, limits.max_attempts,
                       limits.max_age_seconds)


def destination_topics(config: Config) -> dict[str, str]:
    """Destination name -> topic: local destinations are written to their topic, remote ones to the spool
    topic their worker drains; `_deadletter` (router refusals) to the configured dead-letter destination."""
    topics = {name: d.topic for name, d in config.destinations.items()}
    target = config.delivery.defaults.dead_letter
    topics[DEAD_LETTER] = DEAD_LETTER if target == DEAD_LETTER else config.destinations[target].topic
    return topics


class DeliveryHost:
    """Starts and stops the delivery workers; counts what left each spool (for backpressure).

    `moved` is told how many events failover appended to other destinations' spools, by destination name."""

    def __init__(self, config: Config, store: LocalStore, router: Router,
                 moved: Callable[[Mapping[str, int]], None]) -> None:
        self.config = config
        self.store = store
        self.router = router
        self.topics = destination_topics(config)
        self.adapters: dict[str, Adapter] = {}
        self.workers: dict[str, DeliveryWorker] = {}
        self.probes: ProbeLoop | None = None
        self._moved = moved
        self._dead_letters: list[DeadLetterQueue] = []  # one per worker
        self._dead_letter_spools: list[DeadLetterQueue] = []  # those whose target is a remote spool
        self._tasks: list[asyncio.Task[None]] = []
        self._alive: asyncio.Task[None] | None = None

    def start(self) -> None:
        for name, dest in self.config.destinations.items():
            if dest.is_local:
                continue
            adapter = open_adapter(dest.url, **dest.options)
            self.adapters[name] = adapter
            page = self.config.routing.destination(name).max_in_flight
            limits = dest.delivery
            # `_deadletter` named here means the local topic itself, not the global target (which may be a
            # remote destination whose own dead letters would otherwise loop back into its spool).
            dlq_topic = DEAD_LETTER_TOPIC if limits.dead_letter == DEAD_LETTER else self.topics[limits.dead_letter]
            dead_letters = DeadLetterQueue(self.store, dlq_topic)  # its count: what left by dead-lettering
            self._dead_letters.append(dead_letters)
            if dlq_topic.startswith(SPOOL_PREFIX):  # dead letters to a remote destination wait in its spool
                self._dead_letter_spools.append(dead_letters)
            failover = RouterFailover(name, self.router, self.store, self.topics, self._moved)
            worker = DeliveryWorker(name, RoutedAdapter(adapter, name, self.router), self.store, dead_letters,
                                    policy=retry_policy(limits), page_size=page, failover=failover,
                                    memory_capacity=limits.memory_events, pages_in_flight=limits.pages_in_flight)
            self.workers[name] = worker
            if limits.pace_above_events is not None and limits.pace_above_events >= limits.memory_events:
                log.warning("%s: pace_above_events (%d) is not below memory_events (%d): under a sustained "
                            "overload its hand-off overflows and it reads the spool back from the store before "
                            "ingress is paced to it", name, limits.pace_above_events,
                            limits.memory_events)
            self._spawn(worker.run(), f"deliver:{name}")
        if self.adapters:
            self.probes = ProbeLoop(self.router.estimator, {n: a.probe for n, a in self.adapters.items()})
            self._spawn(self.probes.run(), "probe")
            self._alive = asyncio.create_task(self._say_alive(), name="delivery-alive")
            self._alive.add_done_callback(_report_exit)

    async def _say_alive(self) -> None:
        """Marks the spools this host delivers (ALIVE_GROUP), so that no CLI empties one under its worker."""
        while True:
            now = int(time.time())
            for name in self.workers:  # lazy: rides on the next append's commit, or waits for cursor_delay
                self.store.commit_cursor_later(ALIVE_GROUP, spool_topic(name), now)
            await asyncio.sleep(ALIVE_INTERVAL)

    def _spawn(self, work: Any, name: str) -> None:
        task = asyncio.create_task(work, name=name)
        task.add_done_callback(_report_exit)
        self._tasks.append(task)

    def lane_drained(self, name: str) -> int:
        """What left `name`'s spool in this run: its worker's drained and dead-lettered events, minus the
        dead letters other workers appended to it (`lane_spooled_in`)."""
        worker = self.workers.get(name)
        out = worker.drained + worker.dead_letters.count if worker is not None else 0
        return out - self.lane_spooled_in(name)

    def lane_spooled_in(self, name: str) -> int:
        """Dead letters other workers appended to `name`'s spool in this run (it is their dead-letter
        destination): backpressure tells them from appends by other processes."""
        topic = spool_topic(name)
        return sum(w.dead_letters.count for w in self.workers.values() if w.dead_letters.topic == topic)

    def drained(self) -> int:
        """Events that left the delivery spools in this run: acknowledged, moved by failover (the move adds
        them to their new spool) or dead-lettered (minus dead letters that went into another spool)."""
        return (sum(w.drained for w in self.workers.values()) + sum(d.count for d in self._dead_letters)
                - sum(d.count for d in self._dead_letter_spools))

    async def stop(self, grace: float) -> None:
        """Workers finish the publish they have in flight for up to `grace` seconds, then are cancelled;
        whatever is not acknowledged stays in the spool. Adapters are closed."""
        for worker in self.workers.values():
            await worker.stop()
        if self.probes is not None:
            await self.probes.stop()
        await finish(self._tasks, grace)
        if self._alive is not None:
            self._alive.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._alive
            with contextlib.suppress(RuntimeError):  # a store closed under us: the mark expires by itself
                for name in self.workers:  # stopped cleanly: no need to wait for the mark to expire
                    self.store.commit_cursor_later(ALIVE_GROUP, spool_topic(name), 0)
        for adapter in self.adapters.values():
            await adapter.close()


async def finish(tasks: list[asyncio.Task[None]], grace: float) -> None:
    """Wait up to `grace` seconds for `tasks` to end by themselves, then cancel the rest."""
    if not tasks:
        return
    _done, pending = await asyncio.wait(tasks, timeout=grace)
    for task in pending:
        task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.gather(*pending, return_exceptions=True)


def _report_exit(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("%s stopped: %r", task.get_name(), task.exception())
