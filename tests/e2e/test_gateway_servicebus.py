"""End to end: HTTP publish to a gateway routing to Service Bus (the protocol-level test double),
read back with the real azure-servicebus SDK."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import orjson
import pytest
from azure.servicebus import ServiceBusClient

from tests.brokers import unique_name
from tests.conftest import GatewayFactory, http_url
from tests.servicebus_broker import ServiceBusTestBroker


def event(i: int) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"sb-{i}", "source": "/shipping", "type": "com.example.order.shipped",
            "partitionkey": f"order-{i % 2}", "datacontenttype": "application/json", "carrier": "DHL",
            "data": {"orderId": i, "tracking": f"JD{i:06d}"}}


def receive(connection_string: str, queue: str, count: int) -> list[Any]:
    got: list[Any] = []
    with ServiceBusClient.from_connection_string(connection_string) as client:
        for session in ("order-0", "order-1"):
            with client.get_queue_receiver(queue, session_id=session, max_wait_time=2) as receiver:
                for message in receiver.receive_messages(max_message_count=count, max_wait_time=5):
                    got.append(message)
                    receiver.complete_message(message)
    return got


async def test_http_to_servicebus_round_trip(make_gateway: GatewayFactory,
                                             servicebus_test_broker: ServiceBusTestBroker,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    broker = servicebus_test_broker
    queue = unique_name("e2e")
    broker.create_queue(queue, requires_session=True)
    # The connection string (the secret) comes from the environment, never from the URL or config.
    monkeypatch.setenv("UMCEF_SERVICEBUS_CONNECTION_STRING", broker.connection_string)
    gateway = await make_gateway(
        destinations={"azure": f"servicebus://{broker.namespace}/{queue}"},
        routes=[{"name": "shipping", "filter": {"suffix": {"type": ".shipped"}}, "to": ["azure"]}],
    )
    sent = [event(i) for i in range(6)]
    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        response = await client.post("/v1/events", content=orjson.dumps(sent),
                                     headers={"content-type": "application/cloudevents-batch+json"})
    assert response.status_code == 202
    await broker_wait(broker, queue, len(sent))
    messages = await asyncio.to_thread(receive, broker.connection_string, queue, len(sent))
    assert len(messages) == len(sent)
    by_id = {str(m.message_id): m for m in messages}
    for original in sent:
        message = by_id[original["id"]]
        props = {k.decode() if isinstance(k, bytes) else k: v for k, v in message.application_properties.items()}
        value = props["cloudEvents_type"]
        assert (value.decode() if isinstance(value, bytes) else value) == original["type"]
        assert message.session_id == original["partitionkey"]
        assert message.content_type == "application/json"
        assert orjson.loads(b"".join(message.body)) == original["data"]
    for session in ("order-0", "order-1"):  # per-key order through sessions
        ids = [str(m.message_id) for m in messages if m.session_id == session]
        assert ids == [e["id"] for e in sent if e["partitionkey"] == session]


async def broker_wait(broker: ServiceBusTestBroker, queue: str, count: int) -> None:
    for _ in range(300):
        if len(broker.messages(queue)) >= count:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"only {len(broker.messages(queue))} of {count} messages reached {queue}")
