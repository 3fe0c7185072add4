"""The one data path: decode → validate → dedup → route → spool → deliver (DESIGN.md §1).

Ingress servers decode and validate with the codec of their mode (that is the `decode`/`validate`
step, fused for speed) and hand events to `Pipeline.publish`, which runs the rest and returns only
once every accepted event is durable. Every ingress — HTTP, gRPC, sources, the demo — calls this.

The route decision is taken just before the dedup claim (DESIGN.md's order has dedup first): backpressure
needs each event's destinations and priority class to refuse a batch, and a refused batch must leave no
claim behind. Routing a duplicate costs a decision (~1 µs) and writes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from umcef.adapters.local import LocalStore
from umcef.fabric.backpressure import CLASSES, NORMAL, Lane, Load, SpoolGauge
from umcef.fabric.bindings import http as http_binding
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC, with_reason
from umcef.fabric.dedup import Claim, DedupStore, DedupUnavailable, Key
from umcef.fabric.delivery import SPOOL_PREFIX, spool_records
from umcef.fabric.errors import InvalidAttribute
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
        await self.store.append(spool_records(events, destinations, self.topics))
        if self.gauge is not None and self.spooled:
            self.gauge.add(sum(name in self.spooled for names in destinations for name in names))


PRIORITY_ATTRIBUTE = "priorityclass"
"""The event extension naming its priority class (low | normal | high). Not `priority`: that name is a
route's ordering key, and producers commonly send an integer `priority` extension of their own."""


class _Decided(NamedTuple):  # one per event: a tuple is built in a quarter of a frozen dataclass's time
    destinations: tuple[str, ...]
    reason: str | None  # set: dead-letter a copy with this reason
    priority: int  # backpressure class (umcef.fabric.backpressure.LOW/NORMAL/HIGH)


class BytesHold:
    """Request bytes counted against `max_in_flight_bytes` (see `Pipeline.holding`)."""

    def __init__(self, pipeline: Pipeline, size: int) -> None:
        self._pipeline = pipeline
        self.size = size

    def resize(self, size: int) -> None:
        """What the request turned out to be: growing is checked like a new hold (Overloaded, size kept)."""
        self._pipeline.resize_hold(self.size, size)
        self.size = size

    def give_up(self) -> int:
        """No longer counted in flight (a paced publish counts in the waiting room instead): the bytes it held."""
        size, self.size = self.size, 0
        self._pipeline.release_bytes(size)
        return size


# The byte hold of the request being published, wherever its ingress took it (`Pipeline.holding`): a paced
# publish moves its bytes out of flight into the waiting room. (Each request is served by a task of its own.)
_REQUEST_HOLD: contextvars.ContextVar[BytesHold | None] = contextvars.ContextVar("request_hold", default=None)


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
        self.pacing = 0  # events of publishes waiting for delivery to catch up (`pace`), no longer in flight
        self.pacing_bytes = 0  # and their request bytes
        self.in_flight_bytes = 0  # request bodies (HTTP) and messages (gRPC) held, against max_in_flight_bytes
        self.closing = False
        # Ingress pacing (set by the gateway): once a publish is durable and counted, its answer waits while its
        # destinations' workers are delivering but far behind (umcef.fabric.pacing; see `publish`).
        self.pace: Callable[[Collection[str]], Awaitable[None]] | None = None

    async def ingest_http(self, headers: Mapping[str, str], body: bytes, size: int | None = None) -> PublishResult:
        """HTTP ingress: decode + validate the request in whatever mode it uses, then publish. `size`: the
        bytes to hold against `max_in_flight_bytes` (the body's length; 0 when the caller holds them itself)."""
        events = http_binding.decode_request(headers, body, self.limits)
        return await self.publish(events, len(body) if size is None else size)

    def hold_bytes(self, size: int) -> None:
        """Counts `size` request bytes in flight until `release_bytes`, or raises Overloaded when they would
        pass `max_in_flight_bytes`. An idle pipeline takes any request, so a big one is not refused forever."""
        gauge = self.backpressure
        if size and gauge is not None and gauge.max_in_flight_bytes is not None and self.in_flight_bytes \
                and self.in_flight_bytes + size > gauge.max_in_flight_bytes:
            raise Overloaded(f"{self.in_flight_bytes} request bytes in flight, limit {gauge.max_in_flight_bytes}",
                             gauge.retry_after_seconds)
        self.in_flight_bytes += size

    def release_bytes(self, size: int) -> None:
        self.in_flight_bytes -= size

    @contextlib.contextmanager
    def holding(self, size: int) -> Iterator[BytesHold]:
        """`size` request bytes held for the `with` block (Overloaded when they do not fit): what both
        ingresses do around reading and publishing a request; `resize` once its real size is known."""
        self.hold_bytes(size)
        hold = BytesHold(self, size)
        token = _REQUEST_HOLD.set(hold)
        try:
            yield hold
        finally:
            _REQUEST_HOLD.reset(token)
            self.release_bytes(hold.size)
            hold.size = 0  # (a task started inside the block inherits it: it must find nothing left to give up)

    def resize_hold(self, held: int, size: int) -> None:
        """Turn a hold of `held` bytes (what a request announced, or the most it may be) into `size` (what
        it turned out to be). Growing is checked like a new hold: on Overloaded `held` stays held."""
        if size <= held:
            self.in_flight_bytes -= held - size
            return
        self.in_flight_bytes -= held
        try:
            self.hold_bytes(size)
        except Overloaded:
            self.in_flight_bytes += held
            raise

    async def publish(self, events: list[Event], size: int = 0) -> PublishResult:
        """`size`: the request's encoded size, counted against `max_in_flight_bytes` while it is published."""
        if self.closing:
            raise ShuttingDown("the gateway is shutting down")
        # An idle pipeline takes any batch, so a batch above the limit cannot be refused forever.
        if self.in_flight and self.in_flight + len(events) > self.max_in_flight:
            raise Overloaded(f"{self.in_flight} events in flight, limit {self.max_in_flight}")
        ingress_hold = self._ingress_hold() if not size else None  # (read before `holding` replaces it)
        with self.holding(size) as own:
            self.in_flight += len(events)
            try:
                result, destinations = await self._publish(events)
            finally:
                self.in_flight -= len(events)
            if destinations and (pace := self.pace) is not None and not self.closing:
                await self._paced(pace, destinations, len(events), ingress_hold or own)
            return result

    def _ingress_hold(self) -> BytesHold | None:
        """The hold an ingress took on this pipeline for the request being published, if any."""
        hold = _REQUEST_HOLD.get()
        return hold if hold is not None and hold._pipeline is self else None

    async def _paced(self, pace: Callable[[Collection[str]], Awaitable[None]], destinations: set[str], events: int,
                     hold: BytesHold) -> None:
        """Waits for delivery to catch up (`pace`). Durable, claimed and counted, the publish has nothing left to
        undo (a cancelled wait costs the client a retry that dedup answers), so it leaves the in-flight counts
        for a waiting room with the same bounds: publishes paced for a slow destination cannot refuse the
        others' (429), and once the room is full a publish answers at once (its events wait in the spool, as
        unpaced), so memory stays bounded."""
        budget = self.backpressure.max_in_flight_bytes if self.backpressure is not None else None
        full = (self.pacing + events > self.max_in_flight
                or (budget is not None and self.pacing_bytes + hold.size > budget))
        if full and self.pacing:  # (an empty room takes any publish, like the pipeline)
            return
        nbytes = hold.give_up()
        self.pacing += events
        self.pacing_bytes += nbytes
        try:
            await pace(destinations)
        finally:
            self.pacing -= events
            self.pacing_bytes -= nbytes

    async def _publish(self, events: list[Event]) -> tuple[PublishResult, set[str]]:
        """The answer, and the destinations of the events it spooled (none: nothing new)."""
        unique: list[Event] = []
        keys: list[Key] = []  # of the unique events
        positions: list[int] = []  # of the unique events in the request (error messages name the index)
        duplicates: list[str] = []
        batch_keys: set[Key] = set()
        for position, event in enumerate(events):
            attributes = event.attributes  # (not the `source`/`id` properties: this runs per event)
            key = (attributes["source"], attributes["id"])
            if key in batch_keys:
                duplicates.append(key[1])
                continue
            batch_keys.add(key)
            unique.append(event)
            keys.append(key)
            positions.append(position)
        # Route before the dedup claim: backpressure needs the destinations, and a refused batch must
        # leave nothing behind (no claim to release, no dead-letter copy).
        decided = self._decide(unique, positions if len(events) > 1 else None)
        gauge = self.backpressure
        sizes = [len(json_format.encode(e)) for e in unique] if gauge is not None and gauge.tracks_bytes else None
        reserved: dict[Lane, Load] = {}
        if gauge is not None:
            reserved = gauge.demand(*_records(decided, sizes))
            why = gauge.reserve(reserved)
            if why is not None:
                if await self._accepted_before(keys):  # a client's retry of a 202: the same answer, full or not
                    return PublishResult([e.id for e in events], [*duplicates, *(key[1] for key in keys)]), set()
                raise Overloaded(why, gauge.retry_after_seconds)
        try:
            try:
                claims: list[Claim] = await self.dedup.claim_batch(keys)
            except DedupUnavailable as exc:
                raise Overloaded(str(exc), retry_after=1.0) from None
            fresh: list[int] = []
            claimed: list[Key] = []
            waits: list[asyncio.Future[bool]] = []
            for i, (key, claim) in enumerate(zip(keys, claims, strict=True)):
                if claim is True:
                    fresh.append(i)
                    claimed.append(key)
                elif claim is False:
                    duplicates.append(key[1])
                else:
                    waits.append(claim)
                    duplicates.append(key[1])
            try:
                if fresh:
                    await self.spool.write(*self._route([unique[i] for i in fresh], [decided[i] for i in fresh]))
            except BaseException:
                await self.dedup.release_batch(claimed)
                raise
        except BaseException:
            if gauge is not None and reserved:
                gauge.release(reserved)
            raise
        if gauge is not None and reserved:
            written = reserved if len(fresh) == len(unique) else gauge.demand(*_records(
                [decided[i] for i in fresh], None if sizes is None else [sizes[i] for i in fresh]))
            gauge.commit(reserved, written)
        if claimed:
            await self.dedup.commit_batch(claimed)
        # (shielded: the futures are shared with other publishers, whom a cancelled request must not cancel)
        if waits and not all(await asyncio.gather(*(asyncio.shield(wait) for wait in waits))):
            # The concurrent first publish of one of these failed; this caller must not get a 202 for it.
            raise Overloaded("a concurrent publish of the same event failed; retry", retry_after=0.1)
        paced = (set().union(*(decided[i].destinations for i in fresh))
                 if fresh and self.pace is not None and not self.closing else set())  # (only what `publish` paces)
        return PublishResult([e.id for e in events], duplicates), paced

    async def _accepted_before(self, keys: list[Key]) -> bool:
        """Whether every event of a batch the spools refused is already durable: a resend of an accepted
        batch then gets the same answer as the first publish, not a 429. A read-only look: a claim would
        make a concurrent publish of a new one of these events (on another instance) wait for nothing."""
        try:
            return all(await self.dedup.accepted_batch(keys))
        except DedupUnavailable:
            return False

    def _decide(self, events: list[Event], positions: list[int] | None) -> list[_Decided]:
        """The route step's decisions, with each event's priority class: its `priorityclass` extension,
        else the highest `priority_class` of the routes it matched, else normal. `positions`: the events'
        indexes in a batch request, None for a single event."""
        route = self.router.route
        route_classes = self.backpressure.route_classes if self.backpressure is not None else {}
        out: list[_Decided] = []
        for i, event in enumerate(events):
            routed = route(event)
            routes: tuple[str, ...] = ()  # only asked for when a route has a priority class
            if isinstance(routed, tuple):
                destinations, reason = routed, None
            else:
                destinations, reason = routed.destinations, routed.reason
                if route_classes:
                    routes = getattr(routed, "routes", ())
            value = event.attributes.get(PRIORITY_ATTRIBUTE)
            if value is not None:
                priority = CLASSES.get(value) if isinstance(value, str) else None
                if priority is None:
                    raise InvalidAttribute(f"expected one of low, normal, high, got {value!r}", PRIORITY_ATTRIBUTE,
                                           None if positions is None else positions[i])
            elif route_classes and routes:
                priority = max(route_classes.get(name, NORMAL) for name in routes)
            else:
                priority = NORMAL
            out.append(_Decided(destinations, reason, priority))
        return out

    def _route(self, events: list[Event], decided: list[_Decided]) -> tuple[list[Event], list[tuple[str, ...]]]:
        """What the spool step writes: destination names per event, plus a dead-letter copy (in the same
        durable write) for every event a decision could not fully route."""
        out: list[Event] = []
        targets: list[tuple[str, ...]] = []
        for event, d in zip(events, decided, strict=True):
            if d.destinations:
                out.append(event)
                targets.append(d.destinations)
            if d.reason is not None:
                out.append(dead_letter_copy(event, d.reason))
                targets.append((DEAD_LETTER,))
        return out, targets


def _records(decided: list[_Decided], sizes: list[int] | None) -> tuple[list[tuple[str, ...]], list[int],
                                                                        list[int] | None]:
    """The spool records of `decided` for the backpressure demand: targets, classes and sizes (a dead-letter
    copy counts with its event's size)."""
    targets: list[tuple[str, ...]] = []
    classes: list[int] = []
    out_sizes: list[int] | None = None if sizes is None else []
    for i, d in enumerate(decided):
        for names in (d.destinations, (DEAD_LETTER,) if d.reason is not None else ()):
            if names:
                targets.append(names)
                classes.append(d.priority)
                if out_sizes is not None and sizes is not None:
                    out_sizes.append(sizes[i])
    return targets, classes, out_sizes


def dead_letter_copy(event: Event, reason: str) -> Event:
    """The event as the dead-letter queue stores it: with `fabricreason`, `fabricdest`, `fabricattempts`."""
    log.error("dead-lettered %s from %s: %s", event.attributes.get("id"), event.attributes.get("source"), reason)
    return Event(with_reason(event.attributes, "(router)", reason, 0), event.data)
