"""Ingress pacing's measure and waiting (pure logic: a backpressure lane whose drained count the test moves, a
clock the test sets). End to end against a slow real Kafka: tests/test_ingress_pacing.py."""

from __future__ import annotations

import asyncio

import pytest

from tests.brokers import eventually
from umcef.fabric.backpressure import Lane
from umcef.fabric.pacing import MAX_WAIT_SECONDS, STALLED_SECONDS, LanePace, Pacer


class Spool:
    """A lane and what left it."""

    def __init__(self) -> None:
        self.out = 0
        self.lane = Lane("d", drained=lambda: self.out)

    def accept(self, n: int) -> None:
        self.lane.add(n)
        self.lane.accepted += n


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_lead_is_what_ingress_added_beyond_what_left() -> None:
    spool = Spool()
    pace = LanePace(spool.lane, 50, 0.0)
    spool.accept(100)
    spool.out = 30
    assert pace.lead(0.1) == 70 and pace.ahead(0.1)
    spool.out = 60
    assert pace.lead(0.2) == 40 and not pace.ahead(0.2)


def test_a_backlog_draining_holds_nobody() -> None:
    """What left beyond what ingress added (a backlog found at start, failover moves in) lowers the floor: only
    what ingress adds from the lowest point on counts."""
    spool = Spool()
    pace = LanePace(spool.lane, 50, 0.0)
    spool.out = 10_000  # an earlier run's backlog delivered
    assert pace.lead(0.1) == 0
    spool.accept(40)
    spool.out += 10
    assert pace.lead(0.2) == 30
    spool.accept(100)  # ingress now outruns the worker by more than the threshold
    assert pace.ahead(0.3)


def test_a_worker_that_makes_no_progress_holds_nobody_until_it_does() -> None:
    spool = Spool()
    pace = LanePace(spool.lane, 50, 0.0)
    spool.accept(200)
    spool.out = 1
    assert pace.ahead(0.1)
    assert pace.ahead(0.1 + STALLED_SECONDS - 0.01)
    assert pace.lead(0.1 + STALLED_SECONDS) == 0  # stalled: the spool absorbs
    spool.accept(500)
    assert pace.lead(5.0) == 0
    spool.out = 100  # delivering again: the lead counts from where the spool stood
    assert pace.lead(5.1) == 0
    spool.accept(80)
    assert pace.lead(5.2) == 80 and pace.ahead(5.2)


def test_an_idle_worker_is_not_taken_for_a_stalled_one_once_it_delivers() -> None:
    spool = Spool()
    pace = LanePace(spool.lane, 50, 0.0)
    spool.accept(60)  # a burst after a long idle time: no progress seen for long, not paced yet
    assert pace.lead(100.0) == 0
    spool.out = 10
    spool.accept(100)
    assert pace.lead(100.1) == 90 and pace.ahead(100.1)


async def held_publish() -> tuple[Spool, Clock, Pacer, asyncio.Future[None]]:
    """A publish waiting: ingress is 99 events ahead of a worker that is delivering, 50 are allowed."""
    spool, clock = Spool(), Clock()
    pacer = Pacer({"d": (spool.lane, 50)}, clock)
    spool.accept(100)
    spool.out = 1
    waiting = asyncio.ensure_future(pacer.room_for({"d"}))
    await eventually(lambda: pacer.waiting == 1, 5, "the publish waiting")
    return spool, clock, pacer, waiting


async def test_a_publish_waits_while_ahead_and_goes_once_the_worker_caught_up() -> None:
    spool, _clock, pacer, waiting = await held_publish()
    await asyncio.sleep(0.05)
    assert not waiting.done()
    spool.out = 60  # 40 ahead now
    await asyncio.wait_for(waiting, 1)
    assert pacer.waiting == 0


@pytest.mark.parametrize("release", ["stall", "deadline", "stop"])
async def test_a_waiting_publish_is_released_by_a_stall_its_deadline_or_stop(release: str) -> None:
    spool, clock, pacer, waiting = await held_publish()
    if release == "stall":
        clock.now += STALLED_SECONDS
    elif release == "deadline":
        for _ in range(int(MAX_WAIT_SECONDS) - 1):  # the worker progresses, but not enough
            clock.now += 1.0
            spool.out += 1
            await asyncio.sleep(0.02)
        assert not waiting.done()
        clock.now += 1.0
    else:
        pacer.stop()
    await asyncio.wait_for(waiting, 1)
    if release == "stop":  # and nobody waits from now on
        await asyncio.wait_for(pacer.room_for({"d"}), 0.1)


async def test_what_has_no_pace_is_not_waited_for_and_a_cancelled_wait_leaves_nothing_behind() -> None:
    spool, off = Spool(), Spool()
    pacer = Pacer({"d": (spool.lane, 50), "off": (off.lane, None)}, Clock())
    spool.accept(100)
    off.accept(100_000)
    await asyncio.wait_for(pacer.room_for({"off", "local", "_deadletter"}), 0.1)
    waiting = asyncio.ensure_future(pacer.room_for({"d", "off"}))
    await eventually(lambda: pacer.waiting == 1, 5, "the publish waiting")
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pacer.waiting == 0 and not pacer._waiters
