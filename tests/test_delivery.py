"""Delivery workers drain the durable spool into an adapter: retry, dead letters, cursor only after ack."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Sequence
from pathlib import Path

import orjson
import pytest

from tests.brokers import eventually
from umcef.adapters import contract
from umcef.adapters.contract import AdapterError, Capabilities, Handler, PublishOutcome, Rejected, Transient
from umcef.adapters.local import LocalStore, Record
from umcef.adapters.local_adapter import LocalAdapter
from umcef.fabric import delivery
from umcef.fabric.deadletter import DeadLetterQueue
from umcef.fabric.delivery import CURSOR_GROUP, DeliveryWorker, Reroute, RetryPolicy, spool_topic
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

FAST = RetryPolicy(base_seconds=0.01, cap_seconds=0.05)


def event(n: int) -> Event:
    return Event({"specversion": "1.0", "id": f"e{n}", "source": "/d", "type": "t", "partitionkey": "k"},
                 {"n": n})


async def spool(store: LocalStore, destination: str, events: list[Event]) -> None:
    await store.append([Record(spool_topic(destination), json_format.encode(e), e.id) for e in events])


class PublishOnly:
    """The adapter contract's other methods, for test brokers that only take publishes."""

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        raise NotImplementedError

    async def stop_consuming(self) -> None:
        return None

    async def probe(self) -> float:
        return 0.001

    async def close(self) -> None:
        return None


class ScriptedAdapter(PublishOnly):
    """A stand-in broker for the worker's retry logic (pure logic: real brokers are in the conformance suite).
    `script` maps event id → errors returned on successive attempts before it succeeds."""

    url = "scripted://"
    capabilities = Capabilities(1 << 20, None, True, False, 100, False)

    def __init__(self, script: dict[str, list[AdapterError]]) -> None:
        self.script = script
        self.accepted: list[str] = []
        self.calls = 0

    def encoded_size(self, event: Event) -> int:
        return len(json_format.encode(event))

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        self.calls += 1
        outcomes = []
        for e in batch:
            errors = self.script.get(e.id, [])
            if errors:
                outcomes.append(PublishOutcome(e.id, errors.pop(0)))
            else:
                self.accepted.append(e.id)
                outcomes.append(PublishOutcome(e.id))
        return outcomes



@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    with LocalStore(tmp_path / "gw") as opened:
        yield opened


async def deliver_locally(store: LocalStore, tmp_path: Path, n: int) -> tuple[
        LocalStore, LocalAdapter, DeliveryWorker, asyncio.Task[None]]:
    """A worker delivering `store`'s spool for `out` to a local store, once it delivered `n` spooled events."""
    remote = LocalStore(tmp_path / "remote")
    adapter = LocalAdapter("local://out", "out", remote, owns_store=True)
    worker = DeliveryWorker("out", adapter, store, DeadLetterQueue(store), policy=FAST)
    task = asyncio.create_task(worker.run())
    await spool(store, "out", [event(i) for i in range(n)])
    await eventually(lambda: worker.delivered == n)
    return remote, adapter, worker, task


async def test_pages_done_before_one_that_gave_up_still_move_the_cursor(tmp_path: Path) -> None:
    # At stop, pages finish or give up their retry wait: the cursor must pass every finished page at the head,
    # up to the first that gave up (before, it stayed put: those pages were delivered again after a restart).
    store = LocalStore(tmp_path / "gw")
    adapter = LocalAdapter("local://out", "out", LocalStore(tmp_path / "remote"), owns_store=True)
    worker = DeliveryWorker("out", adapter, store, DeadLetterQueue(store), policy=FAST)
    flights: deque[delivery._Flight] = deque()
    for last_seq, outcome in ((10, True), (20, True), (30, False), (40, True)):
        flight = delivery._Flight(last_seq, set(), 1)
        flight.task = asyncio.get_running_loop().create_future()
        flight.task.set_result(outcome)
        flights.append(flight)
    assert worker._land(flights) is False
    assert worker._cursor is not None
    worker._cursor.result(timeout=10)
    assert store.cursor(CURSOR_GROUP, spool_topic("out")) == 20
    assert [f.last_seq for f in flights] == [30, 40]  # the one that gave up, and what follows it, stay
    store.close()
    await adapter.close()


async def test_a_worker_cancelled_while_its_last_cursor_move_waits_still_moves_the_cursor(tmp_path: Path) -> None:
    # The move waits in the store for an append to share its commit (cursor_delay); a shutdown deadline that
    # cancels the worker meanwhile must not cancel the move: it is committed when the store closes.
    store = LocalStore(tmp_path / "gw", cursor_delay=60.0)
    _, adapter, worker, task = await deliver_locally(store, tmp_path, 5)
    await worker.stop()
    # In its `finally`, waiting for the held move: the feed is closed (no await between that and the wait).
    await eventually(lambda: spool_topic("out") not in store._listeners)
    assert not task.done() and store.cursor(CURSOR_GROUP, spool_topic("out")) == 0
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    store.close()
    await adapter.close()
    with LocalStore(tmp_path / "gw") as reopened:
        assert reopened.cursor(CURSOR_GROUP, spool_topic("out")) == reopened.last_seq(spool_topic("out")) > 0


async def test_worker_delivers_to_a_real_adapter_and_moves_the_cursor(store: LocalStore, tmp_path: Path) -> None:
    remote, adapter, worker, task = await deliver_locally(store, tmp_path, 50)
    await spool(store, "out", [event(i) for i in range(50, 60)])
    await eventually(lambda: worker.delivered == 60)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    assert [orjson.loads(e.payload)["id"] for e in remote.read("out")] == [f"e{i}" for i in range(60)]
    assert store.cursor(CURSOR_GROUP, spool_topic("out")) == store.last_seq(spool_topic("out"))
    await adapter.close()


async def test_transient_failures_are_retried_and_rejected_ones_dead_lettered(store: LocalStore) -> None:
    adapter = ScriptedAdapter({"e1": [Transient("broker restarting"), Transient("still")],
                               "e2": [Rejected("too large: 2 MiB > 1 MiB")]})
    dlq = DeadLetterQueue(store)
    worker = DeliveryWorker("kafka-eu", adapter, store, dlq, policy=FAST)
    task = asyncio.create_task(worker.run())
    await spool(store, "kafka-eu", [event(i) for i in range(4)])
    await eventually(lambda: worker.delivered == 3 and dlq.count == 1)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    assert sorted(adapter.accepted) == ["e0", "e1", "e3"]
    assert adapter.calls == 3  # the page, then e1 twice more
    (dead,) = [orjson.loads(e.payload) for e in store.read("_deadletter")]
    assert dead["id"] == "e2" and dead["fabricdest"] == "kafka-eu" and dead["fabricattempts"] == 1
    assert dead["fabricreason"] == "Rejected: too large: 2 MiB > 1 MiB"


async def test_a_dead_letter_its_remote_dead_letter_destination_refuses_keeps_where_it_came_from(
        store: LocalStore) -> None:
    # `down` dead-lettered e0 into the spool of `dlqk` (a remote dead-letter destination), which cannot take it
    # either: the entry in `_deadletter` must still say `down` and why, so a replay sends it back there.
    letter = Event({**event(0).attributes, "fabricdest": "down", "fabricreason": "Transient: refused",
                    "fabricattempts": 2}, {"n": 0})
    await spool(store, "dlqk", [letter])
    adapter = ScriptedAdapter({"e0": [Rejected("no such topic")]})
    dlq = DeadLetterQueue(store)
    worker = DeliveryWorker("dlqk", adapter, store, dlq, policy=FAST)
    task = asyncio.create_task(worker.run())
    await eventually(lambda: dlq.count == 1)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    (dead,) = [orjson.loads(e.payload) for e in store.read("_deadletter")]
    assert (dead["id"], dead["fabricdest"], dead["fabricreason"], dead["fabricattempts"]) == (
        "e0", "down", "Transient: refused", 2)


async def test_a_page_refused_at_once_is_dead_lettered_in_one_append_and_one_log_line(
        store: LocalStore, caplog: pytest.LogCaptureFixture) -> None:
    # A mass refusal or expiry must not cost a durable append (its group commit and fsync) and an ERROR line per
    # event: 3,930 expiring events wrote 3,930 lines before.
    refused = [Rejected("too large")]
    adapter = ScriptedAdapter({f"e{i}": list(refused) for i in range(7)})
    dlq = DeadLetterQueue(store)
    appends = 0
    append = store.append

    async def counting(records: Sequence[Record]) -> list[int]:
        nonlocal appends
        appends += 1
        return await append(records)

    await spool(store, "d", [event(i) for i in range(7)])
    store.append = counting  # type: ignore[method-assign]  # from here on: the worker's appends
    worker = DeliveryWorker("d", adapter, store, dlq, policy=FAST)
    with caplog.at_level("ERROR", logger="umcef.deadletter"):
        task = asyncio.create_task(worker.run())
        await eventually(lambda: dlq.count == 7)
        await worker.stop()
        await asyncio.wait_for(task, 5)
    assert appends == 1 and len(store.read("_deadletter")) == 7
    assert [r.getMessage() for r in caplog.records if r.name == "umcef.deadletter"] == [
        "dead-lettered 7 events (e0, e1, e2, e3, e4 and 2 more): Rejected: too large"]


async def test_a_missing_topic_or_credentials_are_retried_not_dead_lettered(store: LocalStore) -> None:
    # The destination's condition, fixed by an operator (the topic created, the credentials rotated): the events
    # wait and go through once it is fixed, instead of all being dead-lettered at the first publish.
    adapter = ScriptedAdapter({"e0": [contract.NotFound("topic 'orders' does not exist")] * 2,
                               "e1": [contract.Unauthorized("access denied")]})
    dlq = DeadLetterQueue(store)
    worker = DeliveryWorker("d", adapter, store, dlq, policy=FAST)
    task = asyncio.create_task(worker.run())
    await spool(store, "d", [event(0), event(1)])
    await eventually(lambda: worker.delivered == 2)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    assert sorted(adapter.accepted) == ["e0", "e1"] and dlq.count == 0 and store.read("_deadletter") == []


async def test_attempt_limit_dead_letters_with_the_last_reason(store: LocalStore) -> None:
    adapter = ScriptedAdapter({"e0": [Transient("down")] * 10})
    dlq = DeadLetterQueue(store)
    worker = DeliveryWorker("d", adapter, store, dlq, policy=RetryPolicy(0.01, 0.02, max_attempts=3))
    task = asyncio.create_task(worker.run())
    await spool(store, "d", [event(0)])
    await eventually(lambda: dlq.count == 1)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    (dead,) = [orjson.loads(e.payload) for e in store.read("_deadletter")]
    assert dead["fabricattempts"] == 3 and dead["fabricreason"] == "Transient: down"


async def test_the_attempt_limit_counts_the_attempts_of_earlier_runs(store: LocalStore) -> None:
    # A restart must not grant a failing event a fresh set of attempts (as SQS's receive count survives its
    # consumers): the first worker fails e0 and e1 and is stopped mid-retry; the second, with a limit one above
    # what was noted, makes one more attempt and dead-letters them with the total.
    first = ScriptedAdapter({"e0": [Transient("down")] * 1000, "e1": [Transient("down")] * 1000})
    worker = DeliveryWorker("d", first, store, DeadLetterQueue(store), policy=RetryPolicy(0.01, 0.02))
    task = asyncio.create_task(worker.run())
    await spool(store, "d", [event(0), event(1), event(2)])
    await eventually(lambda: first.calls >= 3)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    store.trim_consumed()  # returns once the writer committed what was queued before it (the lazy notes)
    noted = store.attempts(spool_topic("d"))
    assert sorted(noted) == [1, 2] and noted[1] == noted[2] >= 2, noted  # e2 went through: nothing noted
    limit = noted[1] + 1
    second = ScriptedAdapter({"e0": [Transient("still down")] * 1000, "e1": [Transient("still down")] * 1000})
    dlq = DeadLetterQueue(store)
    worker = DeliveryWorker("d", second, store, dlq, policy=RetryPolicy(0.01, 0.02, max_attempts=limit))
    task = asyncio.create_task(worker.run())
    await eventually(lambda: dlq.count == 2)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    assert second.calls == 1  # one attempt in this run, not `limit`
    dead = [orjson.loads(e.payload) for e in store.read("_deadletter")]
    assert [(d["id"], d["fabricattempts"], d["fabricreason"]) for d in dead] == [
        ("e0", limit, "Transient: still down"), ("e1", limit, "Transient: still down")]


async def test_an_event_whose_noted_attempts_reach_a_lowered_limit_is_dead_lettered_unpublished(
        store: LocalStore) -> None:
    await spool(store, "d", [event(0), event(1)])
    store.note_attempts_later(spool_topic("d"), [(1, 5)]).result()  # e0: five attempts under an earlier limit
    adapter = ScriptedAdapter({})
    dlq = DeadLetterQueue(store)
    worker = DeliveryWorker("d", adapter, store, dlq, policy=RetryPolicy(0.01, 0.02, max_attempts=3))
    task = asyncio.create_task(worker.run())
    await eventually(lambda: worker.delivered == 1 and dlq.count == 1)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    assert adapter.accepted == ["e1"]
    (dead,) = [orjson.loads(e.payload) for e in store.read("_deadletter")]
    assert (dead["id"], dead["fabricattempts"], dead["fabricreason"]) == (
        "e0", 5, "attempt limit 3 reached in an earlier run")


async def test_stopping_mid_retry_leaves_the_page_for_the_next_worker(store: LocalStore) -> None:
    adapter = ScriptedAdapter({"e0": [Transient("down")] * 1000})
    worker = DeliveryWorker("d", adapter, store, DeadLetterQueue(store), policy=RetryPolicy(0.2, 0.2))
    task = asyncio.create_task(worker.run())
    await spool(store, "d", [event(0), event(1)])
    await eventually(lambda: adapter.calls >= 2)
    await worker.stop()
    await asyncio.wait_for(task, 5)
    assert store.cursor(CURSOR_GROUP, spool_topic("d")) == 0
    healthy = ScriptedAdapter({})
    second = DeliveryWorker("d", healthy, store, DeadLetterQueue(store), policy=FAST)
    task = asyncio.create_task(second.run())
    await eventually(lambda: second.delivered == 2)
    await second.stop()
    await asyncio.wait_for(task, 5)
    assert healthy.accepted == ["e0", "e1"]


class GatedAdapter(ScriptedAdapter):
    """Holds the publish of any batch containing a gated event until the test opens its gate."""

    def __init__(self, gated: set[str]) -> None:
        super().__init__({})
        self.gate = asyncio.Event()
        self.gated = gated
        self.held = 0

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        if any(e.id in self.gated for e in batch):
            self.held += 1
            await self.gate.wait()
        return await super().publish(batch)


def keyed(n: int, key: str) -> Event:
    return Event({"specversion": "1.0", "id": f"e{n}", "source": "/d", "type": "t", "partitionkey": key}, None)


async def test_pages_of_other_keys_overtake_a_held_page_but_its_own_key_waits(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "gw") as store:
        adapter = GatedAdapter({"e0"})
        worker = DeliveryWorker("d", adapter, store, DeadLetterQueue(store), policy=FAST, pages_in_flight=4)
        task = asyncio.create_task(worker.run())
        await spool(store, "d", [keyed(0, "a")])  # page 1: key a, held at the broker
        await eventually(lambda: adapter.held == 1)
        await spool(store, "d", [keyed(1, "b")])  # page 2: key b, not blocked by page 1
        await eventually(lambda: adapter.accepted == ["e1"])
        await spool(store, "d", [keyed(2, "a"), keyed(3, "c")])  # page 3 shares key a: waits for page 1
        await asyncio.sleep(0.2)
        assert adapter.accepted == ["e1"]
        assert store.cursor(CURSOR_GROUP, spool_topic("d")) == 0  # page 2 is done, page 1 is not
        adapter.gate.set()
        await eventually(lambda: len(adapter.accepted) == 4)
        assert adapter.accepted.index("e0") < adapter.accepted.index("e2")  # per-key order held
        await worker.stop()
        await asyncio.wait_for(task, 5)
        assert store.cursor(CURSOR_GROUP, spool_topic("d")) == store.last_seq(spool_topic("d"))


async def test_one_page_in_flight_keeps_strict_spool_order(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "gw") as store:
        adapter = GatedAdapter({"e0"})
        worker = DeliveryWorker("d", adapter, store, DeadLetterQueue(store), policy=FAST, pages_in_flight=1)
        task = asyncio.create_task(worker.run())
        await spool(store, "d", [keyed(0, "a")])
        await eventually(lambda: adapter.held == 1)
        await spool(store, "d", [keyed(1, "b")])
        await asyncio.sleep(0.2)
        assert adapter.accepted == []
        adapter.gate.set()
        await eventually(lambda: adapter.accepted == ["e0", "e1"])
        await worker.stop()
        await asyncio.wait_for(task, 5)


class EjectedFailover:
    """The router's failover view, scripted: ejected while `down`; per event id "move" or "wait"."""

    def __init__(self, plan: dict[str, str]) -> None:
        self.plan = plan
        self.down = True
        self.moved: list[str] = []

    def ejected(self) -> str | None:
        return "down (ejected: test)" if self.down else None

    def reroute(self, event: Event) -> Reroute:
        if self.plan[event.id] == "move":
            return Reroute("move", ("other",))
        return Reroute("wait", reason="route 'r': residency allows only EU")

    async def move(self, moves: Sequence[tuple[Event, tuple[str, ...]]]) -> None:
        self.moved.extend(e.id for e, _ in moves)


async def test_later_pages_fail_over_while_earlier_ones_wait_and_order_holds_on_return(tmp_path: Path) -> None:
    with LocalStore(tmp_path / "gw") as store:
        adapter = ScriptedAdapter({})
        hook = EjectedFailover({"e0": "wait", "e1": "move", "e2": "wait", "e3": "move", "e4": "wait"})
        worker = DeliveryWorker("d", adapter, store, DeadLetterQueue(store), policy=FAST, pages_in_flight=1,
                                failover=hook)
        task = asyncio.create_task(worker.run())
        for n in range(5):  # five pages, one key: page 1 waits (parked), the later ones still fail over
            await spool(store, "d", [keyed(n, "k")])
            await asyncio.sleep(0.05)
        await eventually(lambda: hook.moved == ["e1", "e3"])
        assert adapter.calls == 0
        hook.down = False  # back: the waiting events go, in spool order
        await eventually(lambda: len(adapter.accepted) == 3)
        assert adapter.accepted == ["e0", "e2", "e4"]
        await worker.stop()
        await asyncio.wait_for(task, 5)
        assert store.cursor(CURSOR_GROUP, spool_topic("d")) == store.last_seq(spool_topic("d"))


def test_backoff_is_full_jitter_under_a_doubling_cap_and_never_below_a_brokers_floor() -> None:
    policy = RetryPolicy(base_seconds=0.1, cap_seconds=2.0)
    for attempt, ceiling in ((0, 0.1), (1, 0.2), (3, 0.8), (5, 2.0), (200, 2.0)):
        delays = [policy.backoff(attempt) for _ in range(500)]
        assert all(0 <= d <= ceiling for d in delays), attempt
        # Spread over the whole range (full jitter), not bunched at the ceiling (plain exponential backoff).
        assert min(delays) < ceiling * 0.1 and max(delays) > ceiling * 0.9, attempt
    assert all(policy.backoff(0, floor=1.5) >= 1.5 for _ in range(100))  # a broker's Retry-After wins
