"""One conformance suite, run unchanged against every adapter over a real broker.

Every run tags its events with a fresh `confrun` extension so leftovers in a broker never count.
Values are compared in their CloudEvents canonical string form: the binary-mode bindings carry every
attribute as a string, which is lossless within the CloudEvents type system.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests.conformance.targets import Entity, Target
from tests.roundtrip import canonical
from umcef.adapters.contract import Adapter, Delivery, NotFound, Rejected, Transient
from umcef.fabric.bindings.http import attribute_to_string
from umcef.fabric.event import Event

# Backends join this list as their adapters land.
BACKENDS = ["local", "kafka", "pubsub", "servicebus", "sqs"]
pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=BACKENDS)
def target(request: pytest.FixtureRequest) -> Target:
    found: Target = request.getfixturevalue(f"target_{request.param}")
    return found


@contextlib.asynccontextmanager
async def opened(target: Target, url: str) -> AsyncIterator[Adapter]:
    adapter = target.open(url)
    try:
        yield adapter
    finally:
        await adapter.close()


def sample_events(run: str, count: int) -> list[Event]:
    """Every attribute type, optional attributes present and absent, binary/JSON/text data, unicode."""
    events = []
    for i in range(count):
        attrs: dict[str, Any] = {"specversion": "1.0", "id": f"{run}-{i}", "source": "https://conf.example/src",
                                 "type": "com.example.conformance", "confrun": run, "seqno": i,
                                 "partitionkey": f"key-{i % 13}"}
        data: Any
        kind = i % 4
        if kind == 0:
            attrs.update(datacontenttype="application/json", subject="ünïcødé ✓ 𝄞 主题",
                         time="2026-11-21T10:00:00.123456Z", dataschema="https://schemas.example/order/v1")
            data = {"orderId": i, "lines": [{"sku": "A", "qty": 2}], "note": "grüße 🚚", "ok": True, "none": None}
        elif kind == 1:
            attrs.update(datacontenttype="application/octet-stream", flag=True, small=-(2**31), big=2**31 - 1,
                         blob=bytes(range(0, 256, 7)), link="urn:example:thing")
            data = bytes(range(256)) * 2
        elif kind == 2:
            attrs.update(datacontenttype="text/plain; charset=utf-8", time="2026-11-21T12:00:00+02:00")
            data = f"line {i}\nzweite Zeile — ✓"
        else:
            data = None  # no data, no optional attributes
        events.append(Event(attrs, data))
    return events


class Collector:
    """Consumes from a source in the background; `behaviour(delivery, seen_before)` settles each delivery."""

    def __init__(self, adapter: Adapter, run: str,
                 behaviour: Callable[[Delivery, int], Any] | None = None, max_in_flight: int = 64) -> None:
        self.adapter = adapter
        self.run = run
        self.behaviour = behaviour
        self.received: list[Delivery] = []
        self.seen_before: list[int] = []  # per received delivery: how often its event had been seen already
        self.counts: dict[str, int] = defaultdict(int)
        self.task = asyncio.create_task(adapter.consume(self.handle, max_in_flight=max_in_flight))

    async def handle(self, delivery: Delivery) -> None:
        if delivery.event.attributes.get("confrun") != self.run:
            return  # leftovers from other runs: acked, never counted
        event_id = delivery.event.id
        seen = self.counts[event_id]
        self.counts[event_id] += 1
        self.received.append(delivery)
        self.seen_before.append(seen)
        if self.behaviour is not None:
            await self.behaviour(delivery, seen)

    async def wait_for(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.task.done():
                self.task.result()  # surfaces the consumer's exception
                raise AssertionError(f"consumer stopped before {what}")
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what}; "
                                     f"got {len(self.counts)} distinct events")
            await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.adapter.stop_consuming()
        await asyncio.wait_for(self.task, 30)


async def publish_all(adapter: Adapter, events: list[Event], chunk: int = 100) -> None:
    for start in range(0, len(events), chunk):
        outcomes = await adapter.publish(events[start:start + chunk])
        assert [o.event_id for o in outcomes] == [e.id for e in events[start:start + chunk]]
        failed = [o for o in outcomes if not o.ok]
        assert not failed, f"{len(failed)} events failed, first: {failed[0].error!r}"


async def test_thousand_events_round_trip(target: Target) -> None:
    run = uuid.uuid4().hex[:12]
    entity = await target.new_entity()
    events = sample_events(run, 1000)
    async with opened(target, entity.sink_url) as sink, opened(target, entity.source_url) as source:
        collector = Collector(source, run)
        await publish_all(sink, events)  # consumed concurrently: brokers like moto slow down as queues deepen
        await collector.wait_for(lambda: len(collector.counts) == len(events), 120, "all 1000 events")
        await collector.stop()
    got = {d.event.id: d.event for d in collector.received}
    for event in events:
        assert canonical(got[event.id]) == canonical(event), f"{target.name}: {event.id} changed in transit"


async def test_largest_event_passes_one_byte_more_is_rejected(target: Target) -> None:
    run = uuid.uuid4().hex[:12]
    entity = await target.new_entity()
    async with opened(target, entity.sink_url) as sink, opened(target, entity.source_url) as source:
        limit = sink.capabilities.max_event_bytes
        base = sample_events(run, 4)[2]  # text data: its size grows byte for byte with the padding
        event = Event({**base.attributes, "id": f"{run}-max"}, "")
        event.data = "x" * max(0, limit - sink.encoded_size(event))
        for _ in range(5):  # converge where the encoding adds overhead per byte
            event.data = "x" * (len(event.data) + limit - sink.encoded_size(event))
        assert sink.encoded_size(event) == limit
        bigger = Event({**event.attributes, "id": f"{run}-over"}, event.data + "x")
        outcomes = await sink.publish([event, bigger])
        assert outcomes[0].ok, outcomes[0].error
        assert isinstance(outcomes[1].error, Rejected), outcomes[1]
        assert str(limit) in str(outcomes[1].error)
        collector = Collector(source, run)
        await collector.wait_for(lambda: f"{run}-max" in collector.counts, 60, "the largest event")
        await collector.stop()
        assert f"{run}-over" not in collector.counts
        assert collector.received[0].event.data in (event.data, event.data.encode())


async def test_per_key_order_under_concurrent_publishing(target: Target) -> None:
    run = uuid.uuid4().hex[:12]
    entity = await target.new_entity(ordered=True)
    keys, per_key = 8, 25
    async with opened(target, entity.sink_url) as sink, opened(target, entity.source_url) as source:
        if not sink.capabilities.ordering:
            pytest.skip(f"{target.name} declares no per-key ordering")

        async def publisher(key: int) -> None:
            for n in range(per_key):
                event = Event({"specversion": "1.0", "id": f"{run}-{key}-{n}", "source": "/order", "type": "t",
                               "confrun": run, "partitionkey": f"k{key}", "n": n}, None)
                (outcome,) = await sink.publish([event])
                assert outcome.ok, outcome.error

        collector = Collector(source, run)
        await asyncio.gather(*(publisher(k) for k in range(keys)))
        await collector.wait_for(lambda: len(collector.counts) == keys * per_key, 120, "all ordered events")
        await collector.stop()
    sequences: dict[str, list[int]] = defaultdict(list)
    for delivery in collector.received:
        attrs = delivery.event.attributes
        n = int(attribute_to_string(attrs["n"]))
        if n not in sequences[attrs["partitionkey"]]:
            sequences[attrs["partitionkey"]].append(n)
    for key, seq in sequences.items():
        assert seq == list(range(per_key)), f"{target.name}: key {key} out of order: {seq}"


async def test_nack_leads_to_redelivery(target: Target) -> None:
    run = uuid.uuid4().hex[:12]
    entity = await target.new_entity()
    events = sample_events(run, 5)

    async def nack_first(delivery: Delivery, seen: int) -> None:
        if seen == 0:
            await delivery.nack(requeue_after=0)
        else:
            await delivery.ack()

    async with opened(target, entity.sink_url) as sink, opened(target, entity.source_url) as source:
        await publish_all(sink, events)
        collector = Collector(source, run, nack_first)
        await collector.wait_for(lambda: all(collector.counts[e.id] >= 2 for e in events), 90,
                                 "every nacked event to come back")
        await collector.stop()
    first = [d.attempt for d, seen in zip(collector.received, collector.seen_before, strict=True) if seen == 0]
    again = [d.attempt for d, seen in zip(collector.received, collector.seen_before, strict=True) if seen >= 1]
    assert first and all(a == 1 for a in first), first
    assert again and all(a >= 2 for a in again), f"{target.name}: redeliveries must count attempts: {again}"


async def test_failing_handler_leads_to_redelivery(target: Target) -> None:
    run = uuid.uuid4().hex[:12]
    entity = await target.new_entity()
    events = sample_events(run, 3)

    async def fail_first(delivery: Delivery, seen: int) -> None:
        if seen == 0:
            raise RuntimeError("handler failed on purpose")

    async with opened(target, entity.sink_url) as sink, opened(target, entity.source_url) as source:
        await publish_all(sink, events)
        collector = Collector(source, run, fail_first)
        await collector.wait_for(lambda: all(collector.counts[e.id] >= 2 for e in events), 90,
                                 "every failed event to come back")
        await collector.stop()


async def test_consumer_crash_leads_to_redelivery(target: Target) -> None:
    run = uuid.uuid4().hex[:12]
    entity = await target.new_entity()
    events = sample_events(run, 5)
    hang = asyncio.Event()

    async def never_settle(delivery: Delivery, seen: int) -> None:
        await hang.wait()

    async with opened(target, entity.sink_url) as sink:
        await publish_all(sink, events)
    crashed = target.open(entity.source_url)
    first = Collector(crashed, run, never_settle)
    await first.wait_for(lambda: len(first.counts) >= 1, 60, "the first consumer to receive")
    first.task.cancel()  # the consumer dies holding unsettled deliveries
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await first.task
    await crashed.close()
    hang.set()
    async with opened(target, entity.source_url) as source:
        second = Collector(source, run)
        await second.wait_for(lambda: len(second.counts) == len(events), 60 + target.redelivery_seconds,
                              "redelivery to a new consumer")
        await second.stop()


async def test_probe_measures_rtt_and_fails_cleanly_when_down(target: Target) -> None:
    entity = await target.new_entity()
    async with opened(target, entity.sink_url) as sink:
        rtts = [await sink.probe() for _ in range(3)]
    assert all(0 < rtt < 2.0 for rtt in rtts), rtts
    async with opened(target, target.unreachable_url()) as dead:
        started = time.monotonic()
        with pytest.raises(Transient):
            await dead.probe()
        assert time.monotonic() - started < 30


async def test_unknown_entity_is_not_found(target: Target) -> None:
    missing: Entity = target.missing_entity()
    event = sample_events(uuid.uuid4().hex[:12], 1)[0]
    async with opened(target, missing.sink_url) as sink:
        (outcome,) = await sink.publish([event])
        assert isinstance(outcome.error, NotFound), outcome
    async with opened(target, missing.source_url) as source:
        with pytest.raises(NotFound):
            await asyncio.wait_for(source.consume(lambda d: d.ack()), 30)
