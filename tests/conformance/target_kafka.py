"""Conformance target: Kafka (`kafka://`) on the session's Tansu broker (`kafka_broker`)."""

from __future__ import annotations

import contextlib
from typing import Any

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.brokers import KAFKA_FAST_GROUP_OPTS, KafkaBroker, free_port, unique_name
from tests.conformance.targets import Entity, Target

__all__ = ["target_kafka"]

# Several partitions, so that per-key order is a property of the adapter (keys land on different
# partitions and are consumed concurrently), not an accident of a single log.
PARTITIONS = 4


async def create_topic(bootstrap: str, topic: str, partitions: int = PARTITIONS) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(topic, num_partitions=partitions, replication_factor=1)])
    finally:
        with contextlib.suppress(Exception):
            await admin.close()


@pytest.fixture
def target_kafka(kafka_broker: KafkaBroker) -> Target:
    bootstrap = kafka_broker.bootstrap

    async def new_entity(ordered: bool = False, **_: Any) -> Entity:
        topic = unique_name("conf")
        await create_topic(bootstrap, topic)
        # A fresh group per entity: committed offsets of other tests never apply.
        return Entity(f"kafka://{bootstrap}/{topic}", f"kafka://{bootstrap}/{topic}?group={unique_name('g')}")

    def missing_entity() -> Entity:
        topic = unique_name("absent")  # never created; the adapter must not auto-create it either
        return Entity(f"kafka://{bootstrap}/{topic}", f"kafka://{bootstrap}/{topic}?group={unique_name('g')}")

    def unreachable_url() -> str:
        return f"kafka://127.0.0.1:{free_port()}/{unique_name('down')}"  # nothing listens there

    # Tansu makes a group join wait half the session timeout: the fast settings join in ~1 s. The
    # same settings bound how long a crashed member holds its partitions (`redelivery_seconds`).
    return Target("kafka", new_entity, missing_entity, unreachable_url, options=dict(KAFKA_FAST_GROUP_OPTS),
                  redelivery_seconds=5.0)
