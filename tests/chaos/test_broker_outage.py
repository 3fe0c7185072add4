"""Chaos (b): the Kafka broker (durable Tansu) is stopped for OUTAGE_SECONDS in the middle of the load.

Proves: nothing is lost (every 202'd event ends up in Kafka, nothing else does); delivery resumes by itself
when the broker is back (no restart of the gateway, no intervention); ingress answers 429 (with a
Retry-After) only when the spool is really at the watermark, never below it, and never lets the spool
grow past it; per-key order holds through the outage (the one publisher sends a batch only after the
previous one's 202, so each key's events must reach Kafka in the order sent).

How "the spool was full" is checked without a metrics endpoint: one publisher sends one batch at a time
(so the gateway's in-flight term is 0) and the gateway runs in-process, so around every request the test
reads how many events the delivery workers took out of the spool (acknowledged or dead-lettered;
`Gateway._drained()`, the same counter the watermark uses). Spool depth at the gateway's decision lies in
[accepted - drained_after, accepted - drained_before], where `accepted` is what the test itself counted
from 202 bodies; a 429 is correct only if depth + BATCH > WATERMARK, a 202 only if depth + BATCH <=
WATERMARK (or the spool was empty). Both are asserted with the bound that can falsify them, and while the
broker is down the two bounds coincide (nothing drains), which makes the check exact.

The broker is durable (Tansu on moto S3): a restart keeps the topic and what was delivered before the
outage, so the final read-back checks the whole load. Scaled for CI: EVENTS events.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import httpx
import orjson
import pytest

from tests.brokers import eventually, unique_name
from tests.chaos._kafka import TopicReader, assert_per_key_order
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory, http_url

EVENTS = 8_000
BATCH = 50
WATERMARK = 1_000  # backpressure.max_spooled_events: the outage fills it within a second
BEFORE_OUTAGE = 2_000  # accepted events before the broker is stopped
OUTAGE_SECONDS = 20.0
RESUME_SECONDS = 90.0  # bound on "delivery resumes by itself" after the broker is back
SOURCE = "/chaos/outage"
DEST = "kafka"


def make_batch(b: int) -> list[dict[str, Any]]:
    return [{"specversion": "1.0", "id": f"b-{b}-{i}", "source": SOURCE, "type": "t.chaos.outage",
             "partitionkey": f"k{i % 8}", "data": {"b": b, "i": i}} for i in range(BATCH)]


@dataclass
class Answer:
    phase: str
    status: int
    accepted_before: int  # events the test had seen 202'd before sending this request
    drained_before: int
    drained_after: int
    at: float

    @property
    def depth_high(self) -> int:  # spool depth at the decision is at most this ...
        return self.accepted_before - self.drained_before

    @property
    def depth_low(self) -> int:  # ... and at least this
        return self.accepted_before - self.drained_after


@pytest.mark.parametrize("delivery_process", [False, True], ids=["inline", "delivery-process"])
async def test_broker_outage_spool_holds_everything_and_429_only_when_full(
        make_gateway: GatewayFactory, kafka_broker_factory: Any, delivery_process: bool) -> None:
    began = time.monotonic()
    broker = await asyncio.to_thread(kafka_broker_factory, durable=True)
    topic = unique_name("chaos-b")
    await create_topic(broker.bootstrap, topic, partitions=3)
    gateway = await make_gateway(
        destinations={DEST: f"kafka://{broker.bootstrap}/{topic}"},
        default=DEST,
        # (normal priority up to the watermark itself: "full" is then the watermark, not 0.9 x)
        backpressure={"max_spooled_events": WATERMARK, "retry_after_seconds": 1, "shed_normal_at": 1},
        # In its own process, what left the spool reaches the watermark through the child's reports.
        delivery={"process": delivery_process},
    )
    drained = gateway._drained  # what left the spool: the counter the watermark itself uses
    phase = "before"
    answers: list[Answer] = []
    accepted: set[str] = set()
    batches: dict[int, tuple[int, int]] = {}  # per batch: (first attempt, 202), counted in requests
    timeline: dict[str, float] = {}
    # The load pauses at the outage point until the broker is really down: otherwise, on a loaded
    # machine, the rest of the load can finish while the broker is still stopping, and the outage
    # would test nothing.
    broker_down = asyncio.Event()

    async def publisher() -> None:
        async with httpx.AsyncClient(base_url=http_url(gateway), timeout=30) as client:
            for b in range(EVENTS // BATCH):
                if len(accepted) >= BEFORE_OUTAGE and not broker_down.is_set():
                    await asyncio.wait_for(broker_down.wait(), 60)
                first_sent = len(answers)
                while True:
                    d0, n = drained(), len(accepted)
                    response = await client.post("/v1/events", content=orjson.dumps(make_batch(b)),
                                                 headers={"content-type": "application/cloudevents-batch+json"})
                    answers.append(Answer(phase, response.status_code, n, d0, drained(), time.monotonic()))
                    if response.status_code == 202:
                        accepted.update(response.json()["accepted"])
                        batches[b] = (first_sent, len(answers) - 1)  # (the ticks: indexes into answers)
                        break
                    assert response.status_code == 429, f"{response.status_code}: {response.text}"
                    retry_after = float(response.headers["retry-after"])
                    assert retry_after >= 1
                    await asyncio.sleep(retry_after)  # what the gateway asked for

    async def outage() -> None:
        nonlocal phase
        deadline = time.monotonic() + 60
        while len(accepted) < BEFORE_OUTAGE:  # mid-load: wait for the load to get going
            assert time.monotonic() < deadline, "the load did not reach the outage point"
            await asyncio.sleep(0.05)
        phase = "stopping"
        timeline["stop"] = time.monotonic()
        await broker.astop()
        phase = "down"
        timeline["down"] = time.monotonic()
        broker_down.set()
        await asyncio.sleep(OUTAGE_SECONDS)  # the outage itself: a duration under test, not a wait for a state
        phase = "starting"
        await broker.astart()
        phase = "up"
        timeline["up"] = time.monotonic()

    load = asyncio.ensure_future(publisher())
    try:
        await outage()
        await asyncio.wait_for(asyncio.shield(load), RESUME_SECONDS)
    finally:
        if not load.done():
            load.cancel()
    timeline["all accepted"] = time.monotonic()

    async with TopicReader(broker.bootstrap, topic) as reader:
        want = {(SOURCE, i) for i in accepted}
        await reader.until(lambda: want <= reader.keys(),
                           max(5.0, RESUME_SECONDS - (time.monotonic() - timeline["up"])),
                           f"{len(want - reader.keys())} accepted events to reach Kafka after the broker came back")
        timeline["all delivered"] = time.monotonic()
        await reader.to_end()

    # No loss, nothing extra.
    assert len(accepted) == EVENTS
    seen = reader.keys()
    assert want == seen, f"missing {sorted(want - seen)[:5]}, extra {sorted(seen - want)[:5]}"
    for record in reader.records:
        b, i = (int(x) for x in record.ce_id.split("-")[1:])
        assert orjson.loads(record.value) == {"b": b, "i": i}
    assert_per_key_order(reader.records, batches, make_batch)
    # (a consumer can read a record before the producer has its acknowledgement, and a delivery process
    # reports what it drained every 0.05 s)
    await eventually(lambda: gateway.spool_gauge.depth == 0, what="the spool depth back to 0")

    # 429 only when full; 202 never past the watermark.
    refused = [a for a in answers if a.status == 429]
    wrong_429 = [a for a in refused if a.depth_high + BATCH <= WATERMARK]
    assert not wrong_429, f"429 while the spool had room: {wrong_429[:3]}"
    wrong_202 = [a for a in answers if a.status == 202 and a.depth_low > 0 and a.depth_low + BATCH > WATERMARK]
    assert not wrong_202, f"202 past the watermark: {wrong_202[:3]}"
    exact = [a for a in answers if a.phase == "down" and a.drained_before == a.drained_after]
    down_429 = [a for a in exact if a.status == 429]
    assert down_429, "the outage never filled the spool: the test proved nothing about backpressure"
    # While the broker is down nothing drains: the first 429 comes exactly when the next batch would not fit.
    first = down_429[0]
    assert first.depth_high + BATCH > WATERMARK >= first.depth_high, first
    assert max(a.depth_high for a in exact) <= WATERMARK

    # Delivery resumed by itself: 429s stopped and everything arrived after the broker came back.
    resumed = timeline["all delivered"] - timeline["up"]
    print(f"\n[chaos-b] {EVENTS} events, watermark {WATERMARK}, outage {timeline['up'] - timeline['stop']:.1f} s; "
          f"{len(refused)} x 429 ({len(down_429)} checked exactly during the outage, first at depth "
          f"{first.depth_high}); all delivered {resumed:.1f} s after the broker was back; "
          f"{len(reader.records) - len(seen)} duplicate records; {time.monotonic() - began:.1f} s")
