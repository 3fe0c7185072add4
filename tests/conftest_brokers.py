"""Session fixtures that start real brokers on free ports (``tests/conftest.py`` star-imports this).

A broker that cannot be started fails the tests that need it, loudly, with the reason and the broker's
log (``pytest.fail``, never a skip: a skip is not a pass). Brokers start lazily, only when a test
asks for them, once per session — with pytest-xdist (``./run test`` uses two workers) once per worker,
so every worker has brokers of its own; their logs go to the session's temporary directory.

Fixtures:

- ``kafka_broker`` — Tansu, memory storage; ``.bootstrap``, ``.stop(kill=...)``, ``.start()``,
  ``.astop()`` / ``.astart()``. Shared by the session: a chaos test that stops it must start it again
  (or better, take a private one from ``kafka_broker_factory``). A restart loses all data (memory).
- ``kafka_broker_factory`` — ``make(durable=False, behind_proxy=False, delay_ms=0)`` → a private
  :class:`KafkaBroker`, stopped at the end of the test; ``behind_proxy=True`` returns a broker that
  advertises a :class:`LatencyProxy` (``broker.proxy``), so every client byte goes through the proxy;
  ``durable=True`` stores on moto S3 (own bucket), so stop/start keeps the data.
- ``durable_kafka_broker`` — a private Tansu on ``s3://`` storage (moto S3, own bucket): stop/start
  keeps topics, messages and committed offsets.
- ``sqs_server`` — moto (all services), ``.endpoint_url``, ``.region``, ``.client_kwargs()``.
- ``pubsub_emulator`` — ``.host`` ("127.0.0.1:PORT"), ``.project``, ``.env()``, ``.publisher_client()``.
- ``redis_url`` / ``postgres_dsn`` — the machine's services, checked once.
- ``latency_proxy`` — ``make(target_host, target_port, delay_ms=0, jitter_ms=0)`` → a started :class:`LatencyProxy`.
- ``broker_startup_seconds`` — how long each broker took to become ready (filled as they start).

Overrides: ``UMCEF_TANSU`` (tansu binary), ``UMCEF_PUBSUB_EMULATOR`` (emulator script),
``UMCEF_TEST_REDIS_URL``, ``UMCEF_TEST_POSTGRES_DSN``.

Use :func:`unique_name` for every topic, queue, subscription and key: the brokers are shared (Redis and
PostgreSQL by every worker).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from tests.brokers import (
    BrokerStartError,
    KafkaBroker,
    LatencyProxy,
    MotoProcess,
    PubsubEmulator,
    SqsServer,
    check_postgres,
    check_redis,
    s3_storage,
    start_kafka,
    start_kafka_behind_proxy,
    start_moto_process,
    start_pubsub,
    start_sqs,
    unique_name,
)
from tests.servicebus_broker import ServiceBusTestBroker

__all__ = [
    "POSTGRES_DSN",
    "REDIS_URL",
    "STARTUP_SECONDS",
    "broker_logs",
    "broker_startup_seconds",
    "durable_kafka_broker",
    "kafka_broker",
    "kafka_broker_factory",
    "latency_proxy",
    "moto_s3",
    "postgres_dsn",
    "pubsub_emulator",
    "redis_url",
    "servicebus_test_broker",
    "sqs_server",
    "unique_name",
]

# The machine's services (shared/BROKERS.md); the variables exist to point the tests elsewhere.
REDIS_URL = os.environ.get("UMCEF_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
POSTGRES_DSN = os.environ.get("UMCEF_TEST_POSTGRES_DSN", "postgresql://postgres@127.0.0.1:5432/test")

# Seconds from launch to ready, per broker (also printed at setup, visible with -s).
STARTUP_SECONDS: dict[str, float] = {}

T = TypeVar("T")
KafkaFactory = Callable[..., KafkaBroker]
ProxyFactory = Callable[..., LatencyProxy]


def _start(what: str, start: Callable[[], T], problem: str = "could not be started") -> T:
    """Run ``start``; turn a BrokerStartError into a loud pytest.fail (outside the except: no chained noise)."""
    try:
        return start()
    except BrokerStartError as exc:
        error = str(exc)
    pytest.fail(f"{what} {problem}: {error}", pytrace=False)


def _record(name: str, seconds: float) -> None:
    STARTUP_SECONDS[name] = seconds
    print(f"\n[brokers] {name} ready in {seconds:.2f} s")


@pytest.fixture(scope="session")
def broker_logs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("broker-logs")


@pytest.fixture(scope="session")
def broker_startup_seconds() -> dict[str, float]:
    return STARTUP_SECONDS


@pytest.fixture(scope="session")
def kafka_broker(broker_logs: Path) -> Iterator[KafkaBroker]:
    broker = _start("Kafka (Tansu)", lambda: start_kafka(log_dir=broker_logs))
    _record("kafka", broker.startup_seconds)
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def moto_s3(broker_logs: Path) -> Iterator[MotoProcess]:
    """A moto server in a child process, as S3 for durable Tansu (separate from ``sqs_server``)."""
    server = _start("moto S3 (for durable Tansu)", lambda: start_moto_process(log_dir=broker_logs))
    _record("moto-s3", server.startup_seconds)
    yield server
    server.stop()


@pytest.fixture
def kafka_broker_factory(broker_logs: Path, request: pytest.FixtureRequest) -> Iterator[KafkaFactory]:
    """Private Tansu brokers for tests that stop, kill or slow them; all stopped at teardown."""
    started: list[KafkaBroker] = []
    proxies: list[LatencyProxy] = []

    def make(*, durable: bool = False, behind_proxy: bool = False, delay_ms: float = 0.0) -> KafkaBroker:
        storage: str = "memory://tansu/"
        env: dict[str, str] = {}
        if durable:
            s3: MotoProcess = request.getfixturevalue("moto_s3")
            storage, env = _start("S3 bucket for durable Kafka", lambda: s3_storage(s3, unique_name("tansu")))
        if behind_proxy:
            broker, proxy = _start(
                "Kafka (Tansu) behind a LatencyProxy",
                lambda: start_kafka_behind_proxy(delay_ms, storage=storage, env=env, log_dir=broker_logs),
            )
            proxies.append(proxy)
        else:
            broker = _start(
                "durable Kafka (Tansu on moto S3)" if durable else "Kafka (Tansu)",
                lambda: start_kafka(storage=storage, env=env, log_dir=broker_logs),
            )
        started.append(broker)
        _record("kafka-durable" if durable else "kafka-private", broker.startup_seconds)
        return broker

    yield make
    for broker in started:
        broker.stop(kill=True)
    for proxy in proxies:
        proxy.stop()


@pytest.fixture
def durable_kafka_broker(kafka_broker_factory: KafkaFactory) -> KafkaBroker:
    """A private Tansu on s3:// storage (moto): ``stop()`` then ``start()`` keeps every message and offset."""
    return kafka_broker_factory(durable=True)


@pytest.fixture(scope="session")
def sqs_server() -> Iterator[SqsServer]:
    server = _start("SQS (moto server)", start_sqs)
    _record("sqs", server.startup_seconds)
    yield server
    server.stop()


@pytest.fixture(scope="session")
def pubsub_emulator(broker_logs: Path) -> Iterator[PubsubEmulator]:
    emulator = _start("Pub/Sub emulator", lambda: start_pubsub(log_dir=broker_logs))
    _record("pubsub", emulator.startup_seconds)
    yield emulator
    emulator.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    _start("Redis", lambda: check_redis(REDIS_URL), "is not available")
    return REDIS_URL


@pytest.fixture(scope="session")
def postgres_dsn() -> str:
    _start("PostgreSQL", lambda: check_postgres(POSTGRES_DSN), "is not available")
    return POSTGRES_DSN


@pytest.fixture
def latency_proxy() -> Iterator[ProxyFactory]:
    """``make(target_host, target_port, delay_ms=0, **kw)`` → a started LatencyProxy, stopped at teardown."""
    proxies: list[LatencyProxy] = []

    def make(target_host: str, target_port: int, delay_ms: float = 0.0, jitter_ms: float = 0.0) -> LatencyProxy:
        proxy = LatencyProxy(target_host, target_port, delay_ms, jitter_ms=jitter_ms).start()
        proxies.append(proxy)
        return proxy

    yield make
    for proxy in proxies:
        proxy.stop()


@pytest.fixture(scope="session")
def servicebus_test_broker() -> Iterator[ServiceBusTestBroker]:
    """The Service Bus protocol-level test double (no emulator runs here; see tests/servicebus_broker)."""
    broker = ServiceBusTestBroker().start()
    try:
        yield broker
    finally:
        broker.stop()
