"""Peak-EWMA RTT (fast rise, slow decay), outlier ejection, gradual re-admission, the probe loop."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import pytest

from umcef.adapters.contract import Transient
from umcef.router.estimator import Estimator, ProbeLoop
from umcef.router.model import EstimatorSettings

SETTINGS = EstimatorSettings(decay_seconds=10.0, initial_rtt_ms=50.0, eject_after_failures=3, ejection_seconds=10.0,
                             max_ejection_seconds=35.0, readmit_seconds=20.0, readmit_floor=0.1)


def rtt(est: Estimator, name: str = "d") -> float:
    return est.rtt_ms[est.slot(name)]


def test_prior_then_first_sample() -> None:
    est = Estimator(SETTINGS)
    assert rtt(est) == 50.0 and est.up[est.slot("d")] == 1 and est.admit[est.slot("d")] == 1.0
    est.observe("d", 0.010, now=0.0)
    assert rtt(est) == pytest.approx(10.0)


def test_fast_rise_slow_decay() -> None:
    est = Estimator(SETTINGS)
    est.observe("d", 0.010, now=0.0)
    est.observe("d", 0.200, now=0.1)  # one slow answer: the estimate jumps to it at once
    assert rtt(est) == pytest.approx(200.0)
    est.observe("d", 0.010, now=1.1)  # a fast one a second later only pulls it down a little
    expected = 200.0 * math.exp(-0.1) + 10.0 * (1 - math.exp(-0.1))
    assert rtt(est) == pytest.approx(expected)
    assert rtt(est) > 180.0
    now = 1.1
    while rtt(est) > 20.0:  # it takes tens of seconds of fast answers to look fast again
        now += 1.0
        est.observe("d", 0.010, now=now)
    assert 20.0 < now < 40.0


def test_decay_depends_on_time_not_sample_count() -> None:
    many, few = Estimator(SETTINGS), Estimator(SETTINGS)
    for est in (many, few):
        est.observe("d", 0.100, now=0.0)
    for i in range(1, 101):
        many.observe("d", 0.010, now=i * 0.05)
    few.observe("d", 0.010, now=5.0)
    assert rtt(many) == pytest.approx(rtt(few), rel=1e-9)


def test_pinned_destinations_ignore_samples_and_failures() -> None:
    est = Estimator(SETTINGS)
    est.pin("local", 0.0)
    est.observe("local", 1.0, now=0.0)
    for _ in range(10):
        est.failure("local", now=0.0)
    assert rtt(est, "local") == 0.0 and est.up[est.slot("local")] == 1


def test_ejection_after_consecutive_failures_then_gradual_return() -> None:
    est = Estimator(SETTINGS)
    s = est.slot("d")
    est.failure("d", "boom", now=0.0)
    est.failure("d", "boom", now=0.1)
    est.observe("d", 0.01, now=0.2)  # a success resets the count
    est.failure("d", now=0.3)
    est.failure("d", now=0.4)
    assert est.up[s] == 1
    est.failure("d", "connection refused", now=0.5)
    assert est.up[s] == 0 and est.admit[s] == 0.0
    assert est.describe_down(s) == "down (ejected: connection refused)"
    est.tick(now=10.4)
    assert est.up[s] == 0
    est.tick(now=10.5)  # ejection over: back on probation at the floor
    assert est.up[s] == 1 and est.admit[s] == pytest.approx(0.1)
    est.tick(now=20.5)
    assert est.admit[s] == pytest.approx(0.1 + 0.9 * 0.5)
    est.tick(now=30.5)
    assert est.admit[s] == 1.0


def test_a_failure_on_probation_ejects_again_for_longer() -> None:
    est = Estimator(SETTINGS)
    s = est.slot("d")
    for i in range(3):
        est.failure("d", now=float(i))
    est.tick(now=12.0)
    assert est.up[s] == 1 and est.admit[s] < 1.0
    est.failure("d", now=13.0)  # one failure while ramping
    assert est.up[s] == 0
    est.tick(now=13.0 + 19.9)
    assert est.up[s] == 0  # 2 x 10 s this time
    est.tick(now=33.0)
    assert est.up[s] == 1
    est.failure("d", now=34.0)
    est.tick(now=34.0 + 35.0)  # 40 s capped at 35
    assert est.up[s] == 1
    est.tick(now=200.0)  # a full ramp forgives the past ejections
    assert est.admit[s] == 1.0
    for i in range(3):
        est.failure("d", now=300.0 + i)
    est.tick(now=312.1)
    assert est.up[s] == 1  # back to the base 10 s


async def test_probe_loop_feeds_the_estimator() -> None:
    est = Estimator(SETTINGS)
    calls = {"ok": 0, "bad": 0, "slow": 0}

    async def ok() -> float:
        calls["ok"] += 1
        return 0.004

    async def bad() -> float:
        calls["bad"] += 1
        raise Transient("no route to host")

    async def slow() -> float:
        calls["slow"] += 1
        await asyncio.sleep(10)
        return 0.0

    fast = EstimatorSettings(probe_interval_seconds=0.01, probe_timeout_seconds=0.05, eject_after_failures=2)
    est = Estimator(fast)
    loop = ProbeLoop(est, {"ok": ok, "bad": bad, "slow": slow})
    task = asyncio.create_task(loop.run())
    for _ in range(500):  # poll with a deadline
        if not est.up[est.slot("bad")] and not est.up[est.slot("slow")]:
            break
        await asyncio.sleep(0.01)
    await loop.stop()
    await asyncio.wait_for(task, 5)
    assert rtt(est, "ok") == pytest.approx(4.0) and est.up[est.slot("ok")] == 1
    assert est.up[est.slot("bad")] == 0 and "no route to host" in est.describe_down(est.slot("bad"))
    assert est.up[est.slot("slow")] == 0 and "timed out" in est.describe_down(est.slot("slow"))
    assert calls["ok"] >= 2


def test_deliveries_clear_failures_and_never_move_the_rtt() -> None:
    est = Estimator(SETTINGS)
    asked: list[int] = []
    est.probe_soon = lambda: asked.append(1)
    est.observe("d", 0.002, now=0.0)  # probes: 2 ms
    est.delivered("d", 0.500, now=0.1)  # the first delivery includes connecting: not even a suspicion
    assert rtt(est) == pytest.approx(2.0) and not asked
    est.delivered("d", 0.003, now=0.2)  # a page of 3 ms is not slower than the broker
    assert rtt(est) == pytest.approx(2.0) and not asked
    est.failure("d", "x", now=0.3)
    est.delivered("d", 0.001, now=0.4)
    assert est._failures[est.slot("d")] == 0  # a delivery proves the destination alive
    # A slow publish is a suspicion, not a sample (it includes the page and the gateway's own scheduling,
    # which an idle destination's probes do not): it asks the probe loop for an early round.
    est.delivered("d", 0.300, now=0.5)
    assert rtt(est) == pytest.approx(2.0) and asked == [1] and est.suspicions == 1


async def test_a_slow_delivery_brings_the_next_probe_round_forward() -> None:
    answers = {"d": 0.002}
    rounds: list[float] = []

    async def probe() -> float:
        rounds.append(asyncio.get_running_loop().time())
        return answers["d"]

    async def until(done: Callable[[], bool]) -> None:
        for _ in range(500):  # poll with a deadline
            if done():
                return
            await asyncio.sleep(0.01)
        raise AssertionError("timed out")

    est = Estimator(EstimatorSettings(probe_interval_seconds=30.0, decay_seconds=10.0))
    loop = ProbeLoop(est, {"d": probe})
    task = asyncio.create_task(loop.run())
    await until(lambda: len(rounds) == 1)  # the first round runs at once
    est.delivered("d", 0.5)  # warm-up delivery
    answers["d"] = 0.300  # the broker slows down ...
    loop.EARLY_FRACTION = 100.0  # (early rounds keep interval / EARLY_FRACTION apart: 0.3 s here)
    est.delivered("d", 0.5)  # ... real traffic notices: an early round, long before the 30 s interval
    await until(lambda: rtt(est) > 100.0)
    # The spacing counts from the round's start, a loop turn or so before its probe is called (seen: 0.2997 s
    # between the calls on a loaded machine).
    assert rtt(est) == pytest.approx(300.0) and len(rounds) == 2 and rounds[1] - rounds[0] >= 0.3 - 0.02
    await loop.stop()
    await asyncio.wait_for(task, 5)
    assert est.probe_soon is None
