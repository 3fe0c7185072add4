"""Chaos (a): SIGKILL the gateway repeatedly while N events are published to a Kafka (Tansu) destination.

Proves: a 202 survives SIGKILL. After the last restart on the same data dir, its delivery worker drains
the spool by itself, and a consumer reading the Kafka topic finds every event answered 202 — exactly
once after dedup on (source, id) — and no event that was never sent or never accepted. Requests cut off by
a kill ("unknown": they may or may not have been stored) are retried by the client in the next round, as
a real client would; an id may then be in Kafka even though it never got a 202, which is allowed for
unknown ids only. Among the batches go refused ones (one invalid event refuses its whole batch): none of
their events may reach Kafka. Duplicate records (a restart redelivers what was published but not yet
past the delivery cursor, and a retried unknown batch is new to the restarted gateway's dedup) are
bounded: at most the unknown ids plus, per kill, the pages in flight and a cursor delay's worth. Per-key
order holds through it all, judged on each event's first record (`assert_per_key_order`).

Run twice: with the delivery workers inside the gateway, and in their own process (`delivery.process`),
where the kill hits the gateway only and its delivery child must notice and exit by itself.

"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.brokers import unique_name
from tests.chaos._gateway import ChaosGateway, write_config
from tests.chaos._kafka import TopicReader, assert_per_key_order
from tests.conformance.target_kafka import create_topic
from umcef.adapters.local import LocalStore
from umcef.fabric.delivery import CURSOR_GROUP, spool_topic

# The 50,000 events (~65-95 s per mode on a 2-core machine); UMCEF_CHAOS_A_EVENTS runs another count.
EVENTS = int(os.environ.get("UMCEF_CHAOS_A_EVENTS", "50000"))
BATCH = 50
PUBLISHERS = 4
KILLS = 5  # SIGKILLs during the load; the gateway is started KILLS + 1 times
REFUSED_EVERY = 40  # every 40th batch sent is one the gateway must refuse (an event without `type`)
# Records a restart may deliver again: the pages in flight (4 x 500) and what was acknowledged in the
# cursor's commit delay (0.1 s at up to ~20,000 events/s), with room to spare.
REDELIVERED_PER_KILL = 6_000
SOURCE = "/chaos/sigkill"
DEST = "kafka"


def make_batch(b: int) -> list[dict[str, Any]]:
    return [{"specversion": "1.0", "id": f"a-{b}-{i}", "source": SOURCE, "type": "t.chaos.sigkill",
             "partitionkey": f"k{i % 8}", "data": {"b": b, "i": i}} for i in range(BATCH)]


def make_refused_batch(r: int) -> list[dict[str, Any]]:
    """Valid events but the last, which has no `type`: the gateway refuses the whole batch (422)."""
    events = [{**event, "id": f"r-{r}-{i}"} for i, event in enumerate(make_batch(0))]
    del events[-1]["type"]
    return events


class Load:
    def __init__(self, events: int) -> None:
        self.todo: collections.deque[int] = collections.deque(range(events // BATCH))
        self.refused_todo: collections.deque[int] = collections.deque(range(events // BATCH // REFUSED_EVERY))
        self.sent = 0
        self.refused: set[str] = set()  # sent in batches that can only be refused (answered or not)
        self.accepted: set[str] = set()
        self.unknown: set[str] = set()  # sent, answer lost (connection cut by the kill, timeout, 5xx, 429)
        self.statuses: collections.Counter[int | str] = collections.Counter()
        # For the per-key order check: one clock over every send and answer (the loop runs one at a
        # time, so the ticks order them exactly); per batch the tick of its first attempt (an attempt cut
        # off by a kill may have stored it), and per accepted batch (first sent, answered 202).
        self.clock = 0
        self.first_sent: dict[int, int] = {}
        self.accepted_batches: dict[int, tuple[int, int]] = {}

    def tick(self) -> int:
        self.clock += 1
        return self.clock

    async def round(self, gateway: ChaosGateway, kill_at: int | None) -> None:
        """Publish until the batches run out; SIGKILL the gateway once `kill_at` events are accepted,
        with the other publishers' requests in flight. Cut-off batches go back on the queue."""

        async def publisher() -> None:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
                while self.todo:
                    self.sent += 1
                    if self.refused_todo and self.sent % REFUSED_EVERY == 0:
                        await self.send_refused(client, self.refused_todo.popleft())
                        continue
                    b = self.todo.popleft()
                    ids = [e["id"] for e in make_batch(b)]
                    if b not in self.first_sent:
                        self.first_sent[b] = self.tick()
                    sent = self.first_sent[b]
                    try:
                        response = await client.post("/v1/events", content=orjson.dumps(make_batch(b)),
                                                     headers={"content-type": "application/cloudevents-batch+json"})
                    except httpx.TransportError as exc:
                        self.statuses[type(exc).__name__] += 1
                        self.unknown.update(ids)
                        self.todo.append(b)
                        if gateway.proc.poll() is not None:
                            return
                        continue
                    self.statuses[response.status_code] += 1
                    if response.status_code != 202:
                        assert response.status_code in (429, 503), f"unexpected {response.status_code}: {response.text}"
                        self.unknown.update(ids)
                        self.todo.append(b)
                        continue
                    body = response.json()
                    ok = set(body["accepted"]) | set(body.get("duplicates") or ())
                    assert ok == set(ids), f"batch {b}: partial answer {body}"
                    self.accepted.update(ok)
                    self.accepted_batches[b] = (sent, self.tick())
                    if kill_at is not None and len(self.accepted) >= kill_at and gateway.proc.poll() is None:
                        gateway.kill()

        await asyncio.gather(*(publisher() for _ in range(PUBLISHERS)))

    async def send_refused(self, client: httpx.AsyncClient, r: int) -> None:
        batch = make_refused_batch(r)
        self.refused.update(e["id"] for e in batch)
        try:
            response = await client.post("/v1/events", content=orjson.dumps(batch),
                                         headers={"content-type": "application/cloudevents-batch+json"})
        except httpx.TransportError:
            return  # cut off by a kill: refused anyway (nothing of it can be stored)
        assert response.status_code == 422 and response.json()["attribute"] == "type", response.text
        self.statuses["refused 422"] += 1


def gone(pid: int) -> bool:
    """The process has exited (a zombie waiting for its new parent to reap it counts as exited)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


async def wait_gone(pid: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not gone(pid):
        assert time.monotonic() < deadline, f"delivery process {pid} outlived its SIGKILLed gateway"
        await asyncio.sleep(0.05)


@pytest.mark.parametrize("delivery_process", [False, True], ids=["inline", "delivery-process"])
async def test_sigkill_during_load_every_accepted_event_reaches_kafka_once(
        tmp_path: Path, kafka_broker_factory: Any, delivery_process: bool) -> None:
    began = time.monotonic()
    broker = await asyncio.to_thread(kafka_broker_factory)
    topic = unique_name("chaos-a")
    await create_topic(broker.bootstrap, topic, partitions=3)
    data_dir = tmp_path / "store"
    config = write_config(tmp_path / "gateway.yaml", {
        "destinations": {DEST: f"kafka://{broker.bootstrap}/{topic}"},
        "default": DEST,
        "delivery": {"process": delivery_process},
    })

    load = Load(EVENTS)
    kills = 0
    for round_ in range(KILLS):
        gateway = await ChaosGateway.astart(data_dir, config)
        target = (round_ + 1) * EVENTS // (KILLS + 1)
        await load.round(gateway, kill_at=target)
        await asyncio.to_thread(gateway.proc.wait, 10)
        assert gateway.proc.returncode == -9, f"round {round_}: not SIGKILLed (rc {gateway.proc.returncode}):\n" \
                                              + gateway.tail()
        kills += 1
        assert len(load.accepted) >= target
        if delivery_process:  # its child notices and exits by itself (after in-flight publishes finish)
            assert gateway.delivery_pid is not None
            await wait_gone(gateway.delivery_pid, 15)

    # Recovery: the same data dir; this gateway takes the rest of the load and drains the spool.
    gateway = await ChaosGateway.astart(data_dir, config)
    try:
        await load.round(gateway, kill_at=None)
        assert not load.todo
        assert len(load.accepted) == EVENTS, "every batch is eventually answered 202 (retried after kills)"
        async with TopicReader(broker.bootstrap, topic) as reader:
            want = {(SOURCE, i) for i in load.accepted}
            await reader.until(lambda: want <= reader.keys(), 60,
                               f"{len(want - reader.keys())} accepted events in Kafka")
            # Stop gracefully: the worker must have acknowledged the whole spool, nothing left behind.
            rc = await asyncio.to_thread(gateway.stop)
            assert rc == 0, gateway.tail()
            store = LocalStore(data_dir)
            try:
                left = store.read(spool_topic(DEST), store.cursor(CURSOR_GROUP, spool_topic(DEST)), 10)
                dead = store.read("_deadletter", 0, 10)
            finally:
                store.close()
            assert not left, f"spool not drained: {len(left)}+ events after the delivery cursor"
            assert not dead, f"unexpected dead letters: {[d.payload[:200] for d in dead]}"
            await reader.to_end()
    finally:
        if gateway.proc.poll() is None:
            gateway.kill()

    seen = reader.keys()
    missing = want - seen
    assert not missing, f"{len(missing)} events answered 202 are not in Kafka, e.g. {sorted(missing)[:5]}"
    never_sent_or_accepted = {k for k in seen if k[1] not in load.accepted | load.unknown or k[0] != SOURCE}
    assert not never_sent_or_accepted, f"events in Kafka that were never accepted: {sorted(never_sent_or_accepted)[:5]}"
    assert load.refused and load.statuses["refused 422"], "the refused batches were sent and refused"
    assert not load.refused & {i for _, i in seen}, "events of refused batches reached Kafka"
    for record in reader.records:  # the records are the events that were sent, intact
        b, i = (int(x) for x in record.ce_id.split("-")[1:])
        assert orjson.loads(record.value) == {"b": b, "i": i} and record.key == f"k{i % 8}".encode()
    assert_per_key_order(reader.records, load.accepted_batches, make_batch)
    duplicates = len(reader.records) - len(seen)
    print(f"\n[chaos-a] {EVENTS} events, {kills} SIGKILLs, answers {dict(load.statuses)}, "
          f"{len(load.unknown)} ids ever unknown, {duplicates} duplicate records in Kafka (deduped), "
          f"{time.monotonic() - began:.1f} s")
    assert duplicates <= len(load.unknown) + kills * REDELIVERED_PER_KILL, \
        f"{duplicates} duplicate records: a restart redelivered more than it had in flight"
