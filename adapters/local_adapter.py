"""The `local://TOPIC` adapter: the embedded durable log (`LocalStore`) behind the broker contract.

URL: `local://TOPIC?dir=PATH&group=G`. The gateway passes its own open store as `store=` so sinks and
sources share one writer; `dir` opens a store that must already exist (created by `umcef serve`),
otherwise the adapter answers `NotFound`. Consumer groups keep a committed cursor per topic, so a
crashed consumer's unacknowledged events are delivered again to the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import orjson

from umcef.adapters.contract import (
    Capabilities,
    Handler,
    NotFound,
    PublishOutcome,
    Rejected,
    Transient,
)
from umcef.adapters.local import DB_FILENAME, LocalStore, Record, StoredEvent
from umcef.fabric.errors import EventError
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

DEFAULT_MAX_EVENT_BYTES = 1024 * 1024


class LocalDelivery:
    __slots__ = ("_consumer", "attempt", "event", "seq", "settled")

    def __init__(self, consumer: _Consumer, stored: StoredEvent, event: Event, attempt: int) -> None:
        self._consumer = consumer
        self.seq = stored.seq
        self.event = event
        self.attempt = attempt
        self.settled = False

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            self._consumer.acked(self.seq)

    async def nack(self, *, requeue_after: float | None = None) -> None:
        if not self.settled:
            self.settled = True
            self._consumer.nacked(self, requeue_after or 0.0)


class _Consumer:
    """Cursor bookkeeping for one consume() call: the committed cursor never passes an unacked event."""

    def __init__(self, adapter: LocalAdapter, start: int) -> None:
        self.adapter = adapter
        self.after = start  # highest seq read from the log
        self.outstanding: set[int] = set()
        self.retry: list[tuple[float, int, StoredEvent, int]] = []  # (due, seq, stored, attempt)
        self.stored: dict[int, StoredEvent] = {}
        self.committed = start

    def committable(self) -> int:
        return min(self.outstanding) - 1 if self.outstanding else self.after

    def acked(self, seq: int) -> None:
        self.outstanding.discard(seq)
        self.stored.pop(seq, None)

    async def commit(self) -> None:
        """Persist the cursor; called by the consume loop every few ms rather than per ack, so acks
        cost no store transaction each (the cursor is at-least-once anyway)."""
        position = self.committable()
        if position > self.committed:
            await self.adapter.store.commit_cursor_async(self.adapter.group, self.adapter.topic, position)
            self.committed = position

    def nacked(self, delivery: LocalDelivery, delay: float) -> None:
        stored = self.stored[delivery.seq]
        heapq.heappush(self.retry, (time.monotonic() + delay, delivery.seq, stored, delivery.attempt + 1))


class LocalAdapter:
    def __init__(self, url: str, topic: str, store: LocalStore, *, group: str = "default", owns_store: bool = False,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES) -> None:
        self.url = url
        self.topic = topic
        self.store = store
        self.group = group
        self._owns_store = owns_store
        self.capabilities = Capabilities(max_event_bytes=max_event_bytes, max_attributes=None, ordering=True,
                                         native_dedup=False, max_batch=10_000, dead_letter=False)
        self._stop = asyncio.Event()

    def encoded_size(self, event: Event) -> int:
        return len(json_format.encode(event))

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        outcomes: list[PublishOutcome] = []
        records: list[Record] = []
        limit = self.capabilities.max_event_bytes
        for event in batch:
            payload = json_format.encode(event)
            if len(payload) > limit:
                outcomes.append(PublishOutcome(event.id, Rejected(
                    f"event of {len(payload)} bytes exceeds the local store's limit of {limit} bytes")))
                continue
            key = event.attributes.get("partitionkey") or event.id
            records.append(Record(self.topic, payload, str(key)))
            outcomes.append(PublishOutcome(event.id))
        if records:
            try:
                await self.store.append(records)
            except (OSError, RuntimeError) as exc:
                error = Transient(f"local store write failed: {exc}")
                return [o if o.error else PublishOutcome(o.event_id, error) for o in outcomes]
        return outcomes

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        self._stop.clear()
        consumer = _Consumer(self, self.store.cursor(self.group, self.topic))
        slots = asyncio.Semaphore(max_in_flight)
        running: set[asyncio.Task[None]] = set()

        async def run(delivery: LocalDelivery) -> None:
            try:
                await handler(delivery)
            except Exception:
                await delivery.nack()
            else:
                await delivery.ack()
            finally:
                slots.release()

        try:
            while not self._stop.is_set():
                due = self._due(consumer)
                fresh = [] if due else self.store.read(self.topic, consumer.after, max_in_flight)
                for stored, attempt in due + [(s, 1) for s in fresh]:
                    await slots.acquire()
                    if self._stop.is_set():
                        slots.release()
                        break
                    consumer.after = max(consumer.after, stored.seq)
                    consumer.outstanding.add(stored.seq)
                    consumer.stored[stored.seq] = stored
                    try:
                        event = json_format.decode(stored.payload)
                    except EventError:
                        consumer.acked(stored.seq)  # not an event (written by hand): skip, never block the log
                        slots.release()
                        continue
                    task = asyncio.create_task(run(LocalDelivery(consumer, stored, event, attempt)))
                    running.add(task)
                    task.add_done_callback(running.discard)
                await consumer.commit()
                if not due and not fresh:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._stop.wait(), 0.05)
        except asyncio.CancelledError:
            # A crash: unsettled deliveries stay unacked (the cursor stays behind them) and are redelivered.
            for task in running:
                task.cancel()
            raise
        finally:
            if running:
                await asyncio.gather(*running, return_exceptions=True)
        await consumer.commit()  # a clean stop persists what the handlers acknowledged

    @staticmethod
    def _due(consumer: _Consumer) -> list[tuple[StoredEvent, int]]:
        now = time.monotonic()
        due = []
        while consumer.retry and consumer.retry[0][0] <= now:
            _, _, stored, attempt = heapq.heappop(consumer.retry)
            due.append((stored, attempt))
        return due

    async def stop_consuming(self) -> None:
        self._stop.set()

    async def probe(self) -> float:
        started = time.perf_counter()
        try:
            self.store.last_seq(self.topic)
        except (OSError, RuntimeError) as exc:
            raise Transient(f"local store unavailable: {exc}") from None
        return max(time.perf_counter() - started, 1e-9)

    async def close(self) -> None:
        self._stop.set()
        if self._owns_store:
            self.store.close()


def from_url(url: str, *, store: LocalStore | None = None, **_: Any) -> LocalAdapter:
    topic, query = _parse(url)
    group = query.get("group", "default")
    if store is not None:
        return LocalAdapter(url, topic, store, group=group)
    directory = Path(query.get("dir", "umcef-data"))
    return _open_dir(url, topic, directory, group)


def check_url(url: str, **_: Any) -> None:
    """Raises what `from_url` would for this URL, opening nothing (configuration checks)."""
    _parse(url)


def _parse(url: str) -> tuple[str, dict[str, str]]:
    parts = urlsplit(url)
    topic = (parts.netloc + parts.path).strip("/")
    if not topic or "/" in topic:
        raise ValueError(f"expected local://TOPIC, got {url!r}")
    return topic, {k: v[-1] for k, v in parse_qs(parts.query).items()}


def _open_dir(url: str, topic: str, directory: Path, group: str) -> LocalAdapter:
    if directory.is_dir() and not (directory / DB_FILENAME).exists():
        return _Missing(url, topic, f"no local store in {directory}")  # type: ignore[return-value]
    try:
        store = LocalStore(directory)
    except (OSError, ValueError) as exc:
        return _Missing(url, topic, f"local store {directory} unavailable: {exc}",  # type: ignore[return-value]
                        transient=True)
    return LocalAdapter(url, topic, store, group=group, owns_store=True)


class _Missing:
    """An adapter for a store that is not there: every call fails with the classified error."""

    def __init__(self, url: str, topic: str, reason: str, transient: bool = False) -> None:
        self.url = url
        self.capabilities = Capabilities(DEFAULT_MAX_EVENT_BYTES, None, True, False, 10_000, False)
        self._error = Transient(reason) if transient else NotFound(reason)

    def encoded_size(self, event: Event) -> int:
        return len(orjson.dumps(json_format.event_to_dict(event)))

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        return [PublishOutcome(e.id, self._error) for e in batch]

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        raise self._error

    async def stop_consuming(self) -> None:
        return None

    async def probe(self) -> float:
        raise self._error if isinstance(self._error, Transient) else Transient(str(self._error))

    async def close(self) -> None:
        return None
