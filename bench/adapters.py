"""Adapter throughput through our contract, per broker, plus the Kafka client comparison.

    python bench/adapters.py             # full run (about 2 minutes)
    python bench/adapters.py --quick     # smaller runs, for a smoke test (about 30 s)
    python bench/adapters.py --only kafka,local
    python bench/adapters.py --profile   # also cProfile our Kafka publish path (not part of the figures)

Run from the repo root. It starts the test brokers itself (`tests/brokers.py`) and stops them:
Tansu for Kafka, Google's Pub/Sub emulator, moto (in its own process) for SQS, and the Service Bus
TEST DOUBLE (`tests/servicebus_broker`, in its own process so it does not share our GIL). Writes
bench/results/adapters.json and adapters.png.

What is measured, per adapter, through `open_adapter(url)` and the contract only:

- publish: events/s of `await adapter.publish(batch)` with batches of 100, one batch after the other
  (each call returns when the broker acknowledged every event of it), every outcome checked;
- consume: events/s of `consume(handler, max_in_flight=64)` with a handler that does `await
  delivery.ack()` and counts, on an entity prefilled beforehand; timed from the first delivery to the
  N-th (group join / first poll is reported apart as `first_delivery_s`). Where an adapter settles
  asynchronously (batched acks), "acked" means handed to the adapter, not confirmed by the broker.

The event: a realistic `OrderPlaced` CloudEvent (10 attributes incl. `partitionkey` and `traceparent`,
~620 B of JSON data as bytes, as the gateway forwards it), 64 distinct partition keys, unique ids.

Kafka, side by side on one Tansu broker (4-partition topics, one per client), interleaved round by
round (the order rotates each round), the same pre-encoded records (our binding's binary mode):

- ours: the adapter (its confluent-kafka producer with its defaults: acks=all, idempotent,
  linger_ms=0), encoding and size check included;
- ours with linger_ms=5: what a 5 ms linger costs when batches are awaited one after the other (the
  gateway's delivery worker publishes a page at a time);
- raw aiokafka: acks=all, not idempotent (aiokafka's idempotent producer fails on Tansu), linger_ms=0,
  `send()` x100 then gather the acks;
- raw confluent-kafka, idempotent (acks=all, linger.ms=0): `produce()` x100 then `flush()`;
- confluent-kafka, idempotent, asyncio bridge: `produce()` x100 with delivery callbacks served by a
  poll thread, one future per batch: the pattern our adapter implements, without the adapter around it
  (confluent's own `confluent_kafka.aio.AIOProducer` refuses headers, and binary mode needs headers);
- confluent-kafka, not idempotent (`produce()` + `flush()`): the price of idempotence.

`--only` re-runs some sections and keeps the others' figures from the existing results file (listed
under `sections_from_earlier_run`).

SQS on moto is a SMOKE figure only (moto rescans the queue on every send: shared/BROKERS.md); Pub/Sub
on the emulator and Service Bus on our test double say what our adapter + the SDK cost against a
local fake, not what the cloud services do. Figures are medians of interleaved repeats; min and max
are in the JSON. Other work on the machine makes them noisy: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import functools
import io
import logging
import os
import platform
import pstats
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import timeit
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any
from urllib.parse import quote

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))  # `tests.brokers` (after bench/, before site-packages)

import orjson  # noqa: E402
from _plot import RESULTS_DIR, write_results  # noqa: E402
from _sample import ATTRIBUTES, BODY  # noqa: E402

from tests import brokers  # noqa: E402
from umcef.adapters import open_adapter  # noqa: E402
from umcef.adapters.contract import Adapter, Delivery  # noqa: E402
from umcef.fabric.event import Event  # noqa: E402

BATCH = 100
KEYS = 64
MAX_IN_FLIGHT = 64
KAFKA_PARTITIONS = 4

# The shared order event, without the per-event id and partitionkey this bench sets itself.
BASE_ATTRIBUTES: dict[str, Any] = {k: v for k, v in ATTRIBUTES.items() if k not in ("id", "partitionkey")}


def make_events(count: int, prefix: str) -> list[Event]:
    """`count` distinct events (unique ids, `KEYS` partition keys), built before any timing starts."""
    return [
        Event({**BASE_ATTRIBUTES, "id": f"{prefix}-{i:07d}", "partitionkey": f"customer-{i % KEYS}"}, BODY)
        for i in range(count)
    ]


@dataclass(frozen=True)
class Sizes:
    """Events per measured run; `repeats` publish runs and `consume_repeats` consume runs per adapter."""

    repeats: int
    consume_repeats: int
    kafka_rounds: int
    kafka_target_seconds: float  # each Kafka publish run is sized to take about this long
    kafka_publish_max: int
    kafka_consume: int
    local_publish: int
    local_consume: int
    pubsub_publish: int
    pubsub_consume: int
    servicebus_publish: int
    servicebus_consume: int
    sqs_events: int
    sqs_repeats: int
    section_budget: float  # seconds; a section running longer is abandoned with an error


FULL = Sizes(repeats=5, consume_repeats=3, kafka_rounds=9, kafka_target_seconds=0.4, kafka_publish_max=50_000,
             kafka_consume=30_000, local_publish=10_000,
             local_consume=10_000, pubsub_publish=5_000, pubsub_consume=3_000, servicebus_publish=2_000,
             servicebus_consume=1_000, sqs_events=100, sqs_repeats=2, section_budget=90.0)
QUICK = Sizes(repeats=3, consume_repeats=2, kafka_rounds=3, kafka_target_seconds=0.15, kafka_publish_max=20_000,
              kafka_consume=10_000, local_publish=3_000,
              local_consume=3_000, pubsub_publish=2_000, pubsub_consume=1_000, servicebus_publish=1_000,
              servicebus_consume=500, sqs_events=100, sqs_repeats=1, section_budget=45.0)


# --------------------------------------------------------------------------------------------------
# measuring through the contract


class Failed(RuntimeError):
    """A benchmark run whose events did not all go through: its figure would be meaningless."""


async def publish_run(adapter: Adapter, events: Sequence[Event]) -> float:
    """events/s of publishing `events` in batches of `BATCH`, one batch call after the other."""
    started = time.perf_counter()
    for start in range(0, len(events), BATCH):
        outcomes = await adapter.publish(events[start:start + BATCH])
        if not all(o.ok for o in outcomes):
            bad = [o for o in outcomes if not o.ok]
            raise Failed(f"{len(bad)} of {len(outcomes)} events failed, e.g. {bad[0].error!r}")
    return len(events) / (time.perf_counter() - started)


async def prefill(adapter: Adapter, events: Sequence[Event]) -> None:
    await publish_run(adapter, events)


async def consume_run(adapter: Adapter, count: int, timeout: float) -> dict[str, float]:
    """Consume + ack `count` deliveries; events/s from the first delivery to the `count`-th."""
    seen = 0
    first = 0.0
    done = asyncio.Event()

    async def handler(delivery: Delivery) -> None:
        nonlocal seen, first
        await delivery.ack()
        seen += 1
        if seen == 1:
            first = time.perf_counter()
        if seen >= count:
            done.set()

    began = time.perf_counter()
    task = asyncio.create_task(adapter.consume(handler, max_in_flight=MAX_IN_FLIGHT))
    waiter = asyncio.create_task(done.wait())
    try:
        finished, _ = await asyncio.wait({task, waiter}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        ended = time.perf_counter()
        if waiter not in finished:
            if task in finished and task.exception() is not None:
                raise Failed(f"consume failed after {seen} of {count}: {task.exception()!r}")
            raise Failed(f"consumed only {seen} of {count} within {timeout:g} s")
    finally:
        waiter.cancel()
        stopping = time.perf_counter()
        await adapter.stop_consuming()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(task), 15)
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        stop_s = time.perf_counter() - stopping
    rate = (count - 1) / (ended - first) if count > 1 and ended > first else float("nan")
    return {"rate": rate, "first_delivery_s": first - began, "stop_s": stop_s}


def summary(samples: Sequence[float]) -> dict[str, Any]:
    return {"median": statistics.median(samples), "min": min(samples), "max": max(samples),
            "samples": [round(s, 1) for s in samples]}


def consume_summary(runs: Sequence[dict[str, float]]) -> dict[str, Any]:
    out = summary([r["rate"] for r in runs])
    out["first_delivery_s"] = statistics.median(r["first_delivery_s"] for r in runs)
    out["stop_s"] = statistics.median(r["stop_s"] for r in runs)
    return out


async def close_all(*adapters: Adapter | None) -> None:
    for adapter in adapters:
        if adapter is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(adapter.close(), 15)


# --------------------------------------------------------------------------------------------------
# local (the embedded store)


async def bench_local(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    from umcef.adapters.local import LocalStore

    with tempfile.TemporaryDirectory(prefix="umcef-bench-local-") as directory:
        store = LocalStore(directory)  # sync="full", the gateway's default
        sink = open_adapter("local://bench-pub", store=store)
        try:
            publish = []
            for r in range(sizes.repeats):
                publish.append(await publish_run(sink, make_events(sizes.local_publish, f"lp{r}")))
            log(f"local publish {statistics.median(publish):,.0f}/s")
            con_sink = open_adapter("local://bench-con", store=store)
            await prefill(con_sink, make_events(sizes.local_consume, "lc"))
            consume = []
            for r in range(sizes.consume_repeats):
                source = open_adapter(f"local://bench-con?group=g{r}", store=store)
                try:
                    consume.append(await consume_run(source, sizes.local_consume, 60))
                finally:
                    await close_all(source)
            log(f"local consume {statistics.median(c['rate'] for c in consume):,.0f}/s")
        finally:
            await close_all(sink)
            store.close()
    return {"broker": "embedded LocalStore (SQLite WAL, sync=full)", "publish": summary(publish),
            "consume": consume_summary(consume), "events": {"publish": sizes.local_publish,
                                                             "consume": sizes.local_consume}}


# --------------------------------------------------------------------------------------------------
# Kafka on Tansu: our adapter and the raw clients


Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]  # key, value, headers


def kafka_records(events: Sequence[Event]) -> list[Record]:
    """What our adapter sends for these events (binary mode, partitionkey as key), pre-encoded."""
    from umcef.fabric.bindings import kafka as binding

    out: list[Record] = []
    for event in events:
        message = binding.to_binary(event, binding.partitionkey_mapper)
        out.append((message.key, message.value, list(message.headers)))
    return out


async def create_topics(bootstrap: str, names: Sequence[str]) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(n, num_partitions=KAFKA_PARTITIONS, replication_factor=1)
                                   for n in names])
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


class Producer:
    """One Kafka client under test. `use_topic` points it at a fresh topic (one untimed record there, so
    metadata lookups stay out of the timing); `send(n)` publishes the first n events in batches of 100,
    waiting for each batch's acknowledgements before the next, like `adapter.publish` does."""

    name = ""

    async def start(self) -> None: ...

    async def use_topic(self, topic: str) -> None:
        raise NotImplementedError

    async def send(self, count: int) -> None:
        raise NotImplementedError

    async def stop(self) -> None: ...


OURS = "ours (adapter, confluent)"
OURS_LINGER = "ours, linger_ms=5"
OURS_CONSUMER = "ours (adapter, aiokafka consumer)"


class OursKafka(Producer):
    def __init__(self, bootstrap: str, events: list[Event], name: str = OURS, **options: Any) -> None:
        self.bootstrap, self.events = bootstrap, events
        self.name, self.options = name, options
        self.adapter: Adapter | None = None

    async def use_topic(self, topic: str) -> None:
        await close_all(self.adapter)
        self.adapter = open_adapter(f"kafka://{self.bootstrap}/{topic}", **self.options)
        await publish_run(self.adapter, self.events[:BATCH])  # producer start, topic lookup

    async def send(self, count: int) -> None:
        assert self.adapter is not None
        await publish_run(self.adapter, self.events[:count])

    async def stop(self) -> None:
        await close_all(self.adapter)


class RawAiokafka(Producer):
    name = "raw aiokafka"

    def __init__(self, bootstrap: str, records: list[Record]) -> None:
        self.bootstrap, self.records = bootstrap, records
        self.topic = ""
        self.producer: Any = None

    async def start(self) -> None:
        from aiokafka import AIOKafkaProducer

        # The adapter's producer settings (KafkaOptions defaults).
        self.producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", enable_idempotence=False,
                                         linger_ms=0, max_batch_size=512 * 1024, max_request_size=1024 * 1024 + 1024)
        await self.producer.start()

    async def use_topic(self, topic: str) -> None:
        self.topic = topic
        await self._send(self.records[:1])

    async def send(self, count: int) -> None:
        records = self.records
        for start in range(0, count, BATCH):
            await self._send(records[start:min(start + BATCH, count)])

    async def _send(self, batch: Sequence[Record]) -> None:
        producer, topic = self.producer, self.topic
        futures = [await producer.send(topic, value, key, headers=headers) for key, value, headers in batch]
        for result in await asyncio.gather(*futures, return_exceptions=True):
            if isinstance(result, BaseException):
                raise Failed(f"raw aiokafka: {result!r}")

    async def stop(self) -> None:
        if self.producer is not None:
            await self.producer.stop()


def confluent_config(bootstrap: str, idempotent: bool) -> dict[str, Any]:
    return {"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": idempotent, "linger.ms": 0,
            "log.connection.close": False}  # the broker stops at the end of the section: no noise about it


class RawConfluent(Producer):
    """`produce()` x100 then `flush()`: the client on its own (flush blocks the calling thread)."""

    def __init__(self, bootstrap: str, records: list[Record], idempotent: bool) -> None:
        self.name = f"raw confluent ({'idempotent' if idempotent else 'not idempotent'})"
        self.config = confluent_config(bootstrap, idempotent)
        self.records = records
        self.topic = ""
        self.producer: Any = None
        self.errors: list[Any] = []

    async def start(self) -> None:
        from confluent_kafka import Producer as CProducer

        self.producer = CProducer(self.config)

    def _delivered(self, err: Any, msg: Any) -> None:
        if err is not None:
            self.errors.append(err)

    async def use_topic(self, topic: str) -> None:
        self.topic = topic
        self._send(self.records[:1])

    async def send(self, count: int) -> None:
        records = self.records
        for start in range(0, count, BATCH):
            self._send(records[start:min(start + BATCH, count)])

    def _send(self, batch: Sequence[Record]) -> None:
        produce, topic, cb = self.producer.produce, self.topic, self._delivered
        for key, value, headers in batch:
            produce(topic, value, key, headers=headers, on_delivery=cb)
        if self.producer.flush(30) != 0:
            raise Failed("raw confluent: flush timed out")
        if self.errors:
            raise Failed(f"raw confluent: {self.errors[0]}")

    async def stop(self) -> None:
        if self.producer is not None:
            await asyncio.to_thread(self.producer.flush, 10)
            self.producer.close()


class ConfluentBridge(Producer):
    """confluent-kafka behind asyncio the way an adapter would use it: `produce()` from the loop, a
    thread polling delivery reports, one future per batch resolved from that thread."""

    name = "confluent asyncio bridge (idempotent)"

    def __init__(self, bootstrap: str, records: list[Record]) -> None:
        self.config = confluent_config(bootstrap, True)
        self.records = records
        self.topic = ""
        self.producer: Any = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    async def start(self) -> None:
        from confluent_kafka import Producer as CProducer

        self.producer = CProducer(self.config)
        self._thread = threading.Thread(target=self._poll, name="confluent-poll", daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            self.producer.poll(0.05)

    async def use_topic(self, topic: str) -> None:
        self.topic = topic
        await self._send(self.records[:1])

    async def send(self, count: int) -> None:
        records = self.records
        for start in range(0, count, BATCH):
            await self._send(records[start:min(start + BATCH, count)])

    async def _send(self, batch: Sequence[Record]) -> None:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        errors: list[Any] = [None] * len(batch)
        remaining = [len(batch)]

        def delivered(index: int, err: Any, msg: Any) -> None:  # in the poll thread
            errors[index] = err
            remaining[0] -= 1
            if remaining[0] == 0:
                loop.call_soon_threadsafe(done.set_result, None)

        produce, topic = self.producer.produce, self.topic
        for index, (key, value, headers) in enumerate(batch):
            produce(topic, value, key, headers=headers, on_delivery=functools.partial(delivered, index))
        await done
        if any(errors):
            raise Failed(f"confluent bridge: {next(e for e in errors if e)}")

    async def stop(self) -> None:
        if self.producer is not None:
            await asyncio.to_thread(self.producer.flush, 10)
        self._stop.set()
        if self._thread is not None:
            self._thread.join(2)
        if self.producer is not None:
            self.producer.close()  # no reconnect attempts (and log lines) once the broker is gone


async def measure_send(producer: Producer, count: int) -> dict[str, float]:
    """events/s, and CPU µs per event: of this (the event loop's) thread, and of the whole process
    (client threads included: librdkafka works in its own threads)."""
    wall, loop_cpu, process_cpu = time.perf_counter(), time.thread_time(), time.process_time()
    await producer.send(count)
    wall = time.perf_counter() - wall
    return {"rate": count / wall, "loop_cpu_us": (time.thread_time() - loop_cpu) / count * 1e6,
            "process_cpu_us": (time.process_time() - process_cpu) / count * 1e6}


async def aiokafka_idempotence_check(bootstrap: str) -> str:
    """Does aiokafka's idempotent producer start on this broker? (BROKERS.md: not on Tansu.)"""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True)
    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # it logs the failure itself; we report it
    try:
        await asyncio.wait_for(producer.start(), 10)
    except Exception as exc:
        return f"fails: {type(exc).__name__}: {exc}"
    finally:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(producer.stop(), 5)
        quiet.setLevel(level)
    return "works"


async def raw_aiokafka_consume(bootstrap: str, topic: str, group: str, count: int, timeout: float) -> dict[str, float]:
    """Reference: aiokafka group consumer, getmany, no decoding, manual commit every 0.25 s."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest", **brokers.KAFKA_FAST_GROUP_OPTS)
    began = time.perf_counter()
    await consumer.start()
    try:
        seen, first, next_commit = 0, 0.0, 0.0
        deadline = began + timeout
        while seen < count:
            if time.perf_counter() > deadline:
                raise Failed(f"raw aiokafka consumed only {seen} of {count} within {timeout:g} s")
            batch = await consumer.getmany(timeout_ms=100)
            for records in batch.values():
                if records and seen == 0:
                    first = time.perf_counter()
                seen += len(records)
            now = time.perf_counter()
            if now >= next_commit and seen:
                await consumer.commit()
                next_commit = now + 0.25
        ended = time.perf_counter()
        await consumer.commit()
    finally:
        stopping = time.perf_counter()
        await consumer.stop()
    return {"rate": (count - 1) / (ended - first), "first_delivery_s": first - began,
            "stop_s": time.perf_counter() - stopping}


def encode_cost_us() -> dict[str, float]:
    """CPU µs per event of what our publish does before the client sees a record (best of 5)."""
    from umcef.fabric.bindings import kafka as binding

    event = make_events(1, "enc")[0]
    message = binding.to_binary(event, binding.partitionkey_mapper)
    adapter = open_adapter("kafka://127.0.0.1:9/enc")  # never connects: encoding only

    def best(stmt: Callable[[], object]) -> float:
        return min(timeit.repeat(stmt, number=2000, repeat=5)) / 2000 * 1e6

    return {
        "binding.binary_record (encode + size bound: what publish does)": best(
            lambda: binding.binary_record(event, binding.partitionkey_mapper)),
        "binding.to_binary": best(lambda: binding.to_binary(event, binding.partitionkey_mapper)),
        "binding.encoded_size (exact; publish only near the limit)": best(lambda: binding.encoded_size(message)),
        "adapter.encoded_size (encode + exact size)": best(lambda: adapter.encoded_size(event)),
    }


async def bench_kafka(sizes: Sizes, log: Callable[[str], None], profile: bool) -> dict[str, Any]:
    broker = brokers.start_kafka()
    try:
        return await _bench_kafka(broker.bootstrap, sizes, log, profile)
    finally:
        broker.stop()


async def delete_topics(bootstrap: str, names: Sequence[str]) -> None:
    """Tansu keeps memory:// topics in RAM (~1 KB per record here); deleting them gives it back."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        await admin.start()
        await admin.delete_topics(list(names))
    except Exception as exc:
        print(f"note: deleting topics {list(names)} failed: {exc!r}")
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


async def _bench_kafka(bootstrap: str, sizes: Sizes, log: Callable[[str], None], profile: bool) -> dict[str, Any]:
    from umcef.fabric.bindings import kafka as binding

    events = make_events(sizes.kafka_publish_max, "k")  # ids repeat across rounds: Kafka does not care
    records = kafka_records(events)
    sample = binding.to_binary(events[0], binding.partitionkey_mapper)
    producers: list[Producer] = [
        OursKafka(bootstrap, events),
        OursKafka(bootstrap, events, OURS_LINGER, linger_ms=5),
        RawAiokafka(bootstrap, records),
        RawConfluent(bootstrap, records, idempotent=True),
        ConfluentBridge(bootstrap, records),
        RawConfluent(bootstrap, records, idempotent=False),
    ]
    runs: dict[str, list[dict[str, float]]] = {p.name: [] for p in producers}
    counts: dict[str, int] = {}
    try:
        # Warm up every client, then size its runs to ~`kafka_target_seconds` each from a calibration run.
        warm_topics = {p.name: brokers.unique_name("bench-warm") for p in producers}
        await create_topics(bootstrap, list(warm_topics.values()))
        for p in producers:
            await p.start()
            await p.use_topic(warm_topics[p.name])
            await p.send(1_000)
            rate = (await measure_send(p, 2_000))["rate"]
            counts[p.name] = max(2_000, min(sizes.kafka_publish_max,
                                            int(rate * sizes.kafka_target_seconds) // BATCH * BATCH))
        await delete_topics(bootstrap, list(warm_topics.values()))
        previous: list[str] = []
        for r in range(sizes.kafka_rounds):
            topics = {p.name: brokers.unique_name("bench-pub") for p in producers}
            await create_topics(bootstrap, list(topics.values()))
            for p in producers:
                await p.use_topic(topics[p.name])
            if previous:
                await delete_topics(bootstrap, previous)
            previous = list(topics.values())
            shift = r % len(producers)  # rotate the order round by round
            for p in producers[shift:] + producers[:shift]:
                runs[p.name].append(await measure_send(p, counts[p.name]))
            log(f"kafka round {r + 1}/{sizes.kafka_rounds}: " + ", ".join(
                f"{p.name} {runs[p.name][-1]['rate']:,.0f}/s" for p in producers))
        if previous:
            await delete_topics(bootstrap, previous)
    finally:
        for p in producers:
            with contextlib.suppress(Exception):
                await p.stop()
    publish: dict[str, Any] = {}
    for p in producers:
        entry = summary([x["rate"] for x in runs[p.name]])
        entry["events_per_run"] = counts[p.name]
        entry["loop_cpu_us_per_event"] = statistics.median(x["loop_cpu_us"] for x in runs[p.name])
        entry["process_cpu_us_per_event"] = statistics.median(x["process_cpu_us"] for x in runs[p.name])
        publish[p.name] = entry

    # consume: one prefilled topic, a fresh group per run (adapter and raw aiokafka alternate)
    m = sizes.kafka_consume
    consume_topic = brokers.unique_name("bench-con")
    await create_topics(bootstrap, [consume_topic])
    sink = open_adapter(f"kafka://{bootstrap}/{consume_topic}")
    try:
        await prefill(sink, make_events(m, "kc"))
    finally:
        await close_all(sink)
    ours_runs: list[dict[str, float]] = []
    raw_runs: list[dict[str, float]] = []
    for r in range(sizes.consume_repeats):
        source = open_adapter(f"kafka://{bootstrap}/{consume_topic}?group={brokers.unique_name('g')}",
                              **brokers.KAFKA_FAST_GROUP_OPTS)
        try:
            ours_runs.append(await consume_run(source, m, 60))
        finally:
            await close_all(source)
        raw_runs.append(await raw_aiokafka_consume(bootstrap, consume_topic, brokers.unique_name("g"), m, 60))
        log(f"kafka consume round {r + 1}/{sizes.consume_repeats}: ours {ours_runs[-1]['rate']:,.0f}/s, "
            f"raw aiokafka {raw_runs[-1]['rate']:,.0f}/s")
    await delete_topics(bootstrap, [consume_topic])

    med = {name: entry["median"] for name, entry in publish.items()}
    ours, raw_aio = med[OURS], med["raw aiokafka"]
    raw_cf, bridge = med["raw confluent (idempotent)"], med["confluent asyncio bridge (idempotent)"]
    plain = med["raw confluent (not idempotent)"]
    consume = {OURS_CONSUMER: consume_summary(ours_runs),
               "raw aiokafka (getmany, no decode)": consume_summary(raw_runs)}
    ours_c = consume[OURS_CONSUMER]["median"]
    raw_c = consume["raw aiokafka (getmany, no decode)"]["median"]
    result: dict[str, Any] = {
        "broker": "Tansu 0.6.0 (memory storage), 4-partition topics, a fresh topic per client and round",
        "record": {"value_bytes": len(sample.value or b""), "headers": len(sample.headers),
                   "key": (sample.key or b"").decode(), "encoded_size": binding.encoded_size(sample)},
        "events": {"publish_per_run": counts, "consume": m},
        "publish": publish,
        "consume": consume,
        "ratios": {
            "ours / raw confluent idempotent (publish)": ours / raw_cf,
            "ours / confluent asyncio bridge (publish)": ours / bridge,
            "ours / raw aiokafka (publish)": ours / raw_aio,
            "ours linger 5 ms / ours linger 0 (publish)": med[OURS_LINGER] / ours,
            "raw aiokafka / raw confluent idempotent (publish)": raw_aio / raw_cf,
            "confluent idempotent / not idempotent (publish)": raw_cf / plain,
            "ours / raw aiokafka (consume)": ours_c / raw_c,
        },
        "overhead_us_per_event": {
            "publish: ours - confluent asyncio bridge (wall)": (1 / ours - 1 / bridge) * 1e6,
            "publish: ours - raw confluent idempotent (wall)": (1 / ours - 1 / raw_cf) * 1e6,
            "publish: ours - raw aiokafka (wall)": (1 / ours - 1 / raw_aio) * 1e6,
            **{f"publish: {k}": v for k, v in encode_cost_us().items()},
            "consume: ours - raw aiokafka (wall)": (1 / ours_c - 1 / raw_c) * 1e6,
            "consume: binding.from_message (decode)": decode_cost_us(),
        },
        "aiokafka_idempotent_producer_on_this_broker": await aiokafka_idempotence_check(bootstrap),
    }
    if profile:
        profile_topic = brokers.unique_name("bench-prof")
        await create_topics(bootstrap, [profile_topic])
        result["profile_top"] = await profile_kafka_publish(bootstrap, profile_topic, sizes.kafka_publish_max)
    return result


def decode_cost_us() -> float:
    """CPU µs per record of our binding's decode (what the adapter's consume adds per record)."""
    from umcef.fabric.bindings import kafka as binding

    message = binding.to_binary(make_events(1, "dec")[0], binding.partitionkey_mapper)
    headers, key, value = tuple(message.headers), message.key, message.value

    def decode() -> object:
        return binding.from_message(binding.KafkaMessage(headers, key, value))

    return min(timeit.repeat(decode, number=2000, repeat=5)) / 2000 * 1e6


async def profile_kafka_publish(bootstrap: str, topic: str, count: int) -> list[str]:
    """cProfile of our adapter publishing `count` events (batches of 100); prints and returns the top."""
    adapter = open_adapter(f"kafka://{bootstrap}/{topic}")
    events = make_events(count, "prof")
    try:
        await publish_run(adapter, events[:1000])
        profiler = cProfile.Profile()
        profiler.enable()
        rate = await publish_run(adapter, events)
        profiler.disable()
    finally:
        await close_all(adapter)
    out = io.StringIO()
    stats = pstats.Stats(profiler, stream=out)
    stats.sort_stats("tottime").print_stats(25)
    stats.sort_stats("cumulative").print_stats(40)
    text = f"profiled publish of {count} events: {rate:,.0f}/s under cProfile\n" + out.getvalue()
    print(text)
    return [line for line in text.splitlines() if line.strip()][:80]


# --------------------------------------------------------------------------------------------------
# Pub/Sub on Google's emulator


async def bench_pubsub(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    emulator = brokers.start_pubsub()
    try:
        return await _bench_pubsub(emulator, sizes, log)
    finally:
        emulator.stop()


async def _bench_pubsub(emulator: Any, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    host, project = emulator.host, emulator.project
    publisher, subscriber = emulator.publisher_client(), emulator.subscriber_client()
    pub_topic, con_topic = brokers.unique_name("bench-pub"), brokers.unique_name("bench-con")
    subs = [brokers.unique_name("bench-sub") for _ in range(sizes.consume_repeats)]
    try:
        for topic in (pub_topic, con_topic):
            publisher.create_topic(name=publisher.topic_path(project, topic))
        for sub in subs:  # created before the prefill, so each holds every prefilled message
            subscriber.create_subscription(request={
                "name": subscriber.subscription_path(project, sub),
                "topic": publisher.topic_path(project, con_topic),
                "ack_deadline_seconds": 60, "enable_message_ordering": True})
    finally:
        for client in (publisher, subscriber):
            with contextlib.suppress(Exception):
                client.transport.close()
    sink = open_adapter(f"pubsub://{project}/{pub_topic}?emulator={host}")
    try:
        await publish_run(sink, make_events(500, "pw"))  # warm-up
        publish = [await publish_run(sink, make_events(sizes.pubsub_publish, f"pp{r}")) for r in range(sizes.repeats)]
    finally:
        await close_all(sink)
    log(f"pubsub publish {statistics.median(publish):,.0f}/s")
    con_sink = open_adapter(f"pubsub://{project}/{con_topic}?emulator={host}")
    try:
        await prefill(con_sink, make_events(sizes.pubsub_consume, "pc"))
    finally:
        await close_all(con_sink)
    consume = []
    for sub in subs:
        source = open_adapter(f"pubsub://{project}/{con_topic}/{sub}?emulator={host}")
        try:
            consume.append(await consume_run(source, sizes.pubsub_consume, 60))
        finally:
            await close_all(source)
    log(f"pubsub consume {statistics.median(c['rate'] for c in consume):,.0f}/s")
    return {"broker": "Google Pub/Sub emulator (cloud-pubsub-emulator, JVM -Xmx512m); ordered subscriptions",
            "publish": summary(publish), "consume": consume_summary(consume),
            "events": {"publish": sizes.pubsub_publish, "consume": sizes.pubsub_consume}}


# --------------------------------------------------------------------------------------------------
# Service Bus on our test double (in its own process)


class ServiceBusDouble:
    def __init__(self) -> None:
        helper = Path(__file__).resolve().parent / "_servicebus_double.py"
        self.proc = subprocess.Popen([sys.executable, str(helper)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, cwd=ROOT)
        line = self._line(20)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"Service Bus test double did not start: {line!r}")
        self.connection_string = line.removeprefix("READY ").strip()
        self.namespace = self.connection_string.split("sb://", 1)[1].split("/", 1)[0]

    def _line(self, timeout: float) -> str:
        assert self.proc.stdout is not None
        result: list[str] = []
        reader = threading.Thread(target=lambda: result.append(self.proc.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        reader.start()
        reader.join(timeout)
        return result[0] if result else ""

    def create_queue(self, name: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"queue {name}\n")
        self.proc.stdin.flush()
        answer = self._line(10)
        if answer.strip() != "OK":
            raise RuntimeError(f"creating queue {name}: {answer!r}")

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


async def bench_servicebus(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    double = ServiceBusDouble()
    try:
        return await _bench_servicebus(double, sizes, log)
    finally:
        double.stop()


async def _bench_servicebus(double: ServiceBusDouble, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    options = {"connection_string": double.connection_string}
    pub_queue = brokers.unique_name("bench-pub")
    double.create_queue(pub_queue)
    sink = open_adapter(f"servicebus://{double.namespace}/{pub_queue}", **options)
    try:
        await publish_run(sink, make_events(200, "sw"))  # warm-up (connection, CBS token, link)
        publish = [await publish_run(sink, make_events(sizes.servicebus_publish, f"sp{r}"))
                   for r in range(sizes.repeats)]
    finally:
        await close_all(sink)
    log(f"servicebus publish {statistics.median(publish):,.0f}/s")
    consume = []
    for r in range(sizes.consume_repeats):
        queue = brokers.unique_name("bench-con")
        double.create_queue(queue)
        url = f"servicebus://{double.namespace}/{queue}"
        con_sink = open_adapter(url, **options)
        try:
            await prefill(con_sink, make_events(sizes.servicebus_consume, f"sc{r}"))
        finally:
            await close_all(con_sink)
        source = open_adapter(url, **options)
        try:
            consume.append(await consume_run(source, sizes.servicebus_consume, 60))
        finally:
            await close_all(source)
    log(f"servicebus consume {statistics.median(c['rate'] for c in consume):,.0f}/s")
    return {"broker": "Service Bus TEST DOUBLE (tests/servicebus_broker, python-qpid-proton, own process); "
                      "plain queues; not Azure",
            "publish": summary(publish), "consume": consume_summary(consume),
            "events": {"publish": sizes.servicebus_publish, "consume": sizes.servicebus_consume}}


# --------------------------------------------------------------------------------------------------
# SQS on moto: a smoke figure only


async def bench_sqs(sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    moto = brokers.start_moto_process()  # its own process: moto's CPU does not compete for our GIL
    try:
        return await _bench_sqs(moto, sizes, log)
    finally:
        moto.stop()


async def _bench_sqs(moto: Any, sizes: Sizes, log: Callable[[str], None]) -> dict[str, Any]:
    import boto3

    admin = boto3.client("sqs", **moto.client_kwargs())
    endpoint = quote(moto.endpoint_url, safe="")
    options = {"aws_access_key_id": moto.access_key, "aws_secret_access_key": moto.secret_key,
               "wait_seconds": 1, "visibility_timeout": 30}

    def new_queue() -> str:
        name = brokers.unique_name("bench")
        admin.create_queue(QueueName=name)
        return f"sqs://{name}?region={moto.region}&endpoint={endpoint}"

    publish, consume = [], []
    for r in range(sizes.sqs_repeats):  # a fresh queue per run: moto slows down as a queue deepens
        url = new_queue()
        sink = open_adapter(url, **options)
        try:
            await publish_run(sink, make_events(10, f"qw{r}"))  # warm-up (client, queue URL lookup)
            publish.append(await publish_run(sink, make_events(sizes.sqs_events, f"qp{r}")))
        finally:
            await close_all(sink)
        source = open_adapter(url, **options)
        try:
            consume.append(await consume_run(source, sizes.sqs_events + 10, 60))
        finally:
            await close_all(source)
    log(f"sqs (moto smoke) publish {statistics.median(publish):,.0f}/s, "
        f"consume {statistics.median(c['rate'] for c in consume):,.0f}/s")
    return {"broker": "moto_server 5.x (own process) -- SMOKE FIGURE ONLY, not SQS throughput",
            "publish": summary(publish), "consume": consume_summary(consume),
            "events": {"publish": sizes.sqs_events, "consume": sizes.sqs_events + 10}}


# --------------------------------------------------------------------------------------------------
# running, reporting


SECTIONS = ("local", "kafka", "pubsub", "servicebus", "sqs")


def adapter_available(backend: str) -> str | None:
    """None when `umcef.adapters.<backend>` imports; otherwise why not (others are writing them)."""
    import importlib

    from umcef.adapters import BACKENDS

    try:
        importlib.import_module(f"umcef.adapters.{BACKENDS[backend]}")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    return None


async def run_sections(names: Sequence[str], sizes: Sizes, profile: bool) -> dict[str, Any]:
    began = time.perf_counter()

    def log(text: str) -> None:
        print(f"[{time.perf_counter() - began:6.1f}s] {text}", flush=True)

    runners: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {
        "local": lambda: bench_local(sizes, log),
        "kafka": lambda: bench_kafka(sizes, log, profile),
        "pubsub": lambda: bench_pubsub(sizes, log),
        "servicebus": lambda: bench_servicebus(sizes, log),
        "sqs": lambda: bench_sqs(sizes, log),
    }
    results: dict[str, Any] = {}
    for name in names:
        missing = adapter_available(name)
        if missing:
            log(f"{name}: skipped, the adapter does not import ({missing})")
            results[name] = {"skipped": f"adapter does not import: {missing}"}
            continue
        started = time.perf_counter()
        budget = sizes.section_budget * (2 if profile and name == "kafka" else 1)
        try:
            results[name] = await asyncio.wait_for(runners[name](), budget)
        except TimeoutError:
            results[name] = {"error": f"did not finish within {budget:g} s"}
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" in results[name]:
            log(f"{name}: ERROR {results[name]['error']}")
        results[name]["section_seconds"] = round(time.perf_counter() - started, 1)
    return results


def kafka_summary(kafka: dict[str, Any]) -> str:
    """One paragraph: our adapter's producer against the raw clients, from this run's figures."""
    pub = kafka["publish"]
    ours, linger = pub[OURS], pub[OURS_LINGER]
    raw_cf, bridge = pub["raw confluent (idempotent)"], pub["confluent asyncio bridge (idempotent)"]
    aio = pub["raw aiokafka"]

    def us(entry: dict[str, Any]) -> str:
        return (f"{1e6 / entry['median']:.1f} µs/event wall, {entry['loop_cpu_us_per_event']:.1f} loop CPU, "
                f"{entry['process_cpu_us_per_event']:.1f} process CPU")

    return (f"ours (confluent-kafka, idempotent, acks=all, linger_ms=0): {ours['median']:,.0f} ev/s ({us(ours)}); "
            f"raw confluent idempotent produce+flush {raw_cf['median']:,.0f} ({us(raw_cf)}), ours "
            f"{ours['median'] / raw_cf['median']:.2f}x of it; the bare asyncio bridge {bridge['median']:,.0f} "
            f"({us(bridge)}), ours {ours['median'] / bridge['median']:.2f}x; raw aiokafka (not idempotent) "
            f"{aio['median']:,.0f} ({us(aio)}), ours {ours['median'] / aio['median']:.2f}x. With linger_ms=5 and "
            f"batches awaited one after the other: {linger['median']:,.0f} ev/s. aiokafka's idempotent producer "
            f"on this broker: {kafka['aiokafka_idempotent_producer_on_this_broker']}.")


def fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:,.0f}"


SECTION_LABELS = {"pubsub": "pubsub (emulator)", "servicebus": "servicebus (TEST DOUBLE)", "sqs": "sqs (moto, SMOKE)"}
PLOT_LABELS = {
    f"kafka: {OURS}": "kafka: ours\n(adapter, confluent)",
    f"kafka: {OURS_LINGER}": "kafka: ours\nlinger_ms=5",
    f"kafka: {OURS_CONSUMER}": "kafka: ours\n(aiokafka consumer)",
    "kafka: raw aiokafka": "kafka: raw\naiokafka",
    "kafka: raw confluent (idempotent)": "kafka: raw confluent\n(idempotent)",
    "kafka: confluent asyncio bridge (idempotent)": "kafka: confluent\nasyncio bridge (idem.)",
    "kafka: raw confluent (not idempotent)": "kafka: raw confluent\n(not idempotent)",
    "kafka: raw aiokafka consumer (getmany, no decode)": "kafka: raw aiokafka\nconsumer (no decode)",
    "servicebus (TEST DOUBLE)": "servicebus\n(test double)",
    "sqs (moto, SMOKE)": "sqs\n(moto smoke only)",
}


def print_table(results: dict[str, Any]) -> list[tuple[str, float | None, float | None, str]]:
    rows: list[tuple[str, float | None, float | None, str]] = []
    for name, section in results.items():
        if "skipped" in section or "error" in section:
            rows.append((name, None, None, section.get("skipped") or section.get("error", "")))
            continue
        if name == "kafka":
            for label, stats in section["publish"].items():
                rows.append((f"kafka: {label}", stats["median"], None, ""))
            for label, stats in section["consume"].items():
                consumer = "raw aiokafka consumer (getmany, no decode)" if label.startswith("raw aiokafka") else label
                rows.append((f"kafka: {consumer}", None, stats["median"],
                             f"first delivery after {stats['first_delivery_s']:.1f}s (group join)"))
            continue
        rows.append((SECTION_LABELS.get(name, name), section["publish"]["median"], section["consume"]["median"],
                     section["broker"].split(" -- ")[0].split(";")[0]))
    head = f"{'events/s (median)':<54}{'publish':>10}{'consume':>10}  note"
    print("\n" + head)
    print("-" * (len(head) + 30))
    for label, pub, con, note in rows:
        print(f"{label:<54}{fmt(pub):>10}{fmt(con):>10}  {note}")
    kafka = results.get("kafka", {})
    if "ratios" in kafka:
        print(f"\nKafka publish on one Tansu broker, {len(next(iter(kafka['publish'].values()))['samples'])} "
              "interleaved rounds:")
        print(f"  {'client':<40}{'median/s':>10}{'min':>10}{'max':>10}{'loop CPU':>10}{'proc CPU':>10}  µs/event")
        for label, st in kafka["publish"].items():
            print(f"  {label:<40}{fmt(st['median']):>10}{fmt(st['min']):>10}{fmt(st['max']):>10}"
                  f"{st['loop_cpu_us_per_event']:>10.1f}{st['process_cpu_us_per_event']:>10.1f}")
        print("\nKafka ratios (medians, same broker, same run):")
        for label, value in kafka["ratios"].items():
            print(f"  {label:<52}{value:6.2f}")
        print("Kafka overhead, µs per event:")
        for label, value in kafka["overhead_us_per_event"].items():
            print(f"  {label:<52}{value:6.1f}")
        print(f"aiokafka idempotent producer on Tansu: {kafka['aiokafka_idempotent_producer_on_this_broker']}")
        if "summary" in kafka:
            print(f"\nsummary: {kafka['summary']}")
    return rows


def package_versions() -> dict[str, str]:
    out = {}
    for name in ("aiokafka", "confluent-kafka", "google-cloud-pubsub", "azure-servicebus", "aiobotocore", "moto",
                 "python-qpid-proton"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


def earlier_sections(names: set[str]) -> dict[str, Any]:
    """The named sections of the existing results file (a `--only` run keeps the others' figures)."""
    path = RESULTS_DIR / "adapters.json"
    try:
        previous = orjson.loads(path.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    old = previous.get("results", {})
    return {name: old[name] for name in names if name in old}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="smaller runs (about 30 s)")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {','.join(SECTIONS)}")
    parser.add_argument("--profile", action="store_true", help="cProfile our Kafka publish path (printed)")
    args = parser.parse_args()
    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = set(names) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; expected some of {', '.join(SECTIONS)}")
    sizes = QUICK if args.quick else FULL
    load_before = os.getloadavg()
    started = time.perf_counter()
    results = asyncio.run(run_sections(names, sizes, args.profile))
    elapsed = time.perf_counter() - started
    kafka = results.get("kafka", {})
    if "publish" in kafka:
        kafka["summary"] = kafka_summary(kafka)
    earlier = earlier_sections(set(SECTIONS) - set(names))
    results = {name: results[name] if name in results else earlier[name] for name in SECTIONS
               if name in results or name in earlier}
    rows = print_table(results)
    if earlier:
        print(f"\nfrom the earlier run in {RESULTS_DIR / 'adapters.json'}: {', '.join(sorted(earlier))}")
    print(f"\ntotal {elapsed:.0f} s; load average before {load_before[0]:.2f}, after {os.getloadavg()[0]:.2f}")

    payload = {
        "benchmark": "adapters",
        "unit": "events/s (median of repeats; min, max and samples alongside)",
        "mode": "quick" if args.quick else "full",
        "method": {"batch": BATCH, "max_in_flight": MAX_IN_FLIGHT, "partition_keys": KEYS,
                   "publish": "await adapter.publish(batch of 100), sequential, every outcome checked",
                   "consume": "consume(handler) with await delivery.ack() in the handler; rate from the first "
                              "delivery to the N-th, on a prefilled entity"},
        "sizes": sizes.__dict__,
        "event": {"type": BASE_ATTRIBUTES["type"], "attributes": len(BASE_ATTRIBUTES) + 2, "data_bytes": len(BODY)},
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "load_average": {"before": load_before[0], "after": os.getloadavg()[0]},
        "packages": package_versions(),
        "seconds": round(elapsed, 1),
        "sections_from_earlier_run": sorted(earlier),
        "results": results,
    }
    plotted = [r for r in rows if r[1] is not None or r[2] is not None]
    json_path, png_path = write_results(
        "adapters", payload,
        groups=[PLOT_LABELS.get(r[0], r[0]) for r in plotted],
        series={"publish (batches of 100)": [r[1] for r in plotted], "consume + ack": [r[2] for r in plotted]},
        title=f"Adapter throughput through the contract ({'quick' if args.quick else 'full'} run; "
              "SQS = moto smoke, Service Bus = test double)",
        ylabel="events/s (log scale, higher is better)",
        log=True,
    )
    print(f"wrote {json_path} and {png_path}")


if __name__ == "__main__":
    main()
