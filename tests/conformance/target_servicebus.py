"""Conformance target: Azure Service Bus on the protocol-level test double (`tests/servicebus_broker`).

The double is not an emulator (see its module docstring): it speaks the subset of the Service Bus
AMQP protocol that the real azure-servicebus SDK uses, so the adapter's real client code paths run.
One double serves the whole test session; every entity is a fresh queue with a unique name
(`ordered=True`: a session-enabled queue, Service Bus's per-key order). A 2 s lock duration makes a
crashed consumer's messages come back quickly; the adapter's lock renewal keeps live handlers' locks.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.brokers import free_port, unique_name
from tests.conformance.targets import Entity, Target
from tests.servicebus_broker import ServiceBusTestBroker

__all__ = ["target_servicebus"]

LOCK_SECONDS = 2.0


@pytest.fixture
def target_servicebus(servicebus_test_broker: ServiceBusTestBroker) -> Target:
    broker = servicebus_test_broker

    def url(entity: str, namespace: str = broker.namespace) -> str:
        return f"servicebus://{namespace}/{entity}"

    async def new_entity(ordered: bool = False, **_: Any) -> Entity:
        name = unique_name("conf")
        broker.create_queue(name, requires_session=ordered, lock_duration=LOCK_SECONDS)
        return Entity(url(name), url(name))

    def missing_entity() -> Entity:
        name = unique_name("absent")
        return Entity(url(name), url(name))

    def unreachable_url() -> str:
        return url("anything", f"127.0.0.1:{free_port()}")

    # The adapter takes the namespace from the URL and only the key from the connection string, so
    # the one connection string also serves the unreachable namespace (which then fails to connect).
    options = {"connection_string": broker.connection_string}
    return Target("servicebus", new_entity, missing_entity, unreachable_url, options=options,
                  redelivery_seconds=LOCK_SECONDS + 1.0)
