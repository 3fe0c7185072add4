"""Deliver step: one worker per remote destination drains its durable spool into the broker adapter.

The spool is a topic of the local store (`_spool.<destination>`), written in the same group commit
that made the event durable for its 202; a `SpoolFeed` hands its pages to the worker, from memory while
caught up. The worker publishes up to `pages_in_flight` pages at once — a page that shares a
`partitionkey` with a page in flight waits for it, so per-key order holds, unless the adapter keeps the
order of publishes in flight (`ordered_in_flight`: see `_blockers`) — retries what failed with
exponential backoff and full jitter, dead-letters what the broker can never take (at once) or what ran
out of attempts or age (per-destination limits), and only then moves its cursor, past the finished pages
at the head (lazily: the move rides on the next group commit). After a crash everything not yet
acknowledged by the broker is delivered again (at-least-once; consumers dedup on `source` + `id`).

Failover (issue 5 §4): while the estimator has the destination ejected the worker does not publish;
it asks its `Failover` hook to re-decide each pending event with the router (the ejected destination
is out, residency is enforced as at ingress). Events whose matching routes *choose* (`best`,
`failover`, `split`) are appended to the new destinations' spools in one durable write, and only then
leave this page (the cursor moves past them with the page). Events of an `all` route stay. Events
with no allowed, healthy destination wait, bounded by the maximum age, then are dead-lettered with
the reason `no allowed destination healthy: ...`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import random
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from umcef.adapters.contract import Adapter, AdapterError, PublishOutcome, Rejected, Throttled, Transient
from umcef.adapters.local import LocalStore, Record
from umcef.fabric.deadletter import DeadLetterQueue
from umcef.fabric.errors import EventError
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.spool_feed import Spooled, SpoolFeed

if TYPE_CHECKING:
    from umcef.router.decide import Router

log = logging.getLogger("umcef.delivery")
CURSOR_GROUP = "delivery"
# A delivering gateway marks each spool it has a worker for: a cursor of this consumer holding the Unix time,
# renewed every ALIVE_INTERVAL seconds (and set to 0 at a clean stop). `umcef spool dead-letter` refuses a
# spool marked within ALIVE_TIMEOUT: whatever configuration file the operator holds, a gateway delivers it.
ALIVE_GROUP = "delivery-alive"
ALIVE_INTERVAL = 2.0
ALIVE_TIMEOUT = 10.0
SPOOL_PREFIX = "_spool."
NO_HEALTHY = "no allowed destination healthy: "
MAX_EJECTED_WAIT = 1.0  # seconds between two looks at an ejected destination (re-admission, failover targets)


def spool_topic(destination: str) -> str:
    return SPOOL_PREFIX + destination


def spool_records(events: Sequence[Event], destinations: Sequence[tuple[str, ...]],
                  topics: Mapping[str, str]) -> list[Record]:
    """One record per event and destination name (its topic: a local topic or a delivery spool), encoded once
    per event, keyed by `partitionkey` (else the id), carrying the event for the in-memory hand-off."""
    records: list[Record] = []
    encode = json_format.encode
    for event, names in zip(events, destinations, strict=True):
        payload = encode(event)
        attributes = event.attributes
        key = attributes.get("partitionkey") or attributes["id"]
        if type(key) is not str:
            key = str(key)
        if len(names) == 1:  # the usual case, without a generator per event
            records.append(Record(topics[names[0]], payload, key, event))
        else:
            records.extend(Record(topics[name], payload, key, event) for name in names)
    return records


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    base_seconds: float = 0.1
    cap_seconds: float = 30.0
    max_attempts: int | None = None  # None: retry transient failures until the broker takes the event
    max_age_seconds: float | None = None  # since the event was accepted (spool `stored_at`); None: no limit

    def backoff(self, attempt: int, floor: float = 0.0) -> float:
        """Full jitter: uniform(0, min(cap, base * 2^attempt)), never below a broker-given floor."""
        return max(floor, random.uniform(0, min(self.cap_seconds, self.base_seconds * 2 ** min(attempt, 64))))

    def expires_at(self, stored_at: float) -> float:
        return float("inf") if self.max_age_seconds is None else stored_at + self.max_age_seconds


@dataclass(frozen=True, slots=True)
class Reroute:
    """What failover decided for one event of an ejected destination's spool."""

    action: str  # "stay" (an `all` route, or chosen again) | "move" | "wait" (no allowed healthy destination)
    destinations: tuple[str, ...] = ()  # move: where to
    reason: str = ""  # wait: why nothing is allowed and healthy


STAY = Reroute("stay")


class Failover(Protocol):
    """The worker's view of the router during an ejection (implemented by `RouterFailover`)."""

    def ejected(self) -> str | None:
        """Why the worker's destination is ejected now, or None while it is up (or on probation)."""

    def reroute(self, event: Event) -> Reroute: ...

    async def move(self, moves: Sequence[tuple[Event, tuple[str, ...]]]) -> None:
        """One durable append of every event to its new destinations (spools or local topics)."""


class RouterFailover:
    """`Failover` backed by the live router: re-decides the event with the explain records (per route),
    so only the routes that contain this destination count, and residency is the router's own check."""

    def __init__(self, destination: str, router: Router, store: LocalStore, topics: dict[str, str],
                 spooled: Callable[[Mapping[str, int]], None] = lambda n: None) -> None:
        self.destination = destination
        self.router = router
        self.store = store
        self.topics = topics  # destination name -> topic (local topic, or the `_spool.` topic of a remote one)
        self.spooled = spooled  # told how many records went to which delivery spools (backpressure gauge)
        self.slot = router.estimator.slot(destination)

    def ejected(self) -> str | None:
        estimator = self.router.estimator
        estimator.tick()  # an ejection whose time is up turns into probation here, not only at the next probe
        return None if estimator.up[self.slot] else estimator.describe_down(self.slot)

    def reroute(self, event: Event) -> Reroute:
        decision = self.router.decide(event, explain=True)
        mine = [rec for rec in decision.explain or ()
                if any(c.destination == self.destination for c in rec.candidates)]
        if not mine or any(rec.mode == "all" for rec in mine):
            # An `all` route keeps its copy here until the destination is back (docs/router.md); a
            # destination no matching route names any more (a table swap) is left to the delivery-time
            # residency re-check.
            return STAY
        targets: list[str] = []
        reasons: list[str] = []
        holding: list[str] = []
        estimator = self.router.estimator
        for rec in mine:
            if rec.held is not None:
                # No allowed destination is healthy: the route holds the event for one (docs/router.md).
                # Held here, or for another destination that is down too: it waits. Held for one that is
                # up (only slower than max_rtt_ms): it moves there, as a new event would go.
                if any(d == self.destination or not estimator.up[estimator.slot(d)] for d in rec.destinations):
                    holding.append(rec.held)
                    continue
            elif self.destination in rec.destinations:
                return STAY  # chosen again (back on probation meanwhile)
            targets.extend(d for d in rec.destinations if d not in targets)
            if not rec.destinations:
                reasons.append(rec.reason or f"route {rec.route!r} chose nothing")
        if holding:  # a route still holding the event for this destination keeps it here: delayed, not lost
            return Reroute("wait", reason="; ".join(holding + reasons))
        if targets:
            return Reroute("move", tuple(targets))
        return Reroute("wait", reason="; ".join(reasons))

    async def move(self, moves: Sequence[tuple[Event, tuple[str, ...]]]) -> None:
        records = spool_records([e for e, _ in moves], [names for _, names in moves], self.topics)
        await self.store.append(records)
        spooled = (name for _, names in moves for name in names if self.topics[name].startswith(SPOOL_PREFIX))
        self.spooled(Counter(spooled))
        for event, names in moves:
            log.warning("%s is ejected: event %s moved to %s", self.destination, event.id, ", ".join(names))


def _future() -> asyncio.Future[None]:
    return asyncio.get_running_loop().create_future()


@dataclass(slots=True)
class _Flight:
    last_seq: int  # the page's last spool seq: where the cursor goes once this page and all before it are done
    keys: set[str]  # partition keys in the page (per-key order)
    size: int
    parked: bool = False  # ejected, only waiting events left: not counted against pages_in_flight
    issued: asyncio.Future[None] = field(default_factory=_future)  # done once its first publish started
    streamed: bool = False  # its last publish started in order on an `ordered_in_flight` adapter: see _blockers
    clean: bool = True  # no publish of it failed and it never parked: it may follow a streamed page
    task: asyncio.Future[bool] = field(init=False)  # set right after construction (it needs the flight)


@dataclass(slots=True)
class _Gathering:
    pending: list[_Pending]
    keys: set[str]
    last_seq: int


def _order_key(event: Event) -> str | None:
    key = event.attributes.get("partitionkey")
    return None if key is None else str(key)


_Letter = tuple[Event, str, int]  # a dead letter to be: the event, the reason, its attempts


@dataclass(slots=True)
class _Pending:
    event: Event
    expires_at: float  # unix seconds
    seq: int  # its spool record's
    attempts: int = 0  # failed publishes so far, earlier runs' included (noted in the store)
    waiting: str | None = None  # why no allowed destination is healthy (failover found nowhere to go)


class DeliveryWorker:
    def __init__(self, destination: str, adapter: Adapter, store: LocalStore, dead_letters: DeadLetterQueue, *,
                 policy: RetryPolicy = RetryPolicy(), page_size: int = 500, failover: Failover | None = None,
                 clock: Callable[[], float] = time.time, memory_capacity: int = 20_000,
                 pages_in_flight: int = 4) -> None:
        self.destination = destination
        self.adapter = adapter
        self.store = store
        self.topic = spool_topic(destination)
        self.policy = policy
        self.page_size = page_size
        self.memory_capacity = memory_capacity  # spooled events held in memory for the worker (SpoolFeed)
        self.feed: SpoolFeed | None = None
        self.pages_in_flight = max(1, pages_in_flight)  # pages with different keys published concurrently
        self._ordered = adapter.capabilities.ordered_in_flight  # pages sharing keys may be in flight together
        self._warm = False  # a publish started since the last failure was acknowledged in full (see _publish)
        self._failures = 0  # failed publishes and parkings so far: what "since the last failure" compares
        self._flights: deque[_Flight] = deque()  # pages being delivered, oldest first
        self._cursor: concurrent.futures.Future[None] | None = None
        self._parking = asyncio.Event()  # a page parked or unparked: the run loop may take another page
        self.dead_letters = dead_letters
        self.failover = failover
        self.clock = clock  # wall clock: compared with the spool's `stored_at`
        self.delivered = 0
        self.moved = 0  # events that left this spool by failover to other destinations
        self._stopping = asyncio.Event()
        self._noted: dict[int, int] = {}  # seq -> attempts an earlier run noted, for records not read yet

    @property
    def drained(self) -> int:
        """Events that left this spool in this run other than by dead-lettering (backpressure gauge)."""
        return self.delivered + self.moved

    async def run(self) -> None:
        after = self.store.cursor(CURSOR_GROUP, self.topic)
        self._noted = self.store.attempts(self.topic, after)  # only records that failed: usually none
        feed = SpoolFeed(self.store, self.topic, after, page_size=self.page_size, capacity=self.memory_capacity)
        self.feed = feed
        stopping = asyncio.ensure_future(self._stopping.wait())
        flights = self._flights = deque()
        next_page: asyncio.Future[list[Spooled]] | None = None
        gathering: _Gathering | None = None  # the next page, growing while pages in flight hold its keys
        try:
            while not self._stopping.is_set():
                if not self._land(flights):
                    return  # a page gave up because we are stopping
                self._parking.clear()
                active = sum(not (f.parked or f.task.done()) for f in flights)
                if gathering is not None and active < self.pages_in_flight and self._may_launch(gathering, flights):
                    flight = _Flight(gathering.last_seq, gathering.keys, len(gathering.pending))
                    flight.task = asyncio.ensure_future(self._deliver(gathering.pending, flight))
                    flights.append(flight)
                    gathering, active = None, active + 1
                parked = sum(f.size for f in flights if f.parked)
                # Parked pages (an ejected destination, events that can only wait) do not hold back later
                # pages, whose events may fail over, up to `memory_capacity` parked events.
                room = active < self.pages_in_flight if gathering is None else len(gathering.pending) < self.page_size
                if next_page is None and room and parked < max(self.memory_capacity, 1):
                    next_page = asyncio.ensure_future(feed.next_page())
                # Wake for a new page, a finished or parked page, or stop(): an idle spool must not keep a
                # stopping worker alive.
                parking = asyncio.ensure_future(self._parking.wait())
                wake: set[asyncio.Future[Any]] = {stopping, parking, *(f.task for f in flights)}
                if next_page is not None:
                    wake.add(next_page)
                await asyncio.wait(wake, return_when=asyncio.FIRST_COMPLETED)
                parking.cancel()
                if next_page is None or not next_page.done() or self._stopping.is_set():
                    continue
                try:
                    page = next_page.result()
                except RuntimeError:  # the store was closed
                    return
                next_page = None
                pending = await self._pending(page)
                if gathering is None:
                    gathering = _Gathering([], set(), 0)
                gathering.pending += pending
                gathering.keys.update(k for p in pending if (k := _order_key(p.event)) is not None)
                gathering.last_seq = page[-1].seq
            # stop(): pages in flight finish their publish (bounded by the gateway's drain deadline) or give
            # up their retry wait; the cursor moves past every page that finished.
            if flights:
                await asyncio.wait([f.task for f in flights])
            self._land(flights)
        finally:
            stopping.cancel()
            if next_page is not None:
                next_page.cancel()
            for flight in flights:
                flight.task.cancel()
            feed.close()
            if self._cursor is not None:
                with contextlib.suppress(Exception):  # the store closing under us: redelivery, not loss
                    # Shielded: the move may wait in the store for company (`cursor_delay`), and a shutdown
                    # deadline cancelling us meanwhile must not cancel it (the store commits it at close).
                    await asyncio.shield(asyncio.wrap_future(self._cursor))

    def _may_launch(self, gathering: _Gathering, flights: deque[_Flight]) -> bool:
        """Per-key order: a page that shares a key with a page in flight publishes only after it, so it keeps
        growing meanwhile (one large page rather than a chain of small ones, each a broker round trip) —
        unless it is full, may follow every such page at once (`_may_follow`), or the destination is
        ejected (its events may fail over now)."""
        if len(gathering.pending) >= self.page_size or all(
                self._may_follow(f) for f in flights if not f.task.done() and not gathering.keys.isdisjoint(f.keys)):
            return True
        return self.failover is not None and self.failover.ejected() is not None

    def _may_follow(self, earlier: _Flight) -> bool:
        """Whether a clean page sharing keys with `earlier` (in flight) may publish before it is acknowledged:
        the adapter keeps the order of publishes in flight, nothing failed since the last full
        acknowledgement, and `earlier` is clean and streamed (or has not started: wait for that first)."""
        return (self._ordered and self._warm and earlier.clean
                and (earlier.streamed or not earlier.issued.done()))

    def _blockers(self, flight: _Flight, pending: Sequence[_Pending]) -> list[asyncio.Future[Any]]:
        """What `flight` waits for before it publishes `pending`: each earlier page in flight sharing a key
        with it, until acknowledged (the barrier) or, when `_may_follow` allows, until its publish started.

        Following a page is safe because publishes then start in spool order (`_publish`) and the adapter
        keeps that order per key while they are unacknowledged. After a failure it is not: a retried event
        would land after the later events of its key. So a page that failed (or parked) is a barrier again
        for the later pages sharing its keys, its own retries wait for the earlier pages of their keys, and
        every page waits on the barrier until a publish started after the failure is acknowledged in full.
        Pages already published when the failure came back may land before the retry (Kafka's own producer:
        order holds for what is acknowledged)."""
        # A clean page's keys are its page's (a superset once some expired); after a failure or failover,
        # only the keys of what is left hold it back.
        keys = flight.keys if flight.clean else {k for p in pending if (k := _order_key(p.event)) is not None}
        waits: list[asyncio.Future[Any]] = []
        for earlier in self._flights if keys else ():
            if earlier is flight:
                break
            if earlier.task.done() or keys.isdisjoint(earlier.keys):
                continue
            if not (flight.clean and self._may_follow(earlier)):
                waits.append(earlier.task)
            elif not earlier.issued.done():
                waits.append(earlier.issued)
        return waits

    def _land(self, flights: deque[_Flight]) -> bool:
        """Move the cursor past the finished pages at the head, up to one that gave up (stopping): False then."""
        last = None
        while flights and flights[0].task.done():
            if not flights[0].task.result():  # an exception here is a bug: let it stop the worker loudly
                break
            last = flights.popleft().last_seq
        if last is not None:
            # Not awaited: the move rides on the next group commit (a lost move = redelivery only).
            self._cursor = self.store.commit_cursor_later(CURSOR_GROUP, self.topic, last)
        return not (flights and flights[0].task.done())  # the loop stopped at a finished page: it gave up

    async def stop(self) -> None:
        """Take no new page and abandon retry waits; a publish in flight completes (the gateway bounds
        it with `delivery.drain_seconds`), as does a page's first publish that only waited for earlier
        pages of its keys, and the cursor moves past every page done."""
        self._stopping.set()

    async def _pending(self, page: Sequence[Spooled]) -> list[_Pending]:
        """The page's events with their expiry and the attempts earlier runs noted; a record that does not decode
        is dead-lettered raw, and so is one whose noted attempts already reach `max_attempts` (a lowered limit)."""
        pending: list[_Pending] = []
        spent: list[_Letter] = []
        expires_at = self.policy.expires_at
        noted = self._noted
        limit = self.policy.max_attempts
        for spooled in page:
            event = spooled.event
            if event is None:
                try:
                    event = json_format.decode(spooled.payload)
                except EventError as exc:  # cannot happen for spooled events; never block the spool on one
                    await self.dead_letters.put_raw(spooled.payload, None, f"undecodable spool record: {exc}")
                    continue
            attempts = noted.pop(spooled.seq, 0) if noted else 0
            if limit is not None and attempts >= limit:
                spent.append((event, f"attempt limit {limit} reached in an earlier run", attempts))
                continue
            pending.append(_Pending(event, expires_at(spooled.stored_at), spooled.seq, attempts))
        await self._dead_letter(spent)
        return pending

    async def _deliver(self, pending: list[_Pending], flight: _Flight) -> bool:
        """True once every event of the page is acknowledged, moved elsewhere or dead-lettered."""
        failed = False  # a publish of this page failed in this run
        waits = 0
        last: AdapterError | None = None
        while pending:
            pending = await self._expire(pending, last)
            if not pending:
                return True
            if self.failover is not None:
                down = self.failover.ejected()
                if down is not None:
                    pending = await self._fail_over(pending)
                    if not pending:
                        return True
                    # Still ejected: publish nothing; look again shortly (re-admission, a target back up).
                    self._park(flight, True)
                    waits += 1
                    delay = min(self.policy.cap_seconds, MAX_EJECTED_WAIT,
                                self.policy.base_seconds * 2 ** min(waits, 20))
                    if await self._pause(self._until_expiry(pending, delay)):
                        return False
                    continue
            self._park(flight, False)
            blockers = self._blockers(flight, pending)
            if blockers:
                await asyncio.wait(blockers)
                continue  # time passed: look at ages, ejection and what to wait for again
            if self._stopping.is_set() and failed:
                # stop() came while this page waited to retry: it stays in the spool. A first attempt that only
                # waited for earlier pages of its keys still goes: giving it up would also hold the cursor
                # before every later page that was delivered, and the next start would send them again.
                return False
            for p in pending:
                p.waiting = None
            outcomes = await self._publish(flight, pending)
            retry: list[_Pending] = []
            letters: list[_Letter] = []
            floor = 0.0
            limit = self.policy.max_attempts
            for p, outcome in zip(pending, outcomes, strict=True):
                error = outcome.error
                if error is None:
                    self.delivered += 1
                elif isinstance(error, Rejected):  # this event can never go there: the rest are the destination's
                    letters.append((p.event, f"{type(error).__name__}: {error}", p.attempts + 1))
                else:
                    p.attempts += 1
                    last = error
                    if isinstance(error, Throttled):
                        floor = max(floor, error.retry_after)
                    if limit is not None and p.attempts >= limit:
                        letters.append((p.event, _describe(error), p.attempts))
                    else:
                        retry.append(p)
            await self._dead_letter(letters)
            if not retry:
                return True
            failed = True
            self._note_attempts(retry)
            pending = retry
            if self.failover is not None and self.failover.ejected() is not None:
                continue  # this failure ejected the destination: fail over now rather than after a backoff
            attempts = min(p.attempts for p in retry)  # events new to failing back off as such
            delay = self.policy.backoff(attempts, floor)
            log.warning("%s: %d events failed (%s); retry %d in %.2fs", self.destination, len(retry), last,
                        attempts, delay)
            if await self._pause(self._until_expiry(pending, delay)):
                return False
        return True

    async def _publish(self, flight: _Flight, pending: list[_Pending]) -> list[PublishOutcome]:
        """Start the page's publish, mark it issued, await the outcomes; a failure cools the pipeline."""
        events = [p.event for p in pending]
        flight.streamed = (self._ordered and self._warm and flight.clean
                           and len(events) <= self.adapter.capabilities.max_batch)
        since = self._failures
        # A task, so `issued` can be set before the publish is awaited: its first step is queued now, and any
        # page woken by `issued` queues its own publish after it (asyncio runs ready callbacks in FIFO
        # order), so publishes start in spool order. The contract asks no more of the adapter.
        publishing = asyncio.ensure_future(self.adapter.publish(events))
        if not flight.issued.done():
            flight.issued.set_result(None)
        try:
            outcomes = await publishing
        except Exception as exc:  # an adapter bug or an unclassified client error: retry, never lose the page
            log.exception("%s: publish raised", self.destination)
            failed = Transient(f"publish raised {type(exc).__name__}: {exc}")
            outcomes = [PublishOutcome(p.event.id, failed) for p in pending]
        if any(o.error is not None and not isinstance(o.error, Rejected) for o in outcomes):
            flight.clean = False
            self._cool(flight)
        elif since == self._failures:
            self._warm = True  # acknowledged in full (or rejected for good) with no failure since it started
        return outcomes

    def _cool(self, flight: _Flight) -> None:
        """A page failed or parked: it and, until a clean full acknowledgement, every page is a barrier."""
        flight.streamed = False
        self._failures += 1
        self._warm = False

    def _park(self, flight: _Flight, parked: bool) -> None:
        if flight.parked != parked:
            flight.parked = parked
            self._parking.set()
            if parked:
                flight.clean = False
                self._cool(flight)

    async def _pause(self, delay: float) -> bool:
        """Sleep `delay` seconds; True when stop() came first."""
        try:
            await asyncio.wait_for(self._stopping.wait(), max(delay, 0.0))
            return True
        except TimeoutError:
            return False

    def _until_expiry(self, pending: list[_Pending], delay: float) -> float:
        """Wake up no later than the first expiry, so the maximum age is honoured on time."""
        first = min(p.expires_at for p in pending)
        return min(delay, max(first - self.clock(), 0.0) + 0.01)

    def _note_attempts(self, retry: list[_Pending]) -> None:
        """Counts survive a restart (as SQS's receive count does): one row per failed event, in a later commit
        (a commit per failed round, not per event; lost in a crash, fewer attempts are counted, never more)."""
        with contextlib.suppress(RuntimeError):  # the store is closing: the next run counts from what was noted
            self.store.note_attempts_later(self.topic, [(p.seq, p.attempts) for p in retry])

    async def _expire(self, pending: list[_Pending], last: AdapterError | None) -> list[_Pending]:
        """Dead-letter the events older than the maximum age; the rest stay pending."""
        if self.policy.max_age_seconds is None:
            return pending
        now = self.clock()
        keep: list[_Pending] = []
        expired: list[_Letter] = []
        for p in pending:
            if now < p.expires_at:
                keep.append(p)
            elif p.waiting is not None:
                expired.append((p.event, NO_HEALTHY + p.waiting, p.attempts))
            else:
                why = f"maximum age {self.policy.max_age_seconds:g} s exceeded after {p.attempts} attempts"
                expired.append((p.event, why if last is None else f"{why}; last error: {_describe(last)}",
                                p.attempts))
        await self._dead_letter(expired)
        return keep

    async def _fail_over(self, pending: list[_Pending]) -> list[_Pending]:
        """Move what may move (one durable append), keep the rest pending (`all` routes, nowhere to go)."""
        assert self.failover is not None
        moves: list[tuple[Event, tuple[str, ...]]] = []
        keep: list[_Pending] = []
        for p in pending:
            try:
                decision = self.failover.reroute(p.event)
            except Exception as exc:  # a router bug must not lose or block the event: it stays here
                log.exception("failover decision failed for %s", p.event.id)
                decision = Reroute("wait", reason=f"router error: {type(exc).__name__}: {exc}")
            if decision.action == "move":
                moves.append((p.event, decision.destinations))
                continue
            p.waiting = decision.reason if decision.action == "wait" else None
            keep.append(p)
        if moves:
            await self.failover.move(moves)  # durable before the events leave the page (and the cursor moves)
            self.moved += len(moves)
        return keep

    async def _dead_letter(self, letters: list[_Letter]) -> None:
        """One durable append for a page's dead letters (nothing when there are none)."""
        if letters:
            await self.dead_letters.put_many(letters, destination=self.destination)


def _describe(error: AdapterError | None) -> str:
    return f"{type(error).__name__}: {error}" if error is not None else "unknown"
