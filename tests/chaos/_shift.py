"""Helpers for the chaos tests that move traffic between destinations (latency shift, ejection/failover).

They judge *where events went* from what the brokers received, in the order the test published the events,
never from wall-clock windows (a loaded machine stretches those): a `Tracker` reads every destination topic
in the background, and `Tracker.settle()` waits — bounded, polling — until the last N events of a stream that
have arrived went to one destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.brokers import unique_name
from tests.chaos._kafka import TopicReader
from tests.conformance.target_kafka import create_topic


@dataclass
class TwoRegions:
    """Two Tansu brokers with a one-partition topic each; `eu` sits behind a LatencyProxy (`eu.proxy`)."""

    us: Any
    eu: Any
    us_topic: str
    eu_topic: str


async def two_regions(kafka_broker_factory: Callable[..., Any], prefix: str) -> TwoRegions:
    us = await asyncio.to_thread(kafka_broker_factory)
    eu = await asyncio.to_thread(kafka_broker_factory, behind_proxy=True)
    assert eu.proxy is not None
    regions = TwoRegions(us, eu, unique_name(f"{prefix}-us"), unique_name(f"{prefix}-eu"))
    await create_topic(us.bootstrap, regions.us_topic, partitions=1)
    await create_topic(eu.bootstrap, regions.eu_topic, partitions=1)
    return regions


def runs(names: Sequence[str | None]) -> str:
    """Run-length summary of destinations in publish order ("eu x120, us x300, ..."), for failure messages."""
    out: list[str] = []
    last: str | None = None
    count = 0
    for name in [*names, "\0end"]:
        if name == last:
            count += 1
            continue
        if count:
            out.append(f"{last or 'not yet'} x{count}")
        last, count = name, 1
    return ", ".join(out)


@dataclass
class Tracker:
    """Reads each destination's topic (name -> (bootstrap, topic)) and records where every event id arrived.

    `at[id]` is the first destination an id arrived at; `twice` lists ids that arrived at two destinations
    (the same id twice in one topic is an at-least-once duplicate, kept in `copies`)."""

    topics: dict[str, tuple[str, str]]
    at: dict[str, str] = field(default_factory=dict)
    twice: list[tuple[str, str, str]] = field(default_factory=list)
    copies: dict[str, int] = field(default_factory=dict)
    readers: dict[str, TopicReader] = field(default_factory=dict)
    _task: asyncio.Task[None] | None = None
    _seen: dict[str, int] = field(default_factory=dict)
    _stop: bool = False
    _stack: contextlib.AsyncExitStack = field(default_factory=contextlib.AsyncExitStack)

    async def __aenter__(self) -> Tracker:
        stack = self._stack
        for name, (bootstrap, topic) in self.topics.items():
            self.readers[name] = await stack.enter_async_context(TopicReader(bootstrap, topic))
            self._seen[name] = 0
        self._task = asyncio.ensure_future(self._run())
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._halt()
        await self._stack.aclose()

    async def _halt(self) -> None:
        self._stop = True
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 10)

    async def finish(self, seconds: float = 30) -> None:
        """Stop reading in the background, then read every topic to its current end."""
        await self._halt()
        for name, reader in self.readers.items():
            await reader.to_end(seconds)
            self._absorb(name)

    def _absorb(self, name: str) -> None:
        reader = self.readers[name]
        for record in reader.records[self._seen[name]:]:
            first = self.at.setdefault(record.ce_id, name)
            if first != name:
                self.twice.append((record.ce_id, first, name))
            self.copies[record.ce_id] = self.copies.get(record.ce_id, 0) + 1
        self._seen[name] = len(reader.records)

    async def _run(self) -> None:
        while not self._stop:
            for name, reader in self.readers.items():
                await reader.poll(100)
                self._absorb(name)

    def delivered_prefix(self, ids: Sequence[str]) -> int:
        """How many of `ids` (in publish order) have all arrived somewhere, from the first on."""
        k = 0
        for i in ids:
            if i not in self.at:
                break
            k += 1
        return k

    async def wait(self, done: Callable[[], bool], seconds: float, what: Callable[[], str]) -> float:
        """Poll until `done()`; fail with `what()` after `seconds`. Returns the seconds it took."""
        began = time.monotonic()
        while not done():
            if self._task is not None and self._task.done():
                self._task.result()  # a reader failed: raise its error
                raise AssertionError("the topic readers stopped")
            if time.monotonic() - began > seconds:
                raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what()}")
            await asyncio.sleep(0.1)
        return time.monotonic() - began

    async def settle(self, ids: Sequence[str], dest: str, last: int, seconds: float, what: Callable[[], str], *,
                     in_order: bool = True) -> int:
        """Wait until the last `last` events of `ids` (publish order) went to `dest`; returns the index in `ids`
        just after them.

        `in_order`: the last `last` of a delivered prefix (every event up to there has arrived somewhere).
        Otherwise the last `last` of those that have arrived, skipping the ones still held somewhere (a
        destination that is down keeps what was spooled for it; the newest arrivals show the current choice)."""
        end = 0

        def done() -> bool:
            nonlocal end
            if in_order:
                end = self.delivered_prefix(ids)
                return end >= last and all(self.at[i] == dest for i in ids[end - last:end])
            arrived = [k for k, i in enumerate(ids) if i in self.at][-last:]
            if len(arrived) < last or not all(self.at[ids[k]] == dest for k in arrived):
                return False
            end = arrived[-1] + 1
            return True

        await self.wait(done, seconds, what)
        return end

    def arrived_after(self, ids: Sequence[str], start: int) -> list[str]:
        """The events of `ids` from index `start` on that have arrived, in publish order."""
        return [i for i in ids[start:] if i in self.at]
