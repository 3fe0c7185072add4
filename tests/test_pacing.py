"""Ingress pacing's measure and waiting (pure logic: a backpressure lane whose drained count the test moves, a
clock the test sets). End to end against a slow real Kafka: tests/test_ingress_pacing.py."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.brokers import eventually
from tests.test_dedup import Clock
from umcef.fabric.backpressure import Lane
from umcef.fabric.pacing import MAX_WAIT_SECONDS, STALLED_SECONDS, LanePace, Pacer, any_ahead


class Spool:
    """A lane, what its worker took out of it (`out`) and the dead letters other workers put into it (`into`)."""

    def __init__(self) -> None:
        self.out = 0
        self.into = 0
        self.lane = Lane("d", drained=lambda: self.out - self.into, spooled_in=lambda: self.into)

    def accept(self, n: int) -> None:
        self.lane.add(n)
        self.lane.accepted += n


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
    assert pace.lead(3.0) == 0 and pace.lead(4.0) == 0
    spool.out = 100  # delivering again: the lead counts from where the spool stood
    assert pace.lead(4.1) == 0
    spool.accept(80)
    assert pace.lead(4.2) == 80 and pace.ahead(4.2)


def test_a_burst_after_an_idle_spell_is_paced_from_its_start() -> None:
    """Nobody looked for a while (nobody published): when the worker last had something to do is not known,
    so the stall clock starts at the burst, not at the last delivery (long ago)."""
    spool = Spool()
    pace = LanePace(spool.lane, 50, 0.0)
    spool.accept(10)
    spool.out = 10
    assert pace.lead(1.0) == 0
    spool.accept(100)  # a burst 100 s later
    assert pace.lead(101.0) == 100 and pace.ahead(101.0)
    assert pace.ahead(102.0)  # (a waiting publish looks every TICK_SECONDS)
    assert pace.lead(101.0 + STALLED_SECONDS) == 0  # and if the worker then takes nothing, it is stalled


def test_a_lane_not_looked_at_while_others_were_is_not_taken_for_an_idle_one() -> None:
    """A publish waiting for two destinations looks at both every time: the hanging one stays stalled once
    the other catches up, instead of getting a fresh stall period."""
    busy, hung, clock = Spool(), Spool(), Clock()
    pacer = Pacer({"busy": (busy.lane, 50), "hung": (hung.lane, 50)}, clock)
    busy.accept(100)
    hung.accept(100)
    busy.out = hung.out = 1
    assert pacer.paces["busy"].ahead(clock.now) and pacer.paces["hung"].ahead(clock.now)
    for _ in range(30):  # busy delivers (too slowly), hung takes nothing: every look sees both
        clock.now += 0.5
        busy.out += 1
        assert any_ahead((pacer.paces["busy"], pacer.paces["hung"]), clock.now)
    busy.out = 100
    assert not any_ahead((pacer.paces["busy"], pacer.paces["hung"]), clock.now + 0.01)


def test_dead_letters_put_into_the_spool_are_neither_ingress_nor_progress() -> None:
    """Another worker dead-lettering into this destination's spool: more to deliver, but not what ingress added,
    and the worker of a hanging destination still counts as stalled."""
    spool = Spool()
    pace = LanePace(spool.lane, 50, 0.0)
    spool.accept(40)
    spool.out = 5
    assert pace.lead(0.1) == 35
    for step in range(1, 20):
        spool.into += 5  # dead letters arriving, the worker taking nothing
        lead = pace.lead(0.1 + step * 0.5)
        assert lead == (35 if step * 0.5 < STALLED_SECONDS else 0), (step, lead)


async def held_publish(max_wait: float = MAX_WAIT_SECONDS) -> tuple[Spool, Clock, Pacer, asyncio.Future[None]]:
    """A publish waiting: ingress is 99 events ahead of a worker that is delivering, 50 are allowed."""
    spool, clock = Spool(), Clock()
    pacer = Pacer({"d": (spool.lane, 50)}, clock, max_wait)
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
    spool, clock, pacer, waiting = await held_publish(max_wait=0.5 if release == "deadline" else MAX_WAIT_SECONDS)
    if release == "stall":
        for _ in range(int(STALLED_SECONDS / 0.5)):  # the worker takes nothing (the waiter's ticks look meanwhile)
            clock.now += 0.5
            await asyncio.sleep(0.03)
    elif release == "deadline":
        for _ in range(4):  # the worker progresses, but not enough
            clock.now += 0.05
            spool.out += 1
            await asyncio.sleep(0.05)
        assert not waiting.done()
    else:
        pacer.stop()
    await asyncio.wait_for(waiting, 1)
    assert pacer.waiting == 0 and not pacer._groups
    if release == "stop":  # and nobody waits from now on
        await asyncio.wait_for(pacer.room_for({"d"}), 0.1)


async def test_many_publishes_waiting_for_the_same_destinations_are_released_together() -> None:
    fast, slow, clock = Spool(), Spool(), Clock()
    pacer = Pacer({"fast": (fast.lane, 50), "slow": (slow.lane, 50)}, clock)
    fast.accept(100)
    slow.accept(100)
    fast.out = slow.out = 1
    both = [asyncio.ensure_future(pacer.room_for({"fast", "slow"})) for _ in range(500)]
    one = [asyncio.ensure_future(pacer.room_for({"fast"})) for _ in range(500)]
    await eventually(lambda: pacer.waiting == 1000, 5, "the publishes waiting")
    assert len(pacer._groups) == 2
    fast.out = 60  # room on `fast` only: the publishes that wait for `slow` too keep waiting
    await asyncio.wait_for(asyncio.gather(*one), 1)
    await asyncio.sleep(0.05)
    assert not any(w.done() for w in both)
    slow.out = 60
    await asyncio.wait_for(asyncio.gather(*both), 1)
    assert pacer.waiting == 0 and not pacer._groups


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
    assert pacer.waiting == 0 and not pacer._groups


def test_pacing_is_said_in_the_log_at_most_once_a_minute(caplog: pytest.LogCaptureFixture) -> None:
    spool = Spool()
    pace = LanePace(spool.lane, 50, 0.0)
    spool.accept(100)
    spool.out = 1
    with caplog.at_level(logging.WARNING, logger="umcef.pacing"):
        for step in range(10):  # the worker delivering, too slowly: ahead at every look, for 50 s
            spool.out += 1
            assert pace.ahead(step * 5.0)
        spool.out += 1
        assert pace.ahead(61.0)
    said = [r.getMessage() for r in caplog.records if r.name == "umcef.pacing"]
    assert len(said) == 2 and "destination 'd': 98 events ahead" in said[0], said
