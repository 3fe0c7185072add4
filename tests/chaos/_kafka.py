"""Helpers shared by the chaos tests: read a Kafka topic back with aiokafka (not through the gateway), and
judge per-key order on what was read."""

from __future__ import annotations

import bisect
import collections
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition  # type: ignore[import-untyped]


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    headers: dict[str, str]
    value: bytes

    @property
    def ce_id(self) -> str:
        return self.headers["ce_id"]

    @property
    def ce_source(self) -> str:
        return self.headers["ce_source"]


@dataclass
class TopicReader:
    """Reads a topic from the beginning (no group) and keeps every record, duplicates included."""

    bootstrap: str
    topic: str
    records: list[Record] = field(default_factory=list)
    consumer: AIOKafkaConsumer | None = None
    next_offset: dict[int, int] = field(default_factory=dict)

    async def __aenter__(self) -> TopicReader:
        self.consumer = AIOKafkaConsumer(self.topic, bootstrap_servers=self.bootstrap,
                                         auto_offset_reset="earliest", enable_auto_commit=False,
                                         request_timeout_ms=10_000, retry_backoff_ms=200)
        await self.consumer.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.consumer is not None
        await self.consumer.stop()

    def keys(self) -> set[tuple[str, str]]:
        """Distinct (source, id): the consumer-side dedup the delivery contract asks for."""
        return {(r.ce_source, r.ce_id) for r in self.records}

    async def poll(self, timeout_ms: int = 300) -> int:
        assert self.consumer is not None
        got = 0
        batches = await self.consumer.getmany(timeout_ms=timeout_ms, max_records=5000)
        for tp, recs in batches.items():
            for r in recs:
                self.records.append(Record(tp.partition, r.offset, r.key,
                                           {k: v.decode() for k, v in (r.headers or ())}, r.value))
                self.next_offset[tp.partition] = max(self.next_offset.get(tp.partition, 0), r.offset + 1)
                got += 1
        return got

    async def until(self, done: Callable[[], bool], seconds: float, what: str) -> None:
        """Poll until `done()` or fail after `seconds` (no blind sleep: the deadline is the bound)."""
        deadline = time.monotonic() + seconds
        while not done():
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
            await self.poll()

    async def to_end(self, seconds: float = 30) -> None:
        """Read everything the topic holds right now (up to its current end offsets)."""
        assert self.consumer is not None
        parts = [TopicPartition(self.topic, p) for p in (self.consumer.partitions_for_topic(self.topic) or ())]
        end = await self.consumer.end_offsets(parts)
        deadline = time.monotonic() + seconds

        def caught_up() -> bool:
            return all(self.next_offset.get(tp.partition, 0) >= end[tp] for tp in parts)

        while not caught_up():
            if time.monotonic() > deadline:
                raise AssertionError(f"could not read {self.topic} to its end offsets {end} in {seconds} s")
            await self.poll()


def assert_per_key_order(records: list[Record], accepted_batches: dict[int, tuple[int, int]],
                         events_of: Callable[[int], list[dict[str, Any]]]) -> None:
    """Per-key order through failures, judged on each event's first record (later ones are redeliveries):
    within a batch a key's events keep their order, and a batch answered 202 before another was first sent
    has each key's events ahead of that one's. (Batches in flight together have no order to keep, and an
    attempt whose answer was lost may have stored its batch, so a batch counts from its first attempt.)
    `accepted_batches`: batch -> (tick of its first attempt, tick of its 202) on one clock where no two
    sends or answers share a tick; `events_of(b)`: the batch's events (with `id` and `partitionkey`), in the
    order they were sent."""
    first: dict[str, tuple[int, int]] = {}  # ce_id -> (partition, offset) of its first record
    partition_of: dict[bytes | None, int] = {}
    for record in sorted(records, key=lambda r: (r.partition, r.offset)):
        first.setdefault(record.ce_id, (record.partition, record.offset))
        assert partition_of.setdefault(record.key, record.partition) == record.partition, \
            f"key {record.key!r} in two partitions: its offsets cannot be compared"
    # (key, batch) -> offsets of the key's events in batch order (one key lives in one partition)
    spans: dict[tuple[str, int], list[int]] = collections.defaultdict(list)
    for b in sorted(accepted_batches):
        for event in events_of(b):
            spans[(event["partitionkey"], b)].append(first[event["id"]][1])
    for (key, b), offsets in spans.items():
        assert offsets == sorted(offsets), f"batch {b}, key {key}: events out of order at offsets {offsets}"
    by_answer = sorted(accepted_batches, key=lambda b: accepted_batches[b][1])
    answers = [accepted_batches[b][1] for b in by_answer]
    for key in {key for key, _ in spans}:
        # the key's last offset among the batches answered so far (-1: none of them had the key)
        latest = list(itertools.accumulate((spans[(key, b)][-1] if (key, b) in spans else -1 for b in by_answer),
                                           max))
        for b, (sent, _) in accepted_batches.items():
            before = bisect.bisect_left(answers, sent)  # batches answered before b was sent
            if before and (key, b) in spans:
                assert latest[before - 1] < spans[(key, b)][0], \
                    f"key {key}: batch {b} (first sent at tick {sent}) overtook a batch answered 202 before"
