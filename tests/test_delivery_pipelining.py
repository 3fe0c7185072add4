"""Pages that share a `partitionkey` in flight together when the adapter keeps the order of publishes in
flight (`Capabilities.ordered_in_flight`), the barrier everywhere else: without the capability, behind a
page that failed or parked, and until a publish started after the failure is acknowledged in full."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.brokers import KAFKA_FAST_GROUP_OPTS, KafkaBroker, eventually, unique_name
from tests.conformance.target_kafka import create_topic
from tests.test_delivery import FAST, EjectedFailover, PublishOnly, keyed, spool
from umcef.adapters.contract import (
    AdapterError,
    Capabilities,
    Delivery,
    Handler,
    PublishOutcome,
    Throttled,
    Transient,
)
from umcef.adapters.kafka import KafkaAdapter, from_url
from umcef.adapters.local import LocalStore
from umcef.fabric.deadletter import DeadLetterQueue
from umcef.fabric.delivery import CURSOR_GROUP, DeliveryWorker, spool_topic
from umcef.fabric.event import Event


@dataclass
class Call:
    ids: list[str]
    released: asyncio.Future[None] = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class InFlightBroker(PublishOnly):
    """A broker for the worker's scheduling (pure logic). Like Kafka's idempotent producer, a publish hands
    its events over when it is called — the ones that will succeed join `log`, the partition log, in call
    order — and its answer comes later: when the test releases the call (`held`), else after `delay()`."""

    url = "inflight://"

    def __init__(self, *, ordered: bool = True, max_batch: int = 100, held: bool = True) -> None:
        self.capabilities = Capabilities(1 << 20, None, True, False, max_batch, False, ordered_in_flight=ordered)
        self.held = held
        self.failing: dict[str, int] = {}  # event id -> how many more publishes of it fail (with `error`)
        self.error: AdapterError = Transient("leader election")
        self.calls: list[Call] = []
        self.log: list[str] = []
        self.acked: list[str] = []
        self.active: list[Call] = []  # calls not answered yet
        self.most_active = 0

    def delay(self) -> float:
        return random.uniform(0, 0.003)

    def encoded_size(self, event: Event) -> int:
        return 1

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        call = Call([e.id for e in batch])
        self.calls.append(call)
        failed = {e.id for e in batch if self.failing.get(e.id, 0) > 0}
        for event_id in failed:
            self.failing[event_id] -= 1
        self.log.extend(i for i in call.ids if i not in failed)  # handed over: the order is fixed now
        self.active.append(call)
        self.most_active = max(self.most_active, len(self.active))
        try:
            await (call.released if self.held else asyncio.sleep(self.delay()))
        finally:
            self.active.remove(call)
        self.acked.extend(i for i in call.ids if i not in failed)
        return [PublishOutcome(i, self.error if i in failed else None) for i in call.ids]

    def release(self, n: int) -> None:
        """Answer the n-th call (0-based, in call order)."""
        self.calls[n].released.set_result(None)


def worker_for(store: LocalStore, adapter: Any, **options: Any) -> DeliveryWorker:
    return DeliveryWorker("d", adapter, store, DeadLetterQueue(store), **{"policy": FAST, **options})


async def warm_up(store: LocalStore, broker: InFlightBroker) -> None:
    """The first publish goes alone (the client may still be connecting): answer it."""
    await spool(store, "d", [keyed(100, "w")])
    await eventually(lambda: len(broker.calls) == 1)
    broker.release(0)
    await eventually(lambda: broker.acked == ["e100"])


async def one_page_each(store: LocalStore, broker: InFlightBroker, events: list[Event], calls: int) -> None:
    """Spool the events one by one: the first ones are expected to be published at once, each in its own
    page, until the broker has seen `calls` publishes; the rest are held back (they grow one page)."""
    for e in events:
        before = len(broker.calls)
        await spool(store, "d", [e])
        if before < calls:
            await eventually(lambda n=before: len(broker.calls) > n)  # before the next event can join its page
        else:
            await asyncio.sleep(0.05)
    await eventually(lambda: len(broker.calls) == calls)


async def finish(worker: DeliveryWorker, task: asyncio.Task[None], store: LocalStore) -> None:
    await worker.stop()
    await asyncio.wait_for(task, 5)
    assert store.cursor(CURSOR_GROUP, spool_topic("d")) == store.last_seq(spool_topic("d"))


@pytest.mark.parametrize(("ordered", "together"), [(True, 3), (False, 1)])
async def test_pages_of_one_key_are_in_flight_together_only_when_the_adapter_keeps_order(
        tmp_path: Path, ordered: bool, together: int) -> None:
    with LocalStore(tmp_path / "gw") as store:
        broker = InFlightBroker(ordered=ordered)
        worker = worker_for(store, broker, pages_in_flight=3)
        task = asyncio.create_task(worker.run())
        await warm_up(store, broker)
        await one_page_each(store, broker, [keyed(n, "a") for n in range(5)], 1 + together)
        await asyncio.sleep(0.1)
        assert len(broker.calls) == 1 + together and len(broker.active) == together
        # Three pages in flight at most (pages_in_flight); the rest grew into one page meanwhile.
        assert [c.ids for c in broker.calls[1:]] == [["e0"], ["e1"], ["e2"]][:together]
        for n in range(1, 1 + together):
            broker.release(n)
        await eventually(lambda: len(broker.calls) == 2 + together)
        assert broker.calls[-1].ids == [f"e{n}" for n in range(together, 5)]
        broker.release(1 + together)
        await eventually(lambda: len(broker.acked) == 6)
        assert broker.log == ["e100", "e0", "e1", "e2", "e3", "e4"]
        assert broker.most_active == together
        await finish(worker, task, store)


async def test_a_failed_page_is_a_barrier_for_its_keys_until_its_retry_is_acknowledged(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "gw") as store:
        broker = InFlightBroker()
        broker.failing["e0"] = 1
        worker = worker_for(store, broker, pages_in_flight=4)
        task = asyncio.create_task(worker.run())
        await warm_up(store, broker)
        await one_page_each(store, broker, [keyed(0, "a"), keyed(1, "a")], 3)  # e1 follows e0 in flight
        broker.release(1)  # e0 fails: its page retries
        await eventually(lambda: len(broker.calls) == 4)
        assert broker.calls[3].ids == ["e0"]
        broker.release(2)  # e1 was in flight already: acknowledged before the retry (Kafka's semantics)
        await eventually(lambda: broker.acked == ["e100", "e1"])
        await one_page_each(store, broker, [keyed(2, "a")], 4)
        await asyncio.sleep(0.2)
        assert len(broker.calls) == 4  # published after the failure came back: e2 waits for the retry
        broker.release(3)  # the retry is acknowledged in full: key a streams again
        await eventually(lambda: len(broker.calls) == 5)
        assert broker.calls[4].ids == ["e2"]
        await one_page_each(store, broker, [keyed(3, "a"), keyed(4, "a")], 7)
        assert len(broker.active) == 3
        for n in (4, 5, 6):
            broker.release(n)
        await eventually(lambda: len(broker.acked) == 6)
        assert broker.log == ["e100", "e1", "e0", "e2", "e3", "e4"]
        await finish(worker, task, store)


async def test_after_a_failure_every_key_waits_for_a_full_acknowledgement(tmp_path: Path) -> None:
    """Until a publish started after the failure is acknowledged in full (the adapter may be reconnecting),
    pages of other keys do not follow each other either."""
    with LocalStore(tmp_path / "gw") as store:
        broker = InFlightBroker()
        broker.failing["e0"] = 1
        worker = worker_for(store, broker, pages_in_flight=4)
        task = asyncio.create_task(worker.run())
        await warm_up(store, broker)
        await one_page_each(store, broker, [keyed(0, "a"), keyed(1, "c")], 3)  # disjoint: both go
        broker.release(1)  # e0 fails
        await eventually(lambda: len(broker.calls) == 4)  # its retry, held
        await one_page_each(store, broker, [keyed(2, "c")], 4)
        await asyncio.sleep(0.2)
        assert len(broker.calls) == 4  # e2 waits for e1's acknowledgement (not for e0: another key)
        broker.release(2)
        await eventually(lambda: len(broker.calls) == 5)
        assert broker.calls[4].ids == ["e2"]
        await one_page_each(store, broker, [keyed(3, "c")], 5)
        await asyncio.sleep(0.2)
        assert len(broker.calls) == 5  # e2 started while cold: e3 waits for it too
        broker.release(3)  # e0's retry: acknowledged in full, started after the failure
        broker.release(4)
        await eventually(lambda: len(broker.calls) == 6)
        await one_page_each(store, broker, [keyed(4, "c")], 7)  # streaming again: e4 follows e3
        assert len(broker.active) == 2
        broker.release(5)
        broker.release(6)
        await eventually(lambda: len(broker.acked) == 6)
        assert broker.log == ["e100", "e1", "e0", "e2", "e3", "e4"]
        await finish(worker, task, store)


async def test_a_retry_waits_for_the_earlier_pages_of_its_keys(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "gw") as store:
        broker = InFlightBroker()
        broker.failing["e1"] = 1
        broker.error = Throttled("slow down", retry_after=0.5)
        worker = worker_for(store, broker, pages_in_flight=4)
        task = asyncio.create_task(worker.run())
        await warm_up(store, broker)
        await one_page_each(store, broker, [keyed(0, "a"), keyed(1, "a")], 3)
        broker.release(2)  # e1 failed while e0 is still unacknowledged: its retry waits for e0
        # Meanwhile another key's publish is acknowledged in full (streaming resumes), but not for e1.
        await one_page_each(store, broker, [keyed(2, "c")], 4)
        broker.release(3)
        await asyncio.sleep(0.8)
        assert len(broker.calls) == 4
        broker.release(1)
        await eventually(lambda: len(broker.calls) == 5)
        assert broker.calls[4].ids == ["e1"]
        broker.release(4)
        await eventually(lambda: len(broker.acked) == 4)
        assert broker.log == ["e100", "e0", "e2", "e1"]
        await finish(worker, task, store)


async def test_a_page_larger_than_a_native_batch_is_not_followed_before_its_acknowledgement(
        tmp_path: Path) -> None:
    with LocalStore(tmp_path / "gw") as store:
        broker = InFlightBroker(max_batch=2)  # the adapter may split it, waiting between the parts
        worker = worker_for(store, broker, pages_in_flight=4)
        task = asyncio.create_task(worker.run())
        await warm_up(store, broker)
        await spool(store, "d", [keyed(0, "a"), keyed(1, "a"), keyed(2, "a")])
        await eventually(lambda: len(broker.calls) == 2)
        await spool(store, "d", [keyed(3, "a")])
        await asyncio.sleep(0.2)
        assert len(broker.calls) == 2
        broker.release(1)
        await eventually(lambda: len(broker.calls) == 3)
        broker.release(2)
        await eventually(lambda: len(broker.acked) == 5)
        await finish(worker, task, store)


async def test_after_an_ejection_parked_pages_of_a_key_publish_one_after_another(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "gw") as store:
        broker = InFlightBroker()
        hook = EjectedFailover({"e100": "wait", "e0": "wait", "e1": "wait"})
        hook.down = False
        worker = worker_for(store, broker, pages_in_flight=4, failover=hook)
        task = asyncio.create_task(worker.run())
        await warm_up(store, broker)
        hook.down = True
        for n in range(2):
            await spool(store, "d", [keyed(n, "a")])
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        hook.down = False
        await eventually(lambda: len(broker.calls) == 2)
        await asyncio.sleep(0.2)
        assert len(broker.calls) == 2  # the second page waits for the first one's acknowledgement
        broker.release(1)
        await eventually(lambda: len(broker.calls) == 3)
        broker.release(2)
        await eventually(lambda: len(broker.acked) == 3)
        assert broker.log == ["e100", "e0", "e1"]
        await finish(worker, task, store)


async def test_many_small_pages_publish_in_spool_order_per_key(tmp_path: Path) -> None:
    """Publishes start in spool order even when they overlap: the log per key is the spool's order."""
    with LocalStore(tmp_path / "gw") as store:
        broker = InFlightBroker(held=False)
        broker.failing.update({f"e{n}": 1 for n in range(0, 1200, 97)})  # some retries (back to the barrier)
        worker = worker_for(store, broker, pages_in_flight=4, page_size=7)
        task = asyncio.create_task(worker.run())
        sent = [keyed(n, f"k{n % 3}") for n in range(1200)]
        for start in range(0, len(sent), 40):
            await spool(store, "d", sent[start:start + 40])
            await asyncio.sleep(0.002)
        await eventually(lambda: worker.delivered == len(sent), 30)
        assert broker.most_active > 1
        assert sorted(broker.acked) == sorted(e.id for e in sent)
        calls = [i for c in broker.calls for i in c.ids]
        first_calls = sorted(set(calls), key=calls.index)  # each event's first publish, in call order
        assert first_calls == [e.id for e in sent]
        for k in range(3):
            mine = [int(i[1:]) for i in broker.log if int(i[1:]) % 3 == k]
            # A retried event lands after the events of its key already in flight; nothing else moves.
            retried = {n for n in range(0, 1200, 97) if n % 3 == k}
            assert [n for n in mine if n not in retried] == sorted(n for n in mine if n not in retried)
        await finish(worker, task, store)


class Watched:
    """The real Kafka adapter, watched: how many of its publishes sharing a key are unanswered at once."""

    def __init__(self, inner: KafkaAdapter) -> None:
        self.inner = inner
        self.url = inner.url
        self.capabilities = inner.capabilities
        self.active: list[set[str]] = []
        self.overlapped = 0  # publishes started while another one with a common key was unanswered

    def encoded_size(self, event: Event) -> int:
        return self.inner.encoded_size(event)

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        keys = {str(e.attributes["partitionkey"]) for e in batch}
        self.overlapped += any(not keys.isdisjoint(other) for other in self.active)
        self.active.append(keys)
        try:
            return await self.inner.publish(batch)  # awaited inline: its first step is the worker's
        finally:
            self.active.remove(keys)

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        raise NotImplementedError

    async def stop_consuming(self) -> None:
        return None

    async def probe(self) -> float:
        return await self.inner.probe()

    async def close(self) -> None:
        await self.inner.close()


@pytest.mark.timeout(120)
async def test_kafka_keeps_key_order_with_pages_of_one_key_in_flight_together(
        kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    topic = unique_name("pipe")
    await create_topic(kafka_broker.bootstrap, topic, 3)
    sink = from_url(f"kafka://{kafka_broker.bootstrap}/{topic}")
    assert sink.capabilities.ordered_in_flight and sink.options.idempotent
    watched = Watched(sink)
    sent = [keyed(n, f"k{n % 4}") for n in range(3000)]
    with LocalStore(tmp_path / "gw") as store:
        worker = worker_for(store, watched, pages_in_flight=4, page_size=25)
        task = asyncio.create_task(worker.run())
        for start in range(0, len(sent), 50):
            await spool(store, "d", sent[start:start + 50])
            await asyncio.sleep(0.001)
        await eventually(lambda: worker.delivered == len(sent), 60)
        await finish(worker, task, store)
    await sink.close()
    assert watched.overlapped > 0  # pages of one key really were in flight together
    got: list[Delivery] = []

    async def handle(d: Delivery) -> None:
        got.append(d)

    source = from_url(f"kafka://{kafka_broker.bootstrap}/{topic}?group={unique_name('g')}",
                      **KAFKA_FAST_GROUP_OPTS)
    consuming = asyncio.create_task(source.consume(handle))
    await eventually(lambda: len(got) >= len(sent), 60)
    await asyncio.sleep(0.3)
    await source.stop_consuming()
    await consuming
    await source.close()
    numbers = [int(d.event.id[1:]) for d in got]
    assert sorted(numbers) == list(range(len(sent)))  # each once
    for k in range(4):
        assert [n for n in numbers if n % 4 == k] == list(range(k, len(sent), 4))


async def test_kafka_publishes_hand_over_records_in_the_order_they_started(kafka_broker: KafkaBroker) -> None:
    """A publish that has to wait on its way (here: a metadata refresh made slow) still queues its records
    before a publish started after it: `ordered_in_flight` must not depend on what each one waits for."""
    topic = unique_name("issue")
    await create_topic(kafka_broker.bootstrap, topic, 1)
    sink = from_url(f"kafka://{kafka_broker.bootstrap}/{topic}")
    assert await sink.publish([keyed(0, "k")]) == [PublishOutcome("e0")]  # producer and topic known
    lookup = sink._ensure_topic
    slow_once = [True]

    async def slow_lookup(fresh: bool = False) -> None:
        if slow_once.pop() if slow_once else False:
            await asyncio.sleep(0.3)  # the first publish below waits here, the second one does not
        await lookup(fresh)

    sink._ensure_topic = slow_lookup  # type: ignore[method-assign]
    first = asyncio.create_task(sink.publish([keyed(n, "k") for n in range(1, 11)]))
    await asyncio.sleep(0)  # the first publish has started (and waits in its lookup)
    second = asyncio.create_task(sink.publish([keyed(n, "k") for n in range(11, 21)]))
    assert all(o.ok for o in await first + await second)
    await sink.close()
    got: list[Delivery] = []

    async def handle(d: Delivery) -> None:
        got.append(d)

    source = from_url(f"kafka://{kafka_broker.bootstrap}/{topic}?group={unique_name('g')}", **KAFKA_FAST_GROUP_OPTS)
    consuming = asyncio.create_task(source.consume(handle))
    await eventually(lambda: len(got) >= 21, 60)
    await source.stop_consuming()
    await consuming
    await source.close()
    assert [int(d.event.id[1:]) for d in got] == list(range(21))


async def test_at_stop_a_page_that_only_waited_for_its_keys_still_publishes(tmp_path: Path) -> None:
    """stop(): a page launched behind an earlier page of its keys publishes once that page is done, rather than
    staying in the spool: giving it up would hold the cursor before every later page already delivered, and
    the next start would send those again."""
    broker = InFlightBroker(ordered=False)
    with LocalStore(tmp_path / "gw") as store:
        worker = worker_for(store, broker, pages_in_flight=4, page_size=2)
        task = asyncio.create_task(worker.run())
        await warm_up(store, broker)
        await spool(store, "d", [keyed(1, "k")])
        await eventually(lambda: len(broker.calls) == 2)
        await spool(store, "d", [keyed(2, "k"), keyed(3, "k")])  # a full page: launched, waits for e1's page
        await asyncio.sleep(0.05)
        await spool(store, "d", [keyed(4, "m")])  # another key: published at once
        await eventually(lambda: len(broker.calls) == 3)
        assert broker.calls[2].ids == ["e4"]
        await worker.stop()
        broker.release(1)
        broker.release(2)
        await eventually(lambda: len(broker.calls) == 4)
        assert broker.calls[3].ids == ["e2", "e3"]
        broker.release(3)
        await asyncio.wait_for(task, 5)
        assert store.cursor(CURSOR_GROUP, spool_topic("d")) == store.last_seq(spool_topic("d"))
