"""Chaos (c): destinations that refuse some events for good — a Kafka destination whose `max_event_bytes` is
smaller than they are (the adapter refuses them), and an SQS queue whose own MaximumMessageSize is (the broker
refuses them; the second test).

Proves: every oversized event is dead-lettered at once (`Rejected` is permanent: fabricattempts 1) in the
`_deadletter` topic with its reason (fabricreason), destination (fabricdest) and content intact, and
`umcef dlq list` shows it; every other event — including those in the same pages and with the same
partition key as rejected ones — is delivered to Kafka, none twice after dedup, with per-key order kept;
no rejected event reaches Kafka, and the spool is drained (a Rejected event never blocks it).
Scaled for CI: EVENTS events, one publisher (so that ingress order defines the per-key order).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import httpx
import orjson

from tests.brokers import SqsServer, eventually, unique_name
from tests.chaos._kafka import TopicReader
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory, http_url
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC
from umcef.fabric.gateway import Gateway

EVENTS = 5_000
BATCH = 100
KEYS = 5
MAX_EVENT_BYTES = 2_048
SOURCE = "/chaos/reject"
DEST = "kafka"


def oversized(n: int) -> bool:
    return n % 7 == 3  # one event in seven, spread over every key and every page


async def publish_all(gateway: Gateway, count: int) -> tuple[set[str], set[str]]:
    """Publish events 0..count-1 in batches of BATCH, each answered 202; their ids, (refused, the others)."""
    async with httpx.AsyncClient(base_url=http_url(gateway), timeout=30) as client:
        for start in range(0, count, BATCH):
            response = await client.post("/v1/events",
                                         content=orjson.dumps([event(n) for n in range(start, start + BATCH)]),
                                         headers={"content-type": "application/cloudevents-batch+json"})
            assert response.status_code == 202, response.text
            assert len(response.json()["accepted"]) == BATCH
    return ({f"c-{n}" for n in range(count) if oversized(n)}, {f"c-{n}" for n in range(count) if not oversized(n)})


async def dead_letters(gateway: Gateway, count: int) -> list[Any]:
    """The gateway's dead letters once there are `count` of them (polled from its own store)."""
    def letters() -> list[Any]:
        return gateway.store.read(DEAD_LETTER_TOPIC, 0, 2 * count + 1000)

    await eventually(lambda: len(letters()) >= count, 60, f"{count} dead letters", poll=0.1)
    return letters()


def event(n: int) -> dict[str, Any]:
    data: dict[str, Any] = {"n": n}
    if oversized(n):
        data["pad"] = "x" * (2 * MAX_EVENT_BYTES)
    return {"specversion": "1.0", "id": f"c-{n}", "source": SOURCE, "type": "t.chaos.reject",
            "partitionkey": f"k{n % KEYS}", "data": data}


async def test_permanently_rejected_events_are_dead_lettered_and_the_rest_unaffected(
        make_gateway: GatewayFactory, kafka_broker_factory: Any) -> None:
    began = time.monotonic()
    broker = await asyncio.to_thread(kafka_broker_factory)
    topic = unique_name("chaos-c")
    await create_topic(broker.bootstrap, topic, partitions=3)
    gateway = await make_gateway(
        destinations={DEST: {"url": f"kafka://{broker.bootstrap}/{topic}",
                             "options": {"max_event_bytes": MAX_EVENT_BYTES}}},
        default=DEST,
    )
    bad, good = await publish_all(gateway, EVENTS)
    await dead_letters(gateway, len(bad))

    async with TopicReader(broker.bootstrap, topic) as reader:
        want = {(SOURCE, i) for i in good}
        await reader.until(lambda: want <= reader.keys(), 60, f"{len(want - reader.keys())} good events in Kafka")
        await reader.to_end()

    # The dead letters carry the reason, the destination, the attempt count, and the event itself.
    dead = [orjson.loads(s.payload) for s in gateway.store.read(DEAD_LETTER_TOPIC, 0, 2 * EVENTS)]
    assert sorted(d["id"] for d in dead) == sorted(bad), "each rejected event dead-lettered exactly once"
    for d in dead:
        n = int(d["id"].split("-")[1])
        assert d["fabricdest"] == DEST
        assert int(d["fabricattempts"]) == 1, d["fabricattempts"]  # permanent: no retries first
        assert "exceeds the limit of 2048 bytes" in d["fabricreason"], d["fabricreason"]
        assert d["source"] == SOURCE and d["partitionkey"] == f"k{n % KEYS}"
        assert d["data"] == event(n)["data"]

    listed = subprocess.run([sys.executable, "-m", "umcef.fabric.cli", "dlq", "list", "--data-dir",
                             str(gateway.config.data_dir), "--destination", DEST, "--json"],
                            capture_output=True, text=True, timeout=60)
    assert listed.returncode == 0, listed.stderr
    rows = [orjson.loads(line) for line in listed.stdout.splitlines() if line.strip()]
    assert sorted(r["id"] for r in rows) == sorted(bad)
    assert all(r["reason"] and "exceeds the limit" in r["reason"] and r["destination"] == DEST for r in rows)

    # The others: all there, nothing rejected leaked, per-key order kept.
    seen = reader.keys()
    assert seen == want, f"missing {sorted(want - seen)[:5]}, unexpected {sorted(seen - want)[:5]}"
    per_key: dict[bytes, list[int]] = {}
    for record in sorted(reader.records, key=lambda r: (r.partition, r.offset)):
        assert record.key is not None
        n = int(record.ce_id.split("-")[1])
        assert record.key == f"k{n % KEYS}".encode() and orjson.loads(record.value) == {"n": n}
        order = per_key.setdefault(record.key, [])
        if n not in order:  # a redelivered duplicate does not count as reordering
            order.append(n)
    for key, order in per_key.items():
        assert order == sorted(order), f"key {key!r} out of order: {order[:20]}"
    assert sum(len(o) for o in per_key.values()) == len(good)

    # A Rejected event never blocks the spool: the worker's cursor reached the end.
    worker = gateway.workers[DEST]
    await eventually(lambda: not gateway.store.read(worker.topic, gateway.store.cursor("delivery", worker.topic), 1),
                     10, "the delivery cursor to reach the end of the spool", poll=0.05)
    print(f"\n[chaos-c] {EVENTS} events, {len(bad)} rejected → _deadletter, {len(good)} delivered in key order, "
          f"{len(reader.records) - len(seen)} duplicate records; {time.monotonic() - began:.1f} s")


QUEUE_MAX_BYTES = 1_024  # the queue's own MaximumMessageSize (SQS's lowest): the broker refuses bigger messages


async def test_a_queue_that_refuses_messages_gets_them_dead_lettered_and_the_rest_delivered(
        make_gateway: GatewayFactory, sqs_server: SqsServer) -> None:
    """The same, refused by the broker itself rather than by the adapter's own size check: an SQS queue
    (moto's server) whose MaximumMessageSize is below some events, the adapter told to let up to 256 KiB
    through. moto refuses a whole SendMessageBatch for one such entry, so the adapter halves the batch until
    the refused event is alone: the others of its batch arrive."""
    import boto3

    from umcef.adapters.sqs import from_url

    queue = unique_name("chaos-c-sqs")
    boto3.client("sqs", **sqs_server.client_kwargs()).create_queue(
        QueueName=queue, Attributes={"MaximumMessageSize": str(QUEUE_MAX_BYTES)})
    options = {"aws_access_key_id": sqs_server.access_key, "aws_secret_access_key": sqs_server.secret_key,
               "region_name": sqs_server.region, "endpoint_url": sqs_server.endpoint_url}
    gateway = await make_gateway(destinations={"sqs": {"url": f"sqs://{queue}",
                                                       "options": {**options, "max_event_bytes": 262_144}}},
                                 default="sqs")
    count = 300
    bad, good = await publish_all(gateway, count)
    dead = [orjson.loads(s.payload) for s in await dead_letters(gateway, len(bad))]
    assert sorted(d["id"] for d in dead) == sorted(bad), "each refused event dead-lettered exactly once"
    for d in dead:
        assert d["fabricdest"] == "sqs" and int(d["fabricattempts"]) == 1, d  # permanent: no retries first
        assert f"shorter than {QUEUE_MAX_BYTES} bytes" in d["fabricreason"], d["fabricreason"]  # the broker's words
        assert d["data"] == event(int(d["id"].split("-")[1]))["data"]

    seen: list[str] = []
    consumer = from_url(f"sqs://{queue}", **options, wait_seconds=1)

    async def handler(delivery: Any) -> None:
        seen.append(delivery.event.id)

    task = asyncio.create_task(consumer.consume(handler))
    try:
        await eventually(lambda: task.done() or good <= set(seen), 60, "the good events in the queue", poll=0.1)
        assert not task.done(), task
        await asyncio.sleep(1.0)  # anything refused would have come by now too
    finally:
        await consumer.stop_consuming()
        await asyncio.wait_for(task, 10)
        await consumer.close()
    assert set(seen) == good, f"refused events in the queue: {sorted(set(seen) - good)[:5]}"
    print(f"\n[chaos-c sqs] {count} events, {len(bad)} refused by the queue → _deadletter, "
          f"{len(seen) - len(good)} duplicate messages")
