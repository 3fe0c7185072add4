"""A configured source feeds the pipeline exactly like HTTP ingress: routed, deduplicated, durable."""

from __future__ import annotations

import asyncio
import time

import orjson
from aiokafka import AIOKafkaProducer

from tests.brokers import KafkaBroker, eventually, unique_name
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory
from umcef.adapters.local import Record
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format


async def test_local_source_runs_through_the_pipeline(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        destinations={"orders": "local://orders"},
        routes=[{"name": "orders", "filter": {"prefix": {"type": "com.example.order."}}, "to": ["orders"]}],
        sources=[{"name": "inbox", "url": "local://inbox?group=gateway"}],
    )
    events = [Event({"specversion": "1.0", "id": f"s{i}", "source": "/legacy", "type": "com.example.order.placed"},
                    {"n": i}) for i in range(20)]
    duplicate = events[3]
    records = [Record("inbox", json_format.encode(e), e.id) for e in [*events, duplicate]]
    await gateway.store.append(records)
    runner = gateway.sources["inbox"]
    deadline = time.monotonic() + 10
    while runner.accepted < len(records):
        assert time.monotonic() < deadline, f"source processed only {runner.accepted} of {len(records)}"
        await asyncio.sleep(0.02)
    ids = [orjson.loads(e.payload)["id"] for e in gateway.store.read("orders")]
    assert ids == [f"s{i}" for i in range(20)]  # routed in order, the duplicate dropped by dedup


async def test_a_source_whose_topic_is_missing_at_start_consumes_once_it_exists(
        make_gateway: GatewayFactory, kafka_broker: KafkaBroker) -> None:
    # Before, the source's task ended at the first failed consume (the broker down at start, the topic not
    # created yet) and the source never consumed again, with /readyz still OK.
    topic = unique_name("late-source")
    gateway = await make_gateway(destinations={"inbox": "local://inbox"}, default="inbox",
                                 sources=[{"name": "late", "url": f"kafka://{kafka_broker.bootstrap}/{topic}?group=g"}])
    runner = gateway.sources["late"]
    await eventually(lambda: runner.restarts >= 1, 30, "a failed consume started again")
    await create_topic(kafka_broker.bootstrap, topic, partitions=1)
    event = Event({"specversion": "1.0", "id": "late-1", "source": "/legacy", "type": "com.example.order.placed"},
                  {"n": 1})
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker.bootstrap)
    await producer.start()
    try:
        await producer.send_and_wait(topic, json_format.encode(event),
                                     headers=[("content-type", b"application/cloudevents+json")])
    finally:
        await producer.stop()
    await eventually(lambda: runner.accepted == 1, 60, "the event consumed from the topic created late")
    assert [orjson.loads(e.payload)["id"] for e in gateway.store.read("inbox")] == ["late-1"]
