"""Chaos (c): a Kafka destination that refuses some events for good (`max_event_bytes` smaller than they are).

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

from tests.brokers import unique_name
from tests.chaos._kafka import TopicReader
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory, http_url
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC

EVENTS = 5_000
BATCH = 100
KEYS = 5
MAX_EVENT_BYTES = 2_048
SOURCE = "/chaos/reject"
DEST = "kafka"


def oversized(n: int) -> bool:
    return n % 7 == 3  # one event in seven, spread over every key and every page


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
    async with httpx.AsyncClient(base_url=http_url(gateway), timeout=30) as client:
        for start in range(0, EVENTS, BATCH):
            response = await client.post("/v1/events",
                                         content=orjson.dumps([event(n) for n in range(start, start + BATCH)]),
                                         headers={"content-type": "application/cloudevents-batch+json"})
            assert response.status_code == 202, response.text
            assert len(response.json()["accepted"]) == BATCH
    bad = {f"c-{n}" for n in range(EVENTS) if oversized(n)}
    good = {f"c-{n}" for n in range(EVENTS) if not oversized(n)}

    # The dead letters: polled from the gateway's own store.
    deadline = time.monotonic() + 60
    while len(letters := gateway.store.read(DEAD_LETTER_TOPIC, 0, 2 * EVENTS)) < len(bad):
        assert time.monotonic() < deadline, f"{len(letters)} of {len(bad)} dead letters after 60 s"
        await asyncio.sleep(0.1)

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
    deadline = time.monotonic() + 10
    while gateway.store.read(worker.topic, gateway.store.cursor("delivery", worker.topic), 1):
        assert time.monotonic() < deadline, "the delivery cursor did not reach the end of the spool"
        await asyncio.sleep(0.05)
    print(f"\n[chaos-c] {EVENTS} events, {len(bad)} rejected → _deadletter, {len(good)} delivered in key order, "
          f"{len(reader.records) - len(seen)} duplicate records; {time.monotonic() - began:.1f} s")
