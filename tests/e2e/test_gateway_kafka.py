"""End to end: HTTP publish to a gateway routing to Kafka (Tansu), read back with aiokafka itself."""

from __future__ import annotations

import time
from typing import Any

import httpx
import orjson
from aiokafka import AIOKafkaConsumer  # type: ignore[import-untyped]

from tests.brokers import KafkaBroker, unique_name
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory, http_url


def order(i: int) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"k-{i}", "source": "https://shop.example/checkout",
            "type": "com.example.order.placed", "subject": "orders/ünï", "partitionkey": f"order-{i % 5}",
            "time": "2026-11-21T10:00:00Z", "datacontenttype": "application/json", "priority": 3,
            "data": {"orderId": i, "total": 12.5}}


async def test_http_to_kafka_round_trip(make_gateway: GatewayFactory, kafka_broker: KafkaBroker) -> None:
    topic = unique_name("e2e")
    await create_topic(kafka_broker.bootstrap, topic, partitions=3)
    gateway = await make_gateway(
        destinations={"eu-kafka": f"kafka://{kafka_broker.bootstrap}/{topic}"},
        routes=[{"name": "orders", "filter": {"prefix": {"type": "com.example.order."}}, "to": ["eu-kafka"]}],
    )
    sent = [order(i) for i in range(40)]
    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        response = await client.post("/v1/events", content=orjson.dumps(sent),
                                     headers={"content-type": "application/cloudevents-batch+json"})
    assert response.status_code == 202

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_broker.bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False)
    await consumer.start()
    received: dict[str, Any] = {}
    try:
        deadline = time.monotonic() + 30
        while len(received) < len(sent) and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    headers = {k: v.decode() for k, v in record.headers}
                    received[headers["ce_id"]] = (record.key, headers, record.value)
    finally:
        await consumer.stop()
    assert len(received) == len(sent)
    for event in sent:
        key, headers, value = received[event["id"]]
        assert key == event["partitionkey"].encode()  # per-key order: the Kafka key is the partitionkey
        assert headers["ce_type"] == event["type"] and headers["ce_source"] == event["source"]
        assert headers["ce_subject"] == event["subject"] and headers["ce_priority"] == "3"
        assert headers["content-type"] == "application/json"
        assert orjson.loads(value) == event["data"]
