"""Conformance target: Google Cloud Pub/Sub on Google's emulator (`pubsub://`).

Every entity is a fresh topic with a fresh subscription (BROKERS.md: reusing a subscription after a
cancelled StreamingPull can stall on the emulator; the adapter pulls with unary Pull anyway). The
subscriptions keep per-key order (`enable_message_ordering`) and have Pub/Sub's minimum ack deadline,
10 s, so a crashed consumer's messages come back within 10 s. The emulator's address travels in the
URL (`?emulator=HOST:PORT`) rather than `PUBSUB_EMULATOR_HOST`, so the unreachable URL can name another.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from tests.brokers import PubsubEmulator, free_port, unique_name
from tests.conformance.targets import Entity, Target

__all__ = ["target_pubsub"]

ACK_DEADLINE_SECONDS = 10  # Pub/Sub's minimum


@pytest.fixture
def target_pubsub(pubsub_emulator: PubsubEmulator) -> Iterator[Target]:
    host, project = pubsub_emulator.host, pubsub_emulator.project
    publisher = pubsub_emulator.publisher_client()
    subscriber = pubsub_emulator.subscriber_client()

    def create(topic: str, subscription: str) -> None:
        topic_path = publisher.topic_path(project, topic)
        publisher.create_topic(name=topic_path)
        subscriber.create_subscription(request={
            "name": subscriber.subscription_path(project, subscription),
            "topic": topic_path,
            "ack_deadline_seconds": ACK_DEADLINE_SECONDS,
            "enable_message_ordering": True,
        })

    async def new_entity(ordered: bool = False, **_: Any) -> Entity:
        topic, subscription = unique_name("conf"), unique_name("conf-sub")
        await asyncio.to_thread(create, topic, subscription)  # the admin clients are synchronous
        return Entity(f"pubsub://{project}/{topic}?emulator={host}",
                      f"pubsub://{project}/{topic}/{subscription}?emulator={host}")

    def missing_entity() -> Entity:
        topic = unique_name("absent")
        return Entity(f"pubsub://{project}/{topic}?emulator={host}",
                      f"pubsub://{project}/{topic}/{unique_name('absent-sub')}?emulator={host}")

    def unreachable_url() -> str:
        return f"pubsub://{project}/{unique_name('conf')}?emulator=127.0.0.1:{free_port()}"

    yield Target("pubsub", new_entity, missing_entity, unreachable_url, redelivery_seconds=ACK_DEADLINE_SECONDS)
    for client in (publisher, subscriber):
        with contextlib.suppress(Exception):
            client.transport.close()
