"""Deliver step: one worker per remote destination drains its durable spool into the broker adapter.

The spool is a topic of the local store (`_spool.<destination>`), written in the same group commit
that made the event durable for its 202. The worker publishes a page at a time, retries what failed
with exponential backoff and full jitter, dead-letters what the broker can never take, and only then
moves its cursor: after a crash everything not yet acknowledged by the broker is delivered again
(at-least-once; consumers dedup on `source` + `id`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Sequence
from dataclasses import dataclass

from umcef.adapters.contract import Adapter, AdapterError, Throttled
from umcef.adapters.local import LocalStore, StoredEvent
from umcef.fabric.deadletter import DeadLetterQueue
from umcef.fabric.errors import EventError
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

log = logging.getLogger("umcef.delivery")
CURSOR_GROUP = "delivery"
SPOOL_PREFIX = "_spool."


def spool_topic(destination: str) -> str:
    return SPOOL_PREFIX + destination


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_seconds: float = 0.1
    cap_seconds: float = 30.0
    max_attempts: int | None = None  # None: retry transient failures until the broker takes the event

    def backoff(self, attempt: int, floor: float = 0.0) -> float:
        """Full jitter: uniform(0, min(cap, base * 2^attempt)), never below a broker-given floor."""
        return max(floor, random.uniform(0, min(self.cap_seconds, self.base_seconds * 2**attempt)))


class DeliveryWorker:
    def __init__(self, destination: str, adapter: Adapter, store: LocalStore, dead_letters: DeadLetterQueue, *,
                 policy: RetryPolicy = RetryPolicy(), page_size: int = 500) -> None:
        self.destination = destination
        self.adapter = adapter
        self.store = store
        self.topic = spool_topic(destination)
        self.policy = policy
        self.page_size = page_size
        self.dead_letters = dead_letters
        self.delivered = 0
        self._stopping = asyncio.Event()

    async def run(self) -> None:
        after = self.store.cursor(CURSOR_GROUP, self.topic)
        pages = self.store.follow_batches(self.topic, after, batch=self.page_size)
        stopping = asyncio.ensure_future(self._stopping.wait())
        try:
            while not self._stopping.is_set():
                # Wait for the next page or for stop(), whichever comes first: an idle spool must not
                # keep a stopping worker alive.
                next_page = asyncio.ensure_future(anext(pages))
                await asyncio.wait({next_page, stopping}, return_when=asyncio.FIRST_COMPLETED)
                if not next_page.done():
                    next_page.cancel()
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await next_page
                    return
                try:
                    page = next_page.result()
                except StopAsyncIteration:  # the store was closed
                    return
                if not await self._deliver(page):
                    return  # stopping mid-retry: the page stays in the spool for the next start
                await self.store.commit_cursor_async(CURSOR_GROUP, self.topic, page[-1].seq)
        finally:
            stopping.cancel()
            await pages.aclose()

    async def stop(self) -> None:
        self._stopping.set()

    async def _deliver(self, page: Sequence[StoredEvent]) -> bool:
        """True once every event of the page is acknowledged by the broker or dead-lettered."""
        pending: list[Event] = []
        for stored in page:
            try:
                pending.append(json_format.decode(stored.payload))
            except EventError as exc:  # cannot happen for spooled events; never block the spool on one
                await self.dead_letters.put_raw(stored.payload, stored.key, f"undecodable spool record: {exc}")
        attempt = 0
        while pending:
            outcomes = await self.adapter.publish(pending)
            retry: list[Event] = []
            floor = 0.0
            for event, outcome in zip(pending, outcomes, strict=True):
                error = outcome.error
                if error is None:
                    self.delivered += 1
                elif not error.retryable:
                    await self._dead_letter(event, error, attempt + 1)
                else:
                    retry.append(event)
                    if isinstance(error, Throttled):
                        floor = max(floor, error.retry_after)
            if not retry:
                return True
            attempt += 1
            last = next(o.error for o in outcomes if o.error is not None and o.error.retryable)
            if self.policy.max_attempts is not None and attempt >= self.policy.max_attempts:
                for event in retry:
                    await self._dead_letter(event, last, attempt)
                return True
            delay = self.policy.backoff(attempt, floor)
            log.warning("%s: %d events failed (%s); retry %d in %.2fs", self.destination, len(retry), last,
                        attempt, delay)
            try:
                await asyncio.wait_for(self._stopping.wait(), delay)
                return False
            except TimeoutError:
                pending = retry
        return True

    async def _dead_letter(self, event: Event, error: AdapterError | None, attempts: int) -> None:
        reason = f"{type(error).__name__}: {error}" if error is not None else "unknown"
        await self.dead_letters.put(event, reason, destination=self.destination, attempts=attempts)
