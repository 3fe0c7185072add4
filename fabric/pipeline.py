"""The one data path: decode → validate → dedup → route → spool → deliver (DESIGN.md §1).

Ingress servers decode and validate with the codec of their mode (that is the `decode`/`validate`
step, fused for speed) and hand events to `Pipeline.publish`, which runs the rest and returns only
once every accepted event is durable. Every ingress — HTTP, gRPC, sources, the demo — calls this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from umcef.adapters.local import LocalStore, Record
from umcef.fabric.backpressure import SpoolGauge
from umcef.fabric.bindings import http as http_binding
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC
from umcef.fabric.dedup import Claim, DedupStore, DedupUnavailable, Key
from umcef.fabric.delivery import SPOOL_PREFIX
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.limits import Limits

log = logging.getLogger("umcef.pipeline")


class Overloaded(Exception):
    """Backpressure: the caller should retry after `retry_after` seconds (HTTP 429, gRPC RESOURCE_EXHAUSTED)."""

    def __init__(self, reason: str, retry_after: float = 1.0) -> None:
        self.retry_after = retry_after
        super().__init__(reason)


class ShuttingDown(Exception):
    """The gateway is draining and accepts nothing new (HTTP 503, gRPC UNAVAILABLE)."""


@dataclass(frozen=True, slots=True)
class PublishResult:
    ids: list[str]
    duplicates: list[str] = field(default_factory=list)


class Routed(Protocol):
    """What a router's decision offers the pipeline (umcef.router.decide.Decision)."""

    @property
    def destinations(self) -> tuple[str, ...]: ...

    @property
    def reason(self) -> str | None: ...  # set: (part of) the event could not be routed; dead-letter a copy


class Router(Protocol):
    """Destination names for an event: a plain tuple (every name gets the event), or a decision whose
    `reason`, when set, sends a copy of the event to the dead-letter queue with that reason (residency
    leaves no allowed destination: the event must not go anywhere else)."""

    def route(self, event: Event) -> tuple[str, ...] | Routed: ...


DEAD_LETTER = "_deadletter"
"""The spool's pseudo-destination for events the router could not route (destination names starting
with '_' are reserved)."""


class Spool(Protocol):
    async def write(self, events: Sequence[Event], destinations: Sequence[tuple[str, ...]]) -> None: ...


class LocalSpool:
    """Spool step for `local://` destinations: the durable log *is* the destination, so the write that
    makes an event durable also delivers it. Remote destinations get a spool + delivery workers with
    the adapters."""

    def __init__(self, store: LocalStore, topics: Mapping[str, str], gauge: SpoolGauge | None = None) -> None:
        self.store = store
        self.topics = dict(topics)  # destination name -> topic
        self.topics.setdefault(DEAD_LETTER, DEAD_LETTER_TOPIC)
        self.spooled = {name for name, topic in self.topics.items() if topic.startswith(SPOOL_PREFIX)}
        self.gauge = gauge  # told how many records went to delivery spools (backpressure)

    async def write(self, events: Sequence[Event], destinations: Sequence[tuple[str, ...]]) -> None:
        records: list[Record] = []
        for event, names in zip(events, destinations, strict=True):
            payload = json_format.encode(event)
            key = event.attributes.get("partitionkey") or event.id
            records.extend(Record(self.topics[name], payload, str(key)) for name in names)
        await self.store.append(records)
        if self.gauge is not None and self.spooled:
            self.gauge.add(sum(name in self.spooled for names in destinations for name in names))


class Pipeline:
    def __init__(self, dedup: DedupStore, router: Router, spool: Spool, limits: Limits,
                 max_in_flight: int = 10_000, backpressure: SpoolGauge | None = None) -> None:
        self.dedup = dedup
        self.backpressure = backpressure
        self.router = router
        self.spool = spool
        self.limits = limits
        self.max_in_flight = max_in_flight
        self.in_flight = 0
        self.closing = False

    async def ingest_http(self, headers: Mapping[str, str], body: bytes) -> PublishResult:
        """HTTP ingress: decode + validate the request in whatever mode it uses, then publish."""
        return await self.publish(http_binding.decode_request(headers, body, self.limits))

    async def publish(self, events: list[Event]) -> PublishResult:
        if self.closing:
            raise ShuttingDown("the gateway is shutting down")
        # An idle pipeline takes any batch, so a batch above the limit cannot be refused forever.
        if self.in_flight and self.in_flight + len(events) > self.max_in_flight:
            raise Overloaded(f"{self.in_flight} events in flight, limit {self.max_in_flight}")
        if self.backpressure is not None:
            why = self.backpressure.refuse(len(events), self.in_flight)
            if why is not None:
                raise Overloaded(why, self.backpressure.retry_after_seconds)
        self.in_flight += len(events)
        try:
            return await self._publish(events)
        finally:
            self.in_flight -= len(events)

    async def _publish(self, events: list[Event]) -> PublishResult:
        unique: list[Event] = []
        duplicates: list[str] = []
        batch_keys: set[Key] = set()
        for event in events:
            key = (event.source, event.id)
            if key in batch_keys:
                duplicates.append(event.id)
                continue
            batch_keys.add(key)
            unique.append(event)
        try:
            claims: list[Claim] = await self.dedup.claim_batch([(e.source, e.id) for e in unique])
        except DedupUnavailable as exc:
            raise Overloaded(str(exc), retry_after=1.0) from None
        fresh: list[Event] = []
        claimed: list[Key] = []
        waits: list[asyncio.Future[bool]] = []
        for event, claim in zip(unique, claims, strict=True):
            if claim is True:
                fresh.append(event)
                claimed.append((event.source, event.id))
            elif claim is False:
                duplicates.append(event.id)
            else:
                waits.append(claim)
                duplicates.append(event.id)
        try:
            if fresh:
                await self.spool.write(*self._route(fresh))
        except BaseException:
            await self.dedup.release_batch(claimed)
            raise
        if claimed:
            await self.dedup.commit_batch(claimed)
        if waits and not all(await asyncio.gather(*waits)):
            # The concurrent first publish of one of these failed; this caller must not get a 202 for it.
            raise Overloaded("a concurrent publish of the same event failed; retry", retry_after=0.1)
        return PublishResult([e.id for e in events], duplicates)

    def _route(self, events: list[Event]) -> tuple[list[Event], list[tuple[str, ...]]]:
        """The route step: destination names per event, plus a dead-letter copy (in the same durable
        write) for every event a decision could not fully route."""
        out: list[Event] = []
        targets: list[tuple[str, ...]] = []
        route = self.router.route
        for event in events:
            routed = route(event)
            if isinstance(routed, tuple):
                out.append(event)
                targets.append(routed)
                continue
            if routed.destinations:
                out.append(event)
                targets.append(routed.destinations)
            if routed.reason is not None:
                out.append(dead_letter_copy(event, routed.reason))
                targets.append((DEAD_LETTER,))
        return out, targets


def dead_letter_copy(event: Event, reason: str) -> Event:
    """The event as the dead-letter queue stores it: with `fabricreason`, `fabricdest`, `fabricattempts`."""
    log.error("dead-lettered %s from %s: %s", event.attributes.get("id"), event.attributes.get("source"), reason)
    attrs = {**event.attributes, "fabricdest": "(router)", "fabricreason": reason[:1024], "fabricattempts": 0}
    return Event(attrs, event.data)
