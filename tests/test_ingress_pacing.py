"""Ingress pacing end to end: clients publishing faster than a healthy Kafka destination takes the events.

The destination is a real Tansu behind a latency proxy, so its worker delivers a few thousand events a second
while four clients on the gateway's own event loop could send several times that. The 202 still means
durable; pacing makes it wait while the destination's worker is `pace_above_events` behind, so ingress runs
at delivery's speed instead of filling the spool. Without pacing (the control case, which shows the load
really does outrun delivery) the worker falls so far behind that its in-memory hand-off overflows and it
reads the spool back from disk. The same holds with delivery in its own process (the gateway knows what left
the spool from the child's reports). With the destination hanging (blackholed), ingress must not be paced at
all: the spool absorbs what arrives, as before.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests.brokers import KafkaBroker, eventually, unique_name
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory, http_url
from tests.conftest_brokers import KafkaFactory
from tests.test_dedup import MemorySpool, ToDefault, event
from umcef.fabric.backpressure import SpoolGauge
from umcef.fabric.dedup import DedupWindow
from umcef.fabric.gateway import Gateway
from umcef.fabric.limits import NO_LIMITS
from umcef.fabric.pacing import MAX_WAIT_SECONDS, STALLED_SECONDS
from umcef.fabric.pipeline import Pipeline

BATCH = 100
CLIENTS = 4
PAGE = 100  # the destination's max_in_flight: a page of the spool per publish
MEMORY = 2_000  # delivery.memory_events: the hand-off overflows beyond this
PACE = 300
FLOOD_SECONDS = 3.0
DEST = "kafka"


def batch(tag: str, n: int) -> list[dict[str, Any]]:
    return [{"specversion": "1.0", "id": f"{tag}-{n}-{i}", "source": "/pacing", "type": "t.pacing",
             "partitionkey": f"k{i % 16}", "data": {"n": n}} for i in range(BATCH)]


async def slow_kafka(kafka_broker_factory: KafkaFactory, delay_ms: float) -> tuple[KafkaBroker, str]:
    broker: KafkaBroker = await asyncio.to_thread(kafka_broker_factory, behind_proxy=True, delay_ms=delay_ms)
    topic = unique_name("pacing")
    await create_topic(broker.bootstrap, topic)
    return broker, topic


async def start(make_gateway: GatewayFactory, broker: KafkaBroker, topic: str, pace: int | None,
                process: bool) -> Gateway:
    return await make_gateway(
        destinations={DEST: {"url": f"kafka://{broker.bootstrap}/{topic}", "max_in_flight": PAGE,
                             "delivery": {"pages_in_flight": 1, "memory_events": MEMORY, "pace_above_events": pace}}},
        delivery={"process": process}, routes=[], default=DEST)


# Pacing's reach: the threshold, the requests waiting on it (each durable with its events), the page gathering
# and the page in flight.
REACH = PACE + CLIENTS * BATCH + 2 * PAGE
MODES = {"one-process": False, "delivery-process": True}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("pace", [PACE, None], ids=["paced", "unpaced-control"])
async def test_ingress_runs_at_the_speed_of_a_delivering_destination(
        mode: str, pace: int | None, kafka_broker_factory: KafkaFactory, make_gateway: GatewayFactory) -> None:
    broker, topic = await slow_kafka(kafka_broker_factory, delay_ms=10)
    gateway = await start(make_gateway, broker, topic, pace, MODES[mode])
    accepted = 0
    behind: list[int] = []  # accepted minus what left the spool, sampled while the clients publish
    deadline = time.monotonic() + FLOOD_SECONDS

    async def client(c: int) -> None:
        nonlocal accepted
        n = 0
        async with httpx.AsyncClient(base_url=http_url(gateway), timeout=30) as http:
            # (A control stops once far beyond reach: what it shows is shown, and its backlog drains sooner.)
            while time.monotonic() < deadline and not (behind and behind[-1] > MEMORY + REACH):
                response = await http.post("/v1/events", json=batch(f"c{c}", n),
                                           headers={"content-type": "application/cloudevents-batch+json"})
                assert response.status_code == 202, response.text
                accepted += BATCH
                behind.append(accepted - gateway._drained())
                n += 1

    await asyncio.gather(*(client(c) for c in range(CLIENTS)))
    assert accepted > 10 * BATCH  # (the clients did publish)
    if pace is None:  # the same load, unpaced, outruns delivery far beyond pacing's reach
        assert max(behind) > MEMORY + REACH, max(behind)
    else:
        assert max(behind) <= REACH, max(behind)
    if not MODES[mode]:  # the one-process worker's hand-off: overflowed to the store only without pacing
        feed = gateway.workers[DEST].feed
        assert feed is not None
        await eventually(lambda: (feed.from_store > 0) == (pace is None), 10, "the hand-off overflowed or not")
    await eventually(lambda: gateway._drained() >= accepted, 120, "every accepted event delivered")


@pytest.mark.parametrize("mode", MODES)
async def test_a_hanging_destination_does_not_pace_ingress(mode: str, kafka_broker_factory: KafkaFactory,
                                                           make_gateway: GatewayFactory) -> None:
    broker, topic = await slow_kafka(kafka_broker_factory, delay_ms=0)
    gateway = await start(make_gateway, broker, topic, 50, MODES[mode])
    async with httpx.AsyncClient(base_url=http_url(gateway), timeout=60) as http:
        async def publish(n: int) -> None:
            response = await http.post("/v1/events", json=batch("h", n),
                                       headers={"content-type": "application/cloudevents-batch+json"})
            assert response.status_code == 202, response.text

        await publish(0)
        await eventually(lambda: gateway._drained() >= BATCH, 30, "the first batch delivered")
        assert broker.proxy is not None
        broker.proxy.set_blackhole(True)  # connections stay open, nothing comes back: publishes hang
        started = time.monotonic()
        for n in range(1, 11):  # 1,000 events while 50 are allowed ahead: paced, each would wait its bound
            await publish(n)
        # Released once, by the stall (nothing left the spool for STALLED_SECONDS), then not paced: neither held
        # for the bound (MAX_WAIT_SECONDS) each, nor for a stall each.
        assert time.monotonic() - started < STALLED_SECONDS + 2.0 < MAX_WAIT_SECONDS, time.monotonic() - started
        broker.proxy.set_blackhole(False)


# -- where the pipeline waits (pure logic: an in-memory dedup window and spool, a pace hook that blocks) ------


class Gate:
    def __init__(self) -> None:
        self.names: list[set[str]] = []
        self.open = asyncio.Event()

    async def __call__(self, names: Any) -> None:
        self.names.append(set(names))
        await self.open.wait()


async def test_a_paced_publish_is_durable_and_claimed_before_it_waits() -> None:
    spool, gate = MemorySpool(), Gate()
    pipeline = Pipeline(DedupWindow(600.0), ToDefault(), spool, NO_LIMITS)
    pipeline.pace = gate
    waiting = asyncio.ensure_future(pipeline.publish([event(1), event(2)]))
    await eventually(lambda: gate.names, 5, "the publish waiting for delivery")
    assert spool.written == ["e1", "e2"] and gate.names == [{"default"}]
    waiting.cancel()  # the client went away: its retry must get the first answer, not a second write
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert pipeline.pacing == pipeline.pacing_bytes == pipeline.in_flight == 0
    gate.open.set()
    again = await pipeline.publish([event(1), event(2)])
    assert again.duplicates == ["e1", "e2"] and spool.written == ["e1", "e2"]
    assert gate.names == [{"default"}]  # a publish of nothing new waits for nothing


async def test_a_publish_finishing_while_the_gateway_closes_is_not_paced() -> None:
    spool, gate = MemorySpool(), Gate()
    spool.gate = asyncio.Event()  # the durable write in progress
    pipeline = Pipeline(DedupWindow(600.0), ToDefault(), spool, NO_LIMITS)
    pipeline.pace = gate
    writing = asyncio.ensure_future(pipeline.publish([event(1)]))
    await asyncio.sleep(0.05)
    pipeline.closing = True  # (the gateway then also releases publishes already waiting: Pacer.stop)
    spool.gate.set()
    assert (await asyncio.wait_for(writing, 5)).ids == ["e1"]
    assert gate.names == []


async def test_publishes_waiting_for_delivery_do_not_count_as_in_flight() -> None:
    """Publishes paced for a slow destination must not refuse other publishes (429, events or bytes in flight):
    they wait in a room of their own, as large; once it is full, a further publish answers at once instead."""
    spool, gate = MemorySpool(), Gate()
    pipeline = Pipeline(DedupWindow(600.0), ToDefault(), spool, NO_LIMITS, max_in_flight=4)
    pipeline.pace = gate
    first = asyncio.ensure_future(pipeline.publish([event(1), event(2)], size=100))
    await eventually(lambda: len(gate.names) == 1, 5, "the first publish waiting")
    assert (pipeline.in_flight, pipeline.in_flight_bytes, pipeline.pacing, pipeline.pacing_bytes) == (0, 0, 2, 100)
    second = asyncio.ensure_future(pipeline.publish([event(3), event(4)]))  # fits the room: waits too
    await eventually(lambda: len(gate.names) == 2, 5, "the second publish waiting")
    third = await asyncio.wait_for(pipeline.publish([event(5)]), 5)  # the room is full: answered at once
    assert third.ids == ["e5"] and spool.written == ["e1", "e2", "e3", "e4", "e5"]
    assert len(gate.names) == 2 and not first.done() and not second.done()
    gate.open.set()
    assert [r.ids for r in await asyncio.wait_for(asyncio.gather(first, second), 5)] == [["e1", "e2"], ["e3", "e4"]]
    assert (pipeline.in_flight, pipeline.in_flight_bytes, pipeline.pacing, pipeline.pacing_bytes) == (0, 0, 0, 0)


async def test_the_request_bytes_an_ingress_holds_move_to_the_waiting_room() -> None:
    spool, gate = MemorySpool(), Gate()
    pipeline = Pipeline(DedupWindow(600.0), ToDefault(), spool, NO_LIMITS)
    pipeline.pace = gate

    async def as_an_ingress_does() -> Any:
        with pipeline.holding(300):  # (HTTP and gRPC hold the request's bytes around decoding and publishing)
            return await pipeline.publish([event(1)])

    waiting = asyncio.ensure_future(as_an_ingress_does())
    await eventually(lambda: gate.names, 5, "the publish waiting")
    assert (pipeline.in_flight_bytes, pipeline.pacing_bytes) == (0, 300)
    gate.open.set()
    assert (await asyncio.wait_for(waiting, 5)).ids == ["e1"]
    assert (pipeline.in_flight_bytes, pipeline.pacing_bytes) == (0, 0)


async def test_the_waiting_room_holds_as_many_request_bytes_as_flight_does() -> None:
    spool, gate = MemorySpool(), Gate()
    pipeline = Pipeline(DedupWindow(600.0), ToDefault(), spool, NO_LIMITS,
                        backpressure=SpoolGauge(max_in_flight_bytes=500))
    pipeline.pace = gate
    first = asyncio.ensure_future(pipeline.publish([event(1)], size=300))
    await eventually(lambda: gate.names, 5, "the first publish waiting")
    # 300 more bytes fit in flight (nothing is), not in the waiting room (300 of 500 taken): answered at once
    second = await asyncio.wait_for(pipeline.publish([event(2)], size=300), 5)
    assert second.ids == ["e2"] and len(gate.names) == 1 and pipeline.pacing_bytes == 300
    gate.open.set()
    await asyncio.wait_for(first, 5)
    assert (pipeline.in_flight_bytes, pipeline.pacing_bytes) == (0, 0)


async def test_a_hold_that_ended_has_nothing_to_give_up() -> None:
    """A task started inside an ingress's hold inherits it; publishing after the hold ended must not release
    its bytes a second time (the budget would grow for good)."""
    spool, gate = MemorySpool(), Gate()
    gate.open.set()
    pipeline = Pipeline(DedupWindow(600.0), ToDefault(), spool, NO_LIMITS)
    pipeline.pace = gate
    started = asyncio.Event()

    async def later() -> Any:
        await started.wait()
        return await pipeline.publish([event(1)])

    with pipeline.holding(200):
        task = asyncio.ensure_future(later())
    started.set()
    assert (await asyncio.wait_for(task, 5)).ids == ["e1"]
    assert (pipeline.in_flight_bytes, pipeline.pacing_bytes) == (0, 0)
