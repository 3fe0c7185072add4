"""Conformance target: Amazon SQS on moto's server mode (`sqs_server`, one per test session).

Each entity is a fresh queue with a unique name (`ordered=True`: a FIFO queue), so runs never share
messages. A short visibility timeout (2 s) makes a crashed consumer's messages come back quickly; the
adapter's heartbeat keeps live handlers' messages invisible meanwhile. A 1 s long poll keeps
`stop_consuming` quick.

FIFO queues are short-polled (`wait_seconds=0` in their URL) because of a moto quirk: its long poll
busy-loops while every visible message belongs to a group that is in flight -- the normal state of a
FIFO consumer -- and, moto running in this process, starves the event loop of the GIL until the
adapter's visibility heartbeat comes too late (docs/mapping-sqs.md, "moto").
"""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from tests.brokers import SqsServer, free_port, unique_name
from tests.conformance.targets import Entity, Target

__all__ = ["target_sqs"]

VISIBILITY_SECONDS = 2


@pytest.fixture
def target_sqs(sqs_server: SqsServer) -> Target:
    import boto3

    admin = boto3.client("sqs", **sqs_server.client_kwargs())
    endpoint = quote(sqs_server.endpoint_url, safe="")
    region = sqs_server.region

    def url(queue: str, endpoint: str = endpoint) -> str:
        return f"sqs://{queue}?region={region}&endpoint={endpoint}"

    async def new_entity(ordered: bool = False, **_: Any) -> Entity:
        name = unique_name("conf") + (".fifo" if ordered else "")
        attributes = {"FifoQueue": "true"} if ordered else {}
        admin.create_queue(QueueName=name, Attributes=attributes)
        source = url(name) + ("&wait_seconds=0" if ordered else "")
        return Entity(url(name), source)

    def missing_entity() -> Entity:
        name = unique_name("absent")
        return Entity(url(name), url(name))

    def unreachable_url() -> str:
        return url("anything", quote(f"http://127.0.0.1:{free_port()}", safe=""))

    options = {
        "aws_access_key_id": sqs_server.access_key,
        "aws_secret_access_key": sqs_server.secret_key,
        "visibility_timeout": VISIBILITY_SECONDS,
        "wait_seconds": 1,
        # moto's cost per message grows with the queue's depth (it rescans the queue on every send and
        # receive). Concurrent sends starve the consumer of the server's one GIL, the queue deepens and
        # everything slows down: 1000 events took ~20 s with 4 concurrent batches, ~3 s with 1.
        "send_concurrency": 1,
    }
    return Target("sqs", new_entity, missing_entity, unreachable_url, options=options,
                  redelivery_seconds=VISIBILITY_SECONDS + 1.0)
