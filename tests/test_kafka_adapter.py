"""The Kafka adapter beyond the conformance suite: what Kafka's own semantics add (real Tansu)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException

from tests.brokers import KAFKA_FAST_GROUP_OPTS, KafkaBroker, eventually, unique_name
from tests.conformance.target_kafka import create_topic
from umcef.adapters import kafka, open_adapter
from umcef.adapters.contract import (
    AdapterError,
    Delivery,
    NotFound,
    Rejected,
    Throttled,
    Transient,
    Unauthorized,
)
from umcef.adapters.kafka import KafkaAdapter, KafkaDelivery, _oauth_callback, classify, classify_error, from_url
from umcef.fabric.event import Event

pytestmark = pytest.mark.timeout(120)


def event(i: int, key: str | None = None, **extra: Any) -> Event:
    attrs: dict[str, Any] = {"specversion": "1.0", "id": f"e{i}", "source": "/t", "type": "t", "n": i, **extra}
    if key is not None:
        attrs["partitionkey"] = key
    return Event(attrs, {"i": i})


async def fresh(broker: KafkaBroker, partitions: int = 3, **query: str) -> tuple[str, str]:
    topic = unique_name("ka")
    await create_topic(broker.bootstrap, topic, partitions)
    group = unique_name("g")
    q = "&".join(f"{k}={v}" for k, v in query.items())
    return f"kafka://{broker.bootstrap}/{topic}" + (f"?{q}" if q else ""), \
        f"kafka://{broker.bootstrap}/{topic}?group={group}" + (f"&{q}" if q else "")


def adapter(url: str, **options: Any) -> KafkaAdapter:
    return from_url(url, **{**KAFKA_FAST_GROUP_OPTS, **options})


async def test_structured_mode_round_trip_keeps_json_types(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, mode="structured")
    sink, source = adapter(sink_url), adapter(source_url)
    sent = [event(i, "k", flag=True, num=i) for i in range(5)]
    assert all(o.ok for o in await sink.publish(sent))
    got: list[Event] = []

    async def handle(d: Delivery) -> None:
        got.append(d.event)

    task = asyncio.create_task(source.consume(handle))
    await eventually(lambda: len(got) == 5, 30, "5 events")
    await source.stop_consuming()
    await task
    assert [e.attributes["num"] for e in got] == list(range(5))  # one key: one partition, in order
    assert got[0].attributes["flag"] is True and got[0].data == {"i": 0}
    await sink.close()
    await source.close()


async def test_nack_delays_redelivery_and_keeps_key_order(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=1)
    sink, source = adapter(sink_url), adapter(source_url)
    assert all(o.ok for o in await sink.publish([event(i, f"k{i % 2}") for i in range(6)]))
    seen: list[tuple[int, int]] = []
    nacked_at: list[float] = []
    redelivered_at: list[float] = []

    async def handle(d: Delivery) -> None:
        n = d.event.attributes["n"]
        seen.append((int(n), d.attempt))
        if n == "2" and d.attempt == 1:
            nacked_at.append(time.monotonic())
            await d.nack(requeue_after=1.0)
        elif n == "2":
            redelivered_at.append(time.monotonic())

    task = asyncio.create_task(source.consume(handle))
    await eventually(lambda: len({n for n, _ in seen}) == 6 and redelivered_at, 30, "all events and the redelivery")
    await source.stop_consuming()
    await task
    assert redelivered_at[0] - nacked_at[0] >= 0.95
    assert (2, 2) in seen
    per_key: dict[int, list[int]] = defaultdict(list)
    for n, _ in seen:
        if n not in per_key[n % 2]:
            per_key[n % 2].append(n)
    assert per_key[0] == [0, 2, 4], seen  # 4 (same key) never overtakes the nacked 2
    assert per_key[1] == [1, 3, 5], seen
    await sink.close()
    await source.close()


async def test_only_the_acked_prefix_is_committed(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=1)
    sink = adapter(sink_url)
    assert all(o.ok for o in await sink.publish([event(i) for i in range(10)]))  # unkeyed: handled concurrently
    await sink.close()
    release = asyncio.Event()
    seen: list[int] = []

    async def hold_three(d: Delivery) -> None:
        seen.append(int(d.event.attributes["n"]))
        if d.event.attributes["n"] == "3":
            await release.wait()  # 3 stays unsettled; the others are acked

    first = adapter(source_url)
    task = asyncio.create_task(first.consume(hold_three))
    await eventually(lambda: len(seen) == 10, 30, "10 events")
    await asyncio.sleep(0.6)  # a few commit intervals: the commit stops at offset 3
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    await first.close()

    again: list[int] = []

    async def record(d: Delivery) -> None:
        again.append(int(d.event.attributes["n"]))

    second = adapter(source_url)
    task = asyncio.create_task(second.consume(record))
    await eventually(lambda: len(again) == 7, 30, "redelivery from offset 3")
    await asyncio.sleep(0.3)
    await second.stop_consuming()
    await task
    assert sorted(again) == list(range(3, 10))
    await second.close()


async def test_stop_finishes_running_handlers_and_commits_nothing_unhandled(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=1)
    sink = adapter(sink_url)
    assert all(o.ok for o in await sink.publish([event(i, "same") for i in range(5)]))  # one lane: one by one
    await sink.close()
    started = asyncio.Event()
    finished: list[int] = []

    async def slow(d: Delivery) -> None:
        started.set()
        await asyncio.sleep(0.5)
        finished.append(int(d.event.attributes["n"]))

    source = adapter(source_url)
    task = asyncio.create_task(source.consume(slow))
    await asyncio.wait_for(started.wait(), 30)
    await source.stop_consuming()
    await asyncio.wait_for(task, 10)
    assert finished == [0]  # the running one finished; the queued ones were never started
    await source.close()
    rest: list[int] = []

    async def record(d: Delivery) -> None:
        rest.append(int(d.event.attributes["n"]))

    source = adapter(source_url)
    task = asyncio.create_task(source.consume(record))
    await eventually(lambda: len(rest) == 4, 30, "the unhandled four")
    await source.stop_consuming()
    await task
    assert rest == [1, 2, 3, 4]
    await source.close()


async def test_max_in_flight_bounds_concurrent_handlers(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker)
    sink = adapter(sink_url)
    assert all(o.ok for o in await sink.publish([event(i) for i in range(200)]))
    await sink.close()
    running = peak = done = 0

    async def handle(d: Delivery) -> None:
        nonlocal running, peak, done
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        running -= 1
        done += 1

    source = adapter(source_url)
    task = asyncio.create_task(source.consume(handle, max_in_flight=7))
    await eventually(lambda: done == 200, 30, "200 events")
    await source.stop_consuming()
    await task
    assert 1 < peak <= 7
    await source.close()


async def test_two_members_share_the_partitions_without_loss(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=4)
    sink = adapter(sink_url)
    counts: dict[str, int] = defaultdict(int)
    by_member: dict[int, set[str]] = defaultdict(set)

    def handler(member: int) -> Any:
        async def handle(d: Delivery) -> None:
            counts[d.event.id] += 1
            by_member[member].add(d.event.id)
        return handle

    a, b = adapter(source_url), adapter(source_url)
    task_a = asyncio.create_task(a.consume(handler(0)))
    assert all(o.ok for o in await sink.publish([event(i, f"k{i}") for i in range(100)]))
    await eventually(lambda: len(counts) == 100, 30, "the first 100")
    task_b = asyncio.create_task(b.consume(handler(1)))
    await asyncio.sleep(3)  # the second member joins: a rebalance
    assert all(o.ok for o in await sink.publish([event(i, f"k{i}") for i in range(100, 300)]))
    await eventually(lambda: len(counts) == 300, 60, "all 300")
    for member, task in ((a, task_a), (b, task_b)):
        await member.stop_consuming()
        await task
        await member.close()
    await sink.close()
    assert by_member[1], "the second member never got a partition"


async def test_missing_topic_is_not_created(kafka_broker: KafkaBroker) -> None:
    topic = unique_name("absent")
    sink = open_adapter(f"kafka://{kafka_broker.bootstrap}/{topic}")
    (outcome,) = await sink.publish([event(1)])
    assert isinstance(outcome.error, NotFound)
    with pytest.raises(NotFound):
        await sink.consume(lambda d: d.ack())
    (outcome,) = await sink.publish([event(1)])
    assert isinstance(outcome.error, NotFound)  # the lookups did not create it
    await sink.close()


async def test_no_data_no_key_and_oversized_in_one_batch(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=1)
    sink = adapter(sink_url, max_event_bytes=2000)
    empty = Event({"specversion": "1.0", "id": "none", "source": "/t", "type": "t"}, None)
    big = Event({"specversion": "1.0", "id": "big", "source": "/t", "type": "t"}, "x" * 3000)
    outcomes = await sink.publish([empty, big, event(1)])
    assert outcomes[0].ok and outcomes[2].ok
    assert isinstance(outcomes[1].error, Rejected) and "2000" in str(outcomes[1].error)
    got: list[Event] = []

    async def handle(d: Delivery) -> None:
        got.append(d.event)

    source = adapter(source_url)
    task = asyncio.create_task(source.consume(handle))
    await eventually(lambda: len(got) == 2, 30, "2 events")
    await source.stop_consuming()
    await task
    assert got[0].id == "none" and got[0].data is None
    await sink.close()
    await source.close()


async def test_probe_of_a_blackholed_address_is_bounded() -> None:
    dead = open_adapter("kafka://10.255.255.1:9092/t", probe_timeout=1.0)
    started = time.monotonic()
    with pytest.raises(Transient):
        await dead.probe()
    assert time.monotonic() - started < 3
    (outcome,) = await dead.publish([event(1)])  # publish is bounded by connect_timeout too
    assert isinstance(outcome.error, Transient)
    await dead.close()


async def test_broker_restart_is_transient_then_recovers(kafka_broker_factory: Any) -> None:
    broker: KafkaBroker = kafka_broker_factory()
    topic = unique_name("restart")
    await create_topic(broker.bootstrap, topic, 1)
    # The broker comes back empty (memory storage): it no longer knows the idempotent producer's id, so
    # the first publish after the restart times out (Tansu answers UNKNOWN_PRODUCER_ID however librdkafka
    # bumps the epoch) and the adapter replaces its stuck producer; delivery_timeout_ms bounds that.
    sink = adapter(f"kafka://{broker.bootstrap}/{topic}", request_timeout_ms=3000, delivery_timeout_ms=3000,
                   connect_timeout=3, metadata_timeout=3, topic_cache_seconds=0)
    assert (await sink.publish([event(1)]))[0].ok
    await broker.astop()
    (outcome,) = await sink.publish([event(2)])
    assert isinstance(outcome.error, Transient), outcome
    with pytest.raises(Transient):
        await sink.probe()
    await broker.astart()  # memory storage: the topic is gone after the restart
    await create_topic(broker.bootstrap, topic, 1)
    deadline = time.monotonic() + 30
    while not (await sink.publish([event(3)]))[0].ok:
        assert time.monotonic() < deadline, "publish never recovered"
        await asyncio.sleep(0.2)
    assert await sink.probe() > 0
    await sink.close()


def test_url_and_options_are_checked() -> None:
    with pytest.raises(ValueError):
        from_url("kafka://h:1/")
    with pytest.raises(ValueError):
        from_url("kafka://h:1/t?mode=avro")
    with pytest.raises(TypeError):
        from_url("kafka://h:1/t", acks_typo=1)
    a = from_url("kafka://h1,h2:9093/orders.v1?group=g&mode=structured", acks=1)
    assert a.bootstrap == ["h1:9092", "h2:9093"] and a.topic == "orders.v1" and a.group == "g" and a.structured


async def test_close_abandons_hanging_handlers_like_a_crash(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=1)
    sink = adapter(sink_url)
    assert all(o.ok for o in await sink.publish([event(i) for i in range(3)]))
    await sink.close()
    hang = asyncio.Event()
    got: list[int] = []

    async def never(d: Delivery) -> None:
        got.append(int(d.event.attributes["n"]))
        await hang.wait()

    first = adapter(source_url, close_grace=0.5)
    task = asyncio.create_task(first.consume(never))
    await eventually(lambda: len(got) == 3, 30, "3 deliveries")
    started = time.monotonic()
    await first.close()
    assert time.monotonic() - started < 3
    assert task.done() and task.exception() is None  # consume() returned; the caller was not cancelled
    again: list[int] = []

    async def record(d: Delivery) -> None:
        again.append(int(d.event.attributes["n"]))

    second = adapter(source_url)
    task = asyncio.create_task(second.consume(record))
    await eventually(lambda: len(again) == 3, 30, "all 3 again")
    await second.stop_consuming()
    await task
    await second.close()


# ---------------------------------------------------------------------------------------------------
# The producer: confluent-kafka (librdkafka) behind asyncio.


def test_producer_config_defaults_are_idempotent_and_never_auto_create() -> None:
    config = from_url("kafka://h1,h2:9093/t", max_event_bytes=2_000_000).options.producer_config(["h1:9092", "h2:9093"])
    assert config["bootstrap.servers"] == "h1:9092,h2:9093"
    assert (config["acks"], config["enable.idempotence"], config["linger.ms"]) == ("all", True, 0)
    assert config["allow.auto.create.topics"] is False
    assert config["message.max.bytes"] == 2_000_000  # librdkafka's batches stay within what we accept
    assert config["message.timeout.ms"] == 30_000 and config["security.protocol"] == "PLAINTEXT"
    assert not any(k.startswith(("sasl.", "ssl.")) for k in config)
    # acks below "all" turns idempotence off by default (it needs "all"); asking for both is an error.
    assert from_url("kafka://h:1/t", acks=1).options.producer_config(["h:1"])["enable.idempotence"] is False
    with pytest.raises(ValueError, match="idempotence"):
        from_url("kafka://h:1/t", acks=1, enable_idempotence=True)
    with pytest.raises(ValueError, match="linger_ms"):
        from_url("kafka://h:1/t", linger_ms=-1)
    # The busy producer (publishing above busy_events_per_s) is the same but for its linger.
    busy = from_url("kafka://h:1/t").options.producer_config(["h:1"], busy=True)
    assert busy["linger.ms"] == 2.0 and {k: v for k, v in busy.items() if k != "linger.ms"} == {
        k: v for k, v in from_url("kafka://h:1/t").options.producer_config(["h:1"]).items() if k != "linger.ms"}
    with pytest.raises(ValueError, match="busy_linger_ms"):
        from_url("kafka://h:1/t", busy_linger_ms=-1)
    with pytest.raises(ValueError, match="busy_events_per_s"):
        from_url("kafka://h:1/t", busy_events_per_s=0)
    with pytest.raises(ValueError, match="security_protocol"):
        from_url("kafka://h:1/t", security_protocol="TLS")


def test_producer_config_carries_the_credentials() -> None:
    opts = from_url("kafka://h:1/t", security_protocol="sasl_ssl", sasl_mechanism="SCRAM-SHA-512",
                    sasl_plain_username="u", sasl_plain_password="s3cr3t-pw", ssl_cafile="/ca.pem",
                    ssl_check_hostname=False, client_id="gw").options
    config = opts.producer_config(["h:1"])
    assert (config["security.protocol"], config["sasl.mechanism"]) == ("SASL_SSL", "SCRAM-SHA-512")
    assert (config["sasl.username"], config["sasl.password"]) == ("u", "s3cr3t-pw")
    assert config["ssl.ca.location"] == "/ca.pem"
    assert config["ssl.endpoint.identification.algorithm"] == "none" and config["client.id"] == "gw"
    assert "s3cr3t-pw" not in repr(opts)  # secrets stay out of logs


@pytest.mark.parametrize(("code", "expected"), [
    (KafkaError.MSG_SIZE_TOO_LARGE, Rejected),
    (KafkaError.INVALID_RECORD, Rejected),
    (KafkaError.UNKNOWN_TOPIC_OR_PART, NotFound),
    (KafkaError._UNKNOWN_TOPIC, NotFound),
    (KafkaError.TOPIC_AUTHORIZATION_FAILED, Unauthorized),
    (KafkaError.CLUSTER_AUTHORIZATION_FAILED, Unauthorized),
    (KafkaError.SASL_AUTHENTICATION_FAILED, Unauthorized),
    (KafkaError._AUTHENTICATION, Unauthorized),
    (KafkaError.THROTTLING_QUOTA_EXCEEDED, Throttled),
    (KafkaError._QUEUE_FULL, Throttled),
    (KafkaError._MSG_TIMED_OUT, Transient),
    (KafkaError._TRANSPORT, Transient),
    (KafkaError._ALL_BROKERS_DOWN, Transient),
    (KafkaError.NOT_LEADER_FOR_PARTITION, Transient),
    (KafkaError._PURGE_INFLIGHT, Transient),
    (KafkaError._FATAL, Transient),
])
def test_librdkafka_errors_are_classified(code: int, expected: type[AdapterError]) -> None:
    error = classify_error(KafkaError(code), "publishing to t")
    assert type(error) is expected and str(error).startswith("publishing to t: ")
    assert type(classify(KafkaException(KafkaError(code)), "x")) is expected  # raised by produce()


async def consume_ns(source_url: str, count: int) -> list[int]:
    """The `n` of the first `count` events consumed from `source_url`, in the order consumed."""
    got: list[int] = []

    async def handle(d: Delivery) -> None:
        got.append(int(d.event.attributes["n"]))

    source = adapter(source_url)
    task = asyncio.create_task(source.consume(handle))
    await eventually(lambda: len(got) >= count, 30, f"{count} events")
    await asyncio.sleep(0.3)
    await source.stop_consuming()
    await task
    await source.close()
    return got


async def test_idempotent_producer_keeps_every_event_once_and_in_key_order(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=3)
    sink = adapter(sink_url)
    assert sink.options.idempotent
    sent = [event(i, f"k{i % 5}") for i in range(500)]
    outcomes = await sink.publish(sent)
    assert [o.event_id for o in outcomes] == [e.id for e in sent] and all(o.ok for o in outcomes)
    await sink.close()
    got = await consume_ns(source_url, 500)
    assert sorted(got) == list(range(500))  # exactly once each
    for k in range(5):
        assert [n for n in got if n % 5 == k] == list(range(k, 500, 5))


def spy_producers(sink: KafkaAdapter) -> list[bool]:
    """Records, per chunk the adapter sends, whether it went through the busy producer."""
    through_busy: list[bool] = []
    send_chunk = sink._send_chunk

    async def spied(producer: Any, events: Any, issued: Any = None) -> list[Any]:
        through_busy.append(producer is sink._busy_producer)
        return await send_chunk(producer, events, issued)

    sink._send_chunk = spied  # type: ignore[method-assign]
    return through_busy


async def test_a_busy_adapter_publishes_through_a_lingering_producer_and_back(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=3)
    sink = adapter(sink_url, busy_events_per_s=2_000)
    through_busy = spy_producers(sink)
    n = 0

    def batch(size: int) -> list[Event]:
        nonlocal n
        n += size
        return [event(i, f"k{i % 5}") for i in range(n - size, n)]

    async def quiet(until: Callable[[], bool], then: float) -> None:  # one event every 20 ms: ~50/s
        started, since = time.monotonic(), None
        while since is None or time.monotonic() - since < then:
            assert time.monotonic() - started < 10, "the adapter never went quiet"
            assert all(o.ok for o in await sink.publish(batch(1)))
            await asyncio.sleep(0.02)
            since = since or (time.monotonic() if until() else None)

    await quiet(lambda: True, 0.3)
    assert not sink._busy and not any(through_busy)
    # 8 publishes of 50 in flight at a time, far above 2,000 events/s, until 0.3 s after the switch
    tasks = [asyncio.create_task(sink.publish(batch(50))) for _ in range(8)]
    busy_since = None
    while busy_since is None or time.monotonic() - busy_since < 0.3:
        assert all(o.ok for o in await tasks.pop(0))
        tasks.append(asyncio.create_task(sink.publish(batch(50))))
        busy_since = busy_since or (time.monotonic() if sink._busy else None)
        assert busy_since or len(through_busy) < 2_000, "the adapter never got busy"
    for task in tasks:
        assert all(o.ok for o in await task)
    assert through_busy[-1] and sink.busy_switches == 1
    chunks = len(through_busy)
    await quiet(lambda: not sink._busy, 0.3)
    assert not any(through_busy[-5:]) and len(through_busy) > chunks + 5
    assert sink.busy_switches == 2
    await sink.close()
    got = await consume_ns(source_url, n)
    assert sorted(got) == list(range(n))  # exactly once each
    for k in range(5):
        assert [i for i in got if i % 5 == k] == list(range(k, n, 5))


async def test_one_publisher_awaiting_each_publish_is_never_busy(kafka_broker: KafkaBroker) -> None:
    sink_url, _ = await fresh(kafka_broker, partitions=3)
    sink = adapter(sink_url, busy_events_per_s=100)
    assert all(o.ok for o in await sink.publish([event(0)]))  # (the producer's id: ~0.5 s)
    through_busy = spy_producers(sink)
    published, started = 0, time.monotonic()
    while time.monotonic() - started < 0.5:
        assert all(o.ok for o in await sink.publish([event(i, f"k{i % 5}") for i in range(published, published + 200)]))
        published += 200
    assert published / (time.monotonic() - started) > 200  # the rate alone would have made it busy
    assert not sink._busy and sink.busy_switches == 0 and not any(through_busy)
    await sink.close()


async def test_after_a_switch_a_publish_waits_for_the_other_producers_records(kafka_broker: KafkaBroker) -> None:
    sink_url, source_url = await fresh(kafka_broker, partitions=1)
    sink = adapter(sink_url, busy_linger_ms=400)
    sink._update_busy = lambda events, overlapped: None  # type: ignore[method-assign]  (the test picks)
    through_busy = spy_producers(sink)
    assert (await sink.publish([event(0, "k")]))[0].ok
    sink._busy = True
    assert (await sink.publish([event(1, "k")]))[0].ok  # (each producer's first publish waits for its id)
    lingering = asyncio.create_task(sink.publish([event(2, "k")]))  # queued, then held 400 ms by the linger
    await asyncio.sleep(0.05)
    sink._busy = False
    assert (await sink.publish([event(3, "k")]))[0].ok  # through the quiet producer, after event 2's report
    assert lingering.done()  # (event 2 lingered 400 ms; event 3 alone would have been acknowledged first)
    assert (await lingering)[0].ok
    assert through_busy == [False, True, True, False]
    await sink.close()
    assert await consume_ns(source_url, 4) == [0, 1, 2, 3]


@pytest.mark.parametrize("report_within", ["the switch's wait", "after it"])
async def test_a_switch_while_the_other_producers_records_are_unreported(
        kafka_broker_factory: Any, monkeypatch: pytest.MonkeyPatch, report_within: str) -> None:
    """Their failure within the wait fails the publish (it would overtake them); a longer wait leaves the
    publish on the other producer, in order behind them."""
    broker: KafkaBroker = kafka_broker_factory()
    topic = unique_name("switch")
    await create_topic(broker.bootstrap, topic, 1)
    # The record times out after 1.5 s; the switch waits 3 s for it, or 0.3 s.
    monkeypatch.setattr(kafka, "_SWITCH_WAIT_S", 3.0 if report_within == "the switch's wait" else 0.3)
    sink = adapter(f"kafka://{broker.bootstrap}/{topic}", delivery_timeout_ms=1500)
    sink._update_busy = lambda events, overlapped: None  # type: ignore[method-assign]
    sink._busy = True
    assert (await sink.publish([event(0, "k")]))[0].ok
    through_busy = spy_producers(sink)
    await broker.astop()  # the topic stays cached: the record goes to librdkafka and times out there
    failing = asyncio.create_task(sink.publish([event(1, "k")]))
    await asyncio.sleep(0.1)
    sink._busy = False
    (after,) = await sink.publish([event(2, "k")])
    assert isinstance((await failing)[0].error, Transient)
    assert isinstance(after.error, Transient)
    if report_within == "the switch's wait":
        assert "overtake" in str(after.error) and through_busy == [True]
    else:
        assert "timed out" in str(after.error) and through_busy == [True, True] and sink._busy
    await sink.close()


async def test_a_publish_waiting_at_a_switch_when_the_adapter_closes_says_closed(
        kafka_broker_factory: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    broker: KafkaBroker = kafka_broker_factory()
    topic = unique_name("switch")
    await create_topic(broker.bootstrap, topic, 1)
    monkeypatch.setattr(kafka, "_SWITCH_WAIT_S", 30.0)
    sink = adapter(f"kafka://{broker.bootstrap}/{topic}", close_grace=0.2)
    sink._update_busy = lambda events, overlapped: None  # type: ignore[method-assign]
    sink._busy = True
    assert (await sink.publish([event(0, "k")]))[0].ok
    await broker.astop()
    unreported = asyncio.create_task(sink.publish([event(1, "k")]))
    await asyncio.sleep(0.1)
    sink._busy = False
    waiting = asyncio.create_task(sink.publish([event(2, "k")]))
    await asyncio.sleep(0.1)
    await sink.close()  # purges event 1 after its grace: the switch's wait ends
    (after,) = await asyncio.wait_for(waiting, 10)
    assert isinstance(after.error, Transient) and "closed" in str(after.error)
    assert isinstance((await unreported)[0].error, Transient)


async def test_full_queue_throttles_and_undelivered_records_time_out(kafka_broker_factory: Any) -> None:
    broker: KafkaBroker = kafka_broker_factory()
    topic = unique_name("full")
    await create_topic(broker.bootstrap, topic, 1)
    sink = adapter(f"kafka://{broker.bootstrap}/{topic}", max_queued_messages=5, queue_full_timeout=0.2,
                   delivery_timeout_ms=1500)
    assert (await sink.publish([event(0)]))[0].ok
    first = sink._producer
    await broker.astop()  # the topic stays cached: the records go to librdkafka and wait there
    started = time.monotonic()
    outcomes = await sink.publish([event(i) for i in range(1, 21)])
    assert time.monotonic() - started < 10
    kinds = [type(o.error) for o in outcomes]
    assert kinds == [Transient] * 5 + [Throttled] * 15, kinds  # 5 queued and timed out, 15 found no room
    assert "timed out" in str(outcomes[0].error)
    # A chunk that timed out without a single delivery retires its producer: the next one is fresh.
    await broker.astart()
    await create_topic(broker.bootstrap, topic, 1)
    deadline = time.monotonic() + 30
    while not (await sink.publish([event(99)]))[0].ok:
        assert time.monotonic() < deadline, "publish never recovered"
        await asyncio.sleep(0.2)
    assert sink._producer is not first
    await sink.close()


async def test_close_flushes_within_its_grace_then_fails_the_rest(kafka_broker_factory: Any) -> None:
    broker: KafkaBroker = kafka_broker_factory()
    topic = unique_name("grace")
    await create_topic(broker.bootstrap, topic, 1)
    sink = adapter(f"kafka://{broker.bootstrap}/{topic}", close_grace=0.5)
    assert (await sink.publish([event(0)]))[0].ok
    await broker.astop()
    publishing = asyncio.create_task(sink.publish([event(i) for i in range(1, 11)]))
    await asyncio.sleep(0.3)
    started = time.monotonic()
    await sink.close()
    outcomes = await asyncio.wait_for(publishing, 5)
    assert time.monotonic() - started < 3
    assert all(isinstance(o.error, Transient) for o in outcomes), outcomes  # purged: never acknowledged
    (late,) = await sink.publish([event(11)])
    assert isinstance(late.error, Transient) and "closed" in str(late.error)


async def test_a_producer_with_a_fatal_error_is_replaced(kafka_broker: KafkaBroker) -> None:
    sink_url, _ = await fresh(kafka_broker, partitions=1)
    sink = adapter(sink_url)
    assert (await sink.publish([event(0)]))[0].ok
    broken = sink._producer
    assert broken is not None
    # librdkafka raises a fatal error e.g. when the idempotent producer's sequence cannot be repaired;
    # the instance is unusable from then on (simulated here: librdkafka has no public trigger).
    broken.fatal = KafkaError(KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER, fatal=True)
    assert (await sink.publish([event(1)]))[0].ok
    assert sink._producer is not broken
    await sink.close()


async def test_oauth_token_provider_serves_librdkafka_through_the_loop() -> None:
    class Provider:  # aiokafka's AbstractTokenProvider shape: an async token()
        async def token(self) -> str:
            return "tok-1"

    callback = _oauth_callback(Provider(), asyncio.get_running_loop(), 5.0)
    token, expiry = await asyncio.to_thread(callback, "")  # librdkafka calls it from the poll thread
    assert token == "tok-1" and time.time() < expiry <= time.time() + 61


async def test_keys_land_where_the_java_client_puts_them(kafka_broker: KafkaBroker) -> None:
    """murmur2, as the Java client and aiokafka (librdkafka's own default hashes with CRC32): a key keeps
    its partition, and so its order, across producers of different clients."""
    from aiokafka.partitioner import murmur2  # type: ignore[import-untyped]

    sink_url, source_url = await fresh(kafka_broker, partitions=4)
    sink = adapter(sink_url)
    keys = [f"customer-{i}" for i in range(40)]
    assert all(o.ok for o in await sink.publish([event(i, key) for i, key in enumerate(keys)]))
    await sink.close()
    got: dict[str, int] = {}

    async def handle(d: Delivery) -> None:
        assert isinstance(d, KafkaDelivery)
        got[d.event.attributes["partitionkey"]] = d.partition

    source = adapter(source_url)
    task = asyncio.create_task(source.consume(handle))
    await eventually(lambda: len(got) == len(keys), 30, "every key")
    await source.stop_consuming()
    await task
    await source.close()
    assert got == {key: (murmur2(key.encode()) & 0x7FFFFFFF) % 4 for key in keys}
