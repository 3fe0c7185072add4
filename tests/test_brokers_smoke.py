"""Every real broker the tests use does a round trip with its own official client.

If one of these fails, the broker fixture (``tests/brokers.py``) is broken, not the code under test.
"""

from __future__ import annotations

import asyncio
import os
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.brokers import KAFKA_FAST_GROUP_OPTS, KafkaBroker, LatencyProxy, PubsubEmulator, SqsServer, unique_name
from tests.conftest_brokers import KafkaFactory, ProxyFactory

pytestmark = pytest.mark.timeout(60)


# -- Kafka (Tansu) -----------------------------------------------------------------------------------


async def _create_topic(bootstrap: str, topic: str, partitions: int = 1) -> None:
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        await admin.close()


async def _produce(bootstrap: str, topic: str, values: list[bytes]) -> float:
    """Produce with acks=all; returns the slowest send_and_wait in seconds."""
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    slowest = 0.0
    try:
        for value in values:
            began = time.monotonic()
            await producer.send_and_wait(topic, value, key=b"k", headers=[("ce_id", value)])
            slowest = max(slowest, time.monotonic() - began)
    finally:
        await producer.stop()
    return slowest


async def _consume(bootstrap: str, topic: str, group: str, count: int, *, commit: bool = True) -> list[Any]:
    """Read exactly ``count`` records as consumer group ``group`` (count, never end offsets: Tansu quirk)."""
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **KAFKA_FAST_GROUP_OPTS,
    )
    await consumer.start()
    records: list[Any] = []
    deadline = time.monotonic() + 20
    try:
        while len(records) < count and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=200, max_records=count - len(records))
            for batch in batches.values():
                records.extend(batch)
        if commit and records:
            await consumer.commit()
    finally:
        await consumer.stop()
    return records


async def test_kafka_produce_consume(kafka_broker: KafkaBroker) -> None:
    topic = unique_name("smoke")
    await _create_topic(kafka_broker.bootstrap, topic)
    values = [f"m{i}".encode() for i in range(3)]
    await _produce(kafka_broker.bootstrap, topic, values)
    records = await _consume(kafka_broker.bootstrap, topic, unique_name("g"), len(values))
    assert [r.value for r in records] == values
    assert [r.key for r in records] == [b"k"] * 3
    assert [dict(r.headers)["ce_id"] for r in records] == values


async def test_kafka_stop_start_keeps_port(kafka_broker_factory: KafkaFactory) -> None:
    broker: KafkaBroker = kafka_broker_factory()
    address = broker.bootstrap
    await broker.astop(kill=True)
    assert not broker.running
    await broker.astart()
    assert broker.bootstrap == address
    topic = unique_name("restart")
    await _create_topic(broker.bootstrap, topic)
    await _produce(broker.bootstrap, topic, [b"after-restart"])
    assert [r.value for r in await _consume(broker.bootstrap, topic, unique_name("g"), 1)] == [b"after-restart"]


async def test_durable_kafka_keeps_messages_and_offsets(durable_kafka_broker: KafkaBroker) -> None:
    broker = durable_kafka_broker
    topic, group = unique_name("durable"), unique_name("g")
    await _create_topic(broker.bootstrap, topic)
    values = [f"d{i}".encode() for i in range(5)]
    await _produce(broker.bootstrap, topic, values)
    first = await _consume(broker.bootstrap, topic, group, 2)  # commits offset 2
    assert [r.value for r in first] == values[:2]

    await broker.astop(kill=True)  # a crash, not a clean shutdown
    await broker.astart()

    rest = await _consume(broker.bootstrap, topic, group, 3)
    assert [r.value for r in rest] == values[2:]


async def test_kafka_behind_latency_proxy(kafka_broker_factory: KafkaFactory) -> None:
    broker: KafkaBroker = kafka_broker_factory(behind_proxy=True)
    proxy = broker.proxy
    assert proxy is not None
    topic = unique_name("proxied")
    await _create_topic(broker.bootstrap, topic)
    fast = await _produce(broker.bootstrap, topic, [b"fast"])
    proxy.set_delay(150)
    slow = await _produce(broker.bootstrap, topic, [b"slow"])
    assert slow >= 0.15 > fast, (fast, slow)
    proxy.set_delay(0)
    assert [r.value for r in await _consume(broker.bootstrap, topic, unique_name("g"), 2)] == [b"fast", b"slow"]
    assert proxy.bytes_down > 0 and proxy.bytes_up > 0


# -- SQS (moto) ----------------------------------------------------------------------------------------


def test_sqs_send_receive_boto3(sqs_server: SqsServer) -> None:
    import boto3

    sqs = boto3.client("sqs", **sqs_server.client_kwargs())
    url = sqs.create_queue(QueueName=unique_name("smoke"))["QueueUrl"]
    sqs.send_message(
        QueueUrl=url,
        MessageBody="hello",
        MessageAttributes={"ce_type": {"DataType": "String", "StringValue": "com.example.t"}},
    )
    got = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1, MessageAttributeNames=["All"]
    ).get("Messages", [])
    assert [m["Body"] for m in got] == ["hello"]
    assert got[0]["MessageAttributes"]["ce_type"]["StringValue"] == "com.example.t"
    sqs.delete_message(QueueUrl=url, ReceiptHandle=got[0]["ReceiptHandle"])
    assert sqs.receive_message(QueueUrl=url, WaitTimeSeconds=0).get("Messages", []) == []


async def test_sqs_send_receive_aiobotocore(sqs_server: SqsServer) -> None:
    from aiobotocore.session import get_session

    async with get_session().create_client("sqs", **sqs_server.client_kwargs()) as sqs:
        url = (await sqs.create_queue(QueueName=unique_name("smoke-fifo") + ".fifo", Attributes={"FifoQueue": "true"}))[
            "QueueUrl"
        ]
        await sqs.send_message(QueueUrl=url, MessageBody="a", MessageGroupId="g", MessageDeduplicationId="1")
        got = (await sqs.receive_message(QueueUrl=url, WaitTimeSeconds=1)).get("Messages", [])
        assert [m["Body"] for m in got] == ["a"]


# -- Pub/Sub (emulator) ----------------------------------------------------------------------------------


def _pubsub_round_trip(publisher: Any, subscriber: Any, project: str) -> None:
    topic = publisher.topic_path(project, unique_name("smoke"))
    subscription = subscriber.subscription_path(project, unique_name("sub"))
    publisher.create_topic(name=topic)
    subscriber.create_subscription(name=subscription, topic=topic)  # fresh per test (emulator quirk)
    publisher.publish(topic, b"hello", ce_type="com.example.t").result(timeout=10)
    received: list[Any] = []
    deadline = time.monotonic() + 10
    while not received and time.monotonic() < deadline:
        response = subscriber.pull(subscription=subscription, max_messages=10, timeout=5)
        received.extend(response.received_messages)
    assert [m.message.data for m in received] == [b"hello"]
    assert dict(received[0].message.attributes) == {"ce_type": "com.example.t"}
    subscriber.acknowledge(subscription=subscription, ack_ids=[m.ack_id for m in received])


def test_pubsub_publish_pull_explicit_channel(pubsub_emulator: PubsubEmulator) -> None:
    publisher, subscriber = pubsub_emulator.publisher_client(), pubsub_emulator.subscriber_client()
    try:
        _pubsub_round_trip(publisher, subscriber, pubsub_emulator.project)
    finally:
        publisher.transport.close()
        subscriber.close()


def test_pubsub_publish_pull_env(pubsub_emulator: PubsubEmulator, monkeypatch: pytest.MonkeyPatch) -> None:
    from google.cloud import pubsub_v1

    for key, value in pubsub_emulator.env().items():
        monkeypatch.setenv(key, value)
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    try:
        _pubsub_round_trip(publisher, subscriber, pubsub_emulator.project)
    finally:
        publisher.transport.close()
        subscriber.close()


# -- Redis and PostgreSQL (the machine's services) ---------------------------------------------------------


async def test_redis_set_get(redis_url: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    key = unique_name("umcef-smoke")
    try:
        await client.set(key, b"v", ex=60)
        assert await client.get(key) == b"v"
    finally:
        await client.delete(key)
        await client.aclose()


async def test_postgres_select_1(postgres_dsn: str) -> None:
    import psycopg

    async with await psycopg.AsyncConnection.connect(postgres_dsn) as conn:
        cursor = await conn.execute("SELECT 1")
        assert await cursor.fetchone() == (1,)


# -- LatencyProxy --------------------------------------------------------------------------------------------


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        while data := self.request.recv(1 << 16):
            self.request.sendall(data)


@pytest.fixture
def echo_server() -> Iterator[tuple[str, int]]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Echo)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield "127.0.0.1", int(server.server_address[1])
    server.shutdown()
    server.server_close()


def _rtt(sock: socket.socket, rounds: int = 3) -> float:
    best = float("inf")
    for _ in range(rounds):
        began = time.monotonic()
        sock.sendall(b"x")
        assert sock.recv(1) == b"x"
        best = min(best, time.monotonic() - began)
    return best


def _echo_bytes(sock: socket.socket, payload: bytes) -> bytes:
    sender = threading.Thread(target=sock.sendall, args=(payload,), daemon=True)
    sender.start()
    out = bytearray()
    while len(out) < len(payload):
        chunk = sock.recv(1 << 16)
        if not chunk:
            break
        out += chunk
    sender.join(5)
    return bytes(out)


def test_latency_proxy(echo_server: tuple[str, int], latency_proxy: ProxyFactory) -> None:
    proxy: LatencyProxy = latency_proxy(*echo_server)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        base = _rtt(sock)
        payload = os.urandom(1 << 20)
        assert _echo_bytes(sock, payload) == payload
        proxy.set_delay(100)
        delayed = _rtt(sock)
        assert delayed - base >= 0.095, (base, delayed)
        assert delayed < 1.0, delayed
        proxy.set_delay(0)
        assert _rtt(sock) < 0.05

        proxy.set_blackhole(True)
        sock.settimeout(0.3)
        sock.sendall(b"y")
        with pytest.raises(TimeoutError):
            sock.recv(1)
        proxy.set_blackhole(False)

        proxy.set_down(True)
        sock.settimeout(2)
        try:
            closed = sock.recv(1) == b""
        except ConnectionError:
            closed = True
        assert closed
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)

    proxy.set_down(False)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        assert _rtt(sock, 1) < 0.5
    assert proxy.bytes_up >= len(payload) and proxy.bytes_down >= len(payload)


async def test_latency_proxy_does_not_block_the_test_loop(
    echo_server: tuple[str, int], latency_proxy: ProxyFactory
) -> None:
    proxy: LatencyProxy = latency_proxy(*echo_server, delay_ms=50)
    reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
    began = time.monotonic()
    writer.write(b"ping")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
    assert time.monotonic() - began >= 0.045
    writer.close()
    await writer.wait_closed()
