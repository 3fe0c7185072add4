"""Ingress paced to delivery: a publish whose destination's worker is delivering but far behind what ingress
accepted for it waits, once durable, before its answer (docs/delivery.md, "Ingress paced to delivery").

The measure is each remote destination's backpressure lane (umcef.fabric.backpressure): what this gateway
accepted for the destination against what left its spool (acknowledged, moved by failover, dead-lettered).
It holds whether delivery runs in this process or its own (where what left is known from the child's
reports), and whether the worker takes its spool from memory or reads it from the store. Only ingress's
lead counts: what ingress added since the spool was last at its lowest. A backlog found at start, left by an
outage or moved in by failover drains without holding anybody (it lowers the lowest point as it goes), while
ingress outrunning a delivering worker by more than `pace_above_events` waits for it.

A worker that made no progress for STALLED_SECONDS is not delivering (its destination fails, hangs or is
ejected; its process restarts): nobody waits for it, the spool absorbs what arrives up to backpressure's
watermarks, and the lead counts again from where the spool stands when it progresses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping

from umcef.fabric.backpressure import Lane

log = logging.getLogger("umcef.pacing")

# Longer than a slow but healthy publish: a worker with its pages in flight shows no progress until one is
# acknowledged (with 0.5 s, a Kafka destination behind a 40 ms latency proxy counted as stalled under load).
STALLED_SECONDS = 2.0
# The longest a publish waits: a safety bound (a stalled worker releases its waiters sooner).
MAX_WAIT_SECONDS = 5.0
# How often waiting publishes look again. With delivery in its own process what left a spool is known every
# 50 ms (delivery_process.REPORT_SECONDS) anyway; a paced publish is one that can afford the wait.
TICK_SECONDS = 0.01
# Pacing is flow control, not a failure, but it means clients outrun a destination: said once a minute at most.
SAY_EVERY_SECONDS = 60.0


class LanePace:
    """One destination: how far ingress is ahead of its worker."""

    __slots__ = ("above", "floor", "lane", "last_out", "looked_at", "progressed_at", "said_at")

    def __init__(self, lane: Lane, above: int, now: float) -> None:
        self.lane = lane
        self.above = above
        self.said_at = -SAY_EVERY_SECONDS
        self.floor = 0  # the lowest `accepted - out` seen while the worker delivers
        self.last_out = lane.taken_out()
        self.progressed_at = now  # when `out` was last seen to grow (monotonic)
        self.looked_at = now

    def lead(self, now: float) -> int:
        out = self.lane.taken_out()
        net = self.lane.accepted - out
        # Progress: `out` grew since the last look. After a long gap between looks (nobody published: the
        # destination may have been idle) it is not known when the worker last had something to do, so it gets
        # STALLED_SECONDS from now, as a burst after an idle spell must. (Not "the spool was empty": its depth
        # is clamped at 0 and reads 0 when a restarted delivery process counted some events twice.)
        if out != self.last_out or now - self.looked_at >= STALLED_SECONDS:
            self.last_out, self.progressed_at = out, now
        self.looked_at = now
        if net < self.floor or now - self.progressed_at >= STALLED_SECONDS:
            self.floor = net  # draining what ingress did not add now, or stalled: nobody is held for it
        return net - self.floor

    def ahead(self, now: float) -> bool:
        lead = self.lead(now)
        if lead <= self.above:
            return False
        if now - self.said_at >= SAY_EVERY_SECONDS:
            self.said_at = now
            log.warning("ingress paced to destination %r: %d events ahead of its delivery (pace_above_events %d); "
                        "publishes to it wait for delivery to catch up (said at most every %g s)",
                        self.lane.name, lead, self.above, SAY_EVERY_SECONDS)
        return True


class Pacer:
    """`room_for(names)` is the pipeline's pace hook (Pipeline.pace); `stop()` releases every waiter for good.

    Waiters are grouped by the destinations they wait for: a tick looks at each group's lanes once, however
    many publishes wait (ten thousand single-event publishes may), and wakes only the groups released."""

    def __init__(self, lanes: Mapping[str, tuple[Lane, int | None]],
                 clock: Callable[[], float] = time.monotonic, max_wait: float = MAX_WAIT_SECONDS) -> None:
        now = clock()
        self.max_wait = max_wait
        self.paces = {name: LanePace(lane, above, now) for name, (lane, above) in lanes.items() if above is not None}
        self.clock = clock
        self.stopped = False
        self._groups: dict[tuple[LanePace, ...], set[asyncio.Future[None]]] = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        """Publishes waiting now."""
        return sum(len(waiters) for waiters in self._groups.values())

    async def room_for(self, names: Collection[str]) -> None:
        """Waits while any of these destinations' workers is delivering but more than its `pace_above_events`
        behind ingress, for at most `max_wait` seconds. Names without a pace (local destinations, the
        dead-letter pseudo-destination, pacing off) are not waited for."""
        group = tuple(pace for name in sorted(names) if (pace := self.paces.get(name)) is not None)
        now = self.clock()
        if self.stopped or not group or not any_ahead(group, now):
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        self._groups.setdefault(group, set()).add(waiter)
        if self._timer is None:
            self._timer = loop.call_later(TICK_SECONDS, self._tick)
        deadline = loop.call_later(self.max_wait, _settle, waiter)
        try:
            await waiter
        finally:
            deadline.cancel()
            waiters = self._groups.get(group)
            if waiters is not None:
                waiters.discard(waiter)  # (released by the deadline, or cancelled: the client went away)
                if not waiters:
                    del self._groups[group]

    def stop(self) -> None:
        """The gateway is closing: waiting publishes answer now (they are durable), and none waits from now on."""
        self.stopped = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        groups, self._groups = self._groups, {}
        for waiters in groups.values():
            for waiter in waiters:
                _settle(waiter)

    def _tick(self) -> None:
        """Wakes the groups whose destinations have room now; looks again next tick if any still wait."""
        self._timer = None
        now = self.clock()
        # Each lane looked at once a tick, however many groups share it (every lane is looked at: see any_ahead).
        ahead = {pace: pace.ahead(now) for group in self._groups for pace in group}
        for group in [g for g in self._groups if not any(ahead[pace] for pace in g)]:
            for waiter in self._groups.pop(group):
                _settle(waiter)
        if self._groups:
            self._timer = asyncio.get_running_loop().call_later(TICK_SECONDS, self._tick)


def any_ahead(group: tuple[LanePace, ...], now: float) -> bool:
    """Every lane is looked at (no short cut): a lane not looked at for long would be taken for one that was
    idle, its stall clock restarted."""
    return any([pace.ahead(now) for pace in group])


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
