"""End to end: HTTP publish to a gateway routing to Pub/Sub (Google's emulator), read back with its own client."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

import httpx
import orjson

from tests.brokers import PubsubEmulator, unique_name
from tests.conftest import GatewayFactory, http_url


def event(i: int) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"p-{i}", "source": "/billing", "type": "com.example.payment.authorized",
            "partitionkey": f"order-{i % 3}", "datacontenttype": "application/octet-stream",
            "data_base64": base64.b64encode(bytes([i, 0, 255])).decode()}


async def test_http_to_pubsub_round_trip(make_gateway: GatewayFactory, pubsub_emulator: PubsubEmulator) -> None:
    project, topic, sub = pubsub_emulator.project, unique_name("e2e"), unique_name("e2e-sub")
    publisher, subscriber = pubsub_emulator.publisher_client(), pubsub_emulator.subscriber_client()
    topic_path = publisher.topic_path(project, topic)
    sub_path = subscriber.subscription_path(project, sub)
    await asyncio.to_thread(publisher.create_topic, name=topic_path)
    await asyncio.to_thread(subscriber.create_subscription,
                            request={"name": sub_path, "topic": topic_path, "enable_message_ordering": True})
    gateway = await make_gateway(
        destinations={"gcp": f"pubsub://{project}/{topic}?emulator={pubsub_emulator.host}"},
        routes=[{"name": "payments", "filter": {"prefix": {"type": "com.example.payment."}}, "to": ["gcp"]}],
    )
    sent = [event(i) for i in range(12)]
    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        response = await client.post("/v1/events", content=orjson.dumps(sent),
                                     headers={"content-type": "application/cloudevents-batch+json"})
    assert response.status_code == 202

    received: dict[str, Any] = {}
    deadline = time.monotonic() + 30
    while len(received) < len(sent) and time.monotonic() < deadline:
        pulled = await asyncio.to_thread(subscriber.pull, request={"subscription": sub_path, "max_messages": 50},
                                         timeout=5)
        for item in pulled.received_messages:
            received[item.message.attributes["ce-id"]] = item.message
        if pulled.received_messages:
            await asyncio.to_thread(subscriber.acknowledge, request={
                "subscription": sub_path, "ack_ids": [m.ack_id for m in pulled.received_messages]})
    assert len(received) == len(sent)
    for original in sent:
        message = received[original["id"]]
        assert message.data == base64.b64decode(original["data_base64"])
        assert message.ordering_key == original["partitionkey"]
        assert message.attributes["ce-type"] == original["type"]
        assert message.attributes["content-type"] == "application/octet-stream"
