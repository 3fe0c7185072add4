"""End to end: HTTP publish to a gateway routing to SQS (moto server), read back with boto3 itself."""

from __future__ import annotations

import asyncio
import time
from typing import Any
from urllib.parse import quote

import boto3
import httpx
import orjson
import pytest

from tests.brokers import SqsServer, unique_name
from tests.conftest import GatewayFactory, http_url


def event(i: int) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"q-{i}", "source": "/crm", "type": "com.example.customer.created",
            "partitionkey": f"cust-{i % 2}", "subject": "grüße", "datacontenttype": "application/json",
            "data": {"customerId": i}}


async def test_http_to_sqs_fifo_round_trip(make_gateway: GatewayFactory, sqs_server: SqsServer,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in sqs_server.env().items():  # credentials come from the environment, as in production
        monkeypatch.setenv(name, value)
    sqs = boto3.client("sqs", **sqs_server.client_kwargs())
    queue = unique_name("e2e") + ".fifo"
    queue_url = sqs.create_queue(QueueName=queue, Attributes={"FifoQueue": "true"})["QueueUrl"]
    endpoint = quote(sqs_server.endpoint_url, safe="")
    gateway = await make_gateway(
        destinations={"aws": f"sqs://{queue}?region={sqs_server.region}&endpoint={endpoint}"},
        routes=[{"name": "crm", "filter": {"prefix": {"type": "com.example.customer."}}, "to": ["aws"]}],
    )
    sent = [event(i) for i in range(10)]
    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        response = await client.post("/v1/events", content=orjson.dumps(sent),
                                     headers={"content-type": "application/cloudevents-batch+json"})
    assert response.status_code == 202

    received: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while len(received) < len(sent) and time.monotonic() < deadline:
        answer = await asyncio.to_thread(sqs.receive_message, QueueUrl=queue_url, MaxNumberOfMessages=10,
                                         MessageAttributeNames=["All"], MessageSystemAttributeNames=["All"],
                                         WaitTimeSeconds=1)
        for message in answer.get("Messages", []):
            received.append(message)
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    assert len(received) == len(sent)
    by_id = {m["MessageAttributes"]["ce-id"]["StringValue"]: m for m in received}
    for original in sent:
        message = by_id[original["id"]]
        assert orjson.loads(message["Body"]) == original["data"]
        attributes = message["MessageAttributes"]
        assert attributes["ce-type"]["StringValue"] == original["type"]
        assert attributes["ce-subject"]["StringValue"] == "grüße"
        assert message["Attributes"]["MessageGroupId"] == original["partitionkey"]
    for key in ("cust-0", "cust-1"):  # FIFO per key
        ids = [m["MessageAttributes"]["ce-id"]["StringValue"] for m in received
               if m["Attributes"]["MessageGroupId"] == key]
        assert ids == [e["id"] for e in sent if e["partitionkey"] == key]
