"""Delivery in its own process (`delivery.process: true`, fabric/delivery_process.py), against a real Kafka
(Tansu): the child delivers what the gateway spools, its health reaches the gateway's router, what it
drains reaches backpressure, and a child that dies is replaced without losing anything.

The chaos tests run in this mode too (a: SIGKILL of the gateway, b: broker outage and 429s, e: ejection
and failover), parametrized `delivery-process`.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import httpx
import orjson
import pytest

from tests.brokers import closed_port, eventually, unique_name
from tests.chaos._kafka import TopicReader
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory, http_url
from tests.test_failover import UNREACHABLE_OPTIONS
from umcef.adapters.local import Committed, Record
from umcef.fabric.config import ConfigError, from_mapping
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC
from umcef.fabric.delivery import spool_topic
from umcef.fabric.delivery_process import DeliveryProcess, Report
from umcef.fabric.gateway import Gateway

SOURCE = "/test/delivery-process"


def batch(tag: str, n: int) -> bytes:
    return orjson.dumps([{"specversion": "1.0", "id": f"{tag}-{i}", "source": SOURCE, "type": "t.dp",
                          "partitionkey": f"k{i % 4}", "data": {"i": i}} for i in range(n)])


async def post(gateway: Gateway, body: bytes) -> None:
    async with httpx.AsyncClient(base_url=http_url(gateway), timeout=30) as client:
        response = await client.post("/v1/events", content=body,
                                     headers={"content-type": "application/cloudevents-batch+json"})
    assert response.status_code == 202, response.text


async def kafka_gateway_with_child(make_gateway: GatewayFactory, kafka_broker: Any) -> tuple[Gateway, str]:
    """A gateway delivering to a new Kafka topic (destination `k`) from its delivery process."""
    topic = unique_name("dp")
    await create_topic(kafka_broker.bootstrap, topic, partitions=2)
    gateway = await make_gateway(destinations={"k": f"kafka://{kafka_broker.bootstrap}/{topic}"}, default="k",
                                 delivery={"process": True})
    return gateway, topic


async def test_child_delivers_reports_drained_and_is_replaced_when_it_dies(
        make_gateway: GatewayFactory, kafka_broker: Any) -> None:
    gateway, topic = await kafka_gateway_with_child(make_gateway, kafka_broker)
    child = gateway.delivery_process
    assert child is not None and child.pid is not None and child.pid != os.getpid()
    assert not gateway.workers, "no delivery worker runs in the gateway's own process"
    first = child.pid

    async with TopicReader(kafka_broker.bootstrap, topic) as reader:
        await post(gateway, batch("a", 200))
        await reader.until(lambda: len(reader.keys()) >= 200, 30, "the first 200 events in Kafka")
        # What left the spool reaches the gateway's backpressure counters through the child's reports.
        await eventually(lambda: gateway._drained() >= 200 and gateway._lane_drained("k") >= 200, 10, "drained report")
        assert gateway.spool_gauge.depth == 0

        os.kill(first, signal.SIGKILL)
        await eventually(lambda: child.pid != first, 20, "a replacement delivery process")
        await post(gateway, batch("b", 200))
        await reader.until(lambda: len(reader.keys()) >= 400, 30, "the next 200 events in Kafka")
        await eventually(lambda: gateway._drained() >= 400, 10, "drained counted across the restart")
    assert reader.keys() == {(SOURCE, f"{tag}-{i}") for tag in "ab" for i in range(200)}


async def test_once_caught_up_the_child_takes_the_gateways_commits_from_memory(
        make_gateway: GatewayFactory, kafka_broker: Any) -> None:
    gateway, topic = await kafka_gateway_with_child(make_gateway, kafka_broker)
    child = gateway.delivery_process
    assert child is not None
    async with TopicReader(kafka_broker.bootstrap, topic) as reader:
        await post(gateway, batch("r0", 20))  # relayed as a gap alone: the child's feed has not reported yet
        await reader.until(lambda: len(reader.records) >= 20, 30, "request 0 in Kafka")
        for n in range(1, 6):  # the next ones once the child says its feed keeps up: relayed, from memory
            await eventually(lambda: spool_topic("k") in child._caught_up, 10, "the child's feed caught up")
            await post(gateway, batch(f"r{n}", 20))
            await reader.until(lambda n=n: len(reader.records) >= 20 * (n + 1), 30, f"request {n} in Kafka")
        # (>= 80 of 100: the feed's look for other writers' appends, every 0.5 s while memory is empty, may
        # fall between a commit and its relayed frame and read that request from the store instead)
        await eventually(lambda: child.from_memory >= 80, 10, "the child's report of events taken from memory")
        await reader.poll(500)  # (a repeated event would be there by now)
    assert sorted((r.ce_source, r.ce_id) for r in reader.records) == \
        sorted((SOURCE, f"r{n}-{i}") for n in range(6) for i in range(20))  # each once: none repeated


async def test_ejection_in_the_child_reaches_the_gateways_router(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        destinations={"dead": f"kafka://127.0.0.1:{closed_port()}/t"}, default="dead",
        router={"estimator": {"probe_interval_seconds": 0.2, "probe_timeout_seconds": 0.5,
                              "eject_after_failures": 2, "ejection_seconds": 30}},
        delivery={"process": True})
    estimator = gateway.router.estimator
    slot = estimator.slot("dead")
    assert estimator.up[slot] == 1
    # The gateway runs no probes of its own: only the child's reports can take the destination down here.
    await eventually(lambda: estimator.up[slot] == 0, 20, "the gateway's router to see the ejection")
    assert "ejected" in estimator.describe_down(slot)


async def test_retention_runs_in_the_gateway_not_in_the_delivery_child(make_gateway: GatewayFactory) -> None:
    # A store applies its retention as soon as it is opened (then every minute). Events stored after the
    # gateway's own pass are therefore trimmed by a freshly started child only if the child retains too.
    gateway = await make_gateway(
        destinations={"orders": "local://orders",
                      "dead": {"url": f"kafka://127.0.0.1:{closed_port()}/t", "options": UNREACHABLE_OPTIONS,
                               "delivery": {"max_attempts": 1}}},
        routes=[{"name": "dead", "filter": {"exact": {"subject": "dead"}}, "to": ["dead"]}], default="orders",
        store={"max_events_per_topic": 5}, router={"estimator": {"eject_after_failures": 1000}},
        delivery={"process": True})
    child = gateway.delivery_process
    assert child is not None and child.pid is not None
    await post(gateway, batch("kept", 20))
    assert len(gateway.store.read("orders", 0, 100)) == 20

    first = child.pid
    os.kill(first, signal.SIGKILL)  # its replacement opens the store (and would retain) after those 20
    await eventually(lambda: child.pid != first, 20, "a replacement delivery process")
    # The new child's store is up and writing once it dead-letters an event it cannot deliver: its writer
    # applies retention at its first idle moment after opening, before this dead letter (a failed connect).
    dead = orjson.loads(batch("dead", 1))
    await post(gateway, orjson.dumps([{**dead[0], "subject": "dead"}]))
    await eventually(lambda: bool(gateway.store.read(DEAD_LETTER_TOPIC, 0, 1)), 20, "the new child's dead letter")
    assert len(gateway.store.read("orders", 0, 100)) == 20, "the delivery child applied retention"


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_process_must_be_a_boolean(tmp_path: Any, value: Any) -> None:
    raw: dict[str, Any] = {"data_dir": str(tmp_path), "delivery": {"process": value}}
    with pytest.raises(ConfigError, match=r"delivery\.process"):
        from_mapping(raw)


class _Sent:
    """Stands in for the relay's sender: what `DeliveryProcess` chose to relay (unit test, no pipe)."""

    def __init__(self) -> None:
        self.frames: list[tuple[str, list[int], bool]] = []

    def send(self, topic: str, committed: list[Committed], gap: bool) -> None:
        self.frames.append((topic, [seq for seq, _, _ in committed], gap))


class _Mirror:
    def mirror(self, health: object) -> None:
        pass


def test_a_spool_is_relayed_only_while_the_childs_feed_is_caught_up_and_else_only_said_to_have_more() -> None:
    config = from_mapping({"destinations": {"k": "kafka://127.0.0.1:1/t"}, "default": "k"})
    parent = DeliveryProcess(config, None, _Mirror(), lambda moved: None)  # type: ignore[arg-type]
    sent = parent._sender = _Sent()  # type: ignore[assignment]

    def commit(seq: int) -> None:
        parent._committed("_spool.k", [(seq, 0.0, Record("_spool.k", b"{}"))], False)

    def report(live: list[str]) -> None:
        parent._handle(("report", Report([], 0, {}, {}, {}, live, 0)))

    commit(1)  # the child has not said its feed is caught up: it reads the store
    report(["_spool.k"])
    commit(2)
    report([])
    commit(3)
    assert sent.frames == [("_spool.k", [], True), ("_spool.k", [2], False), ("_spool.k", [], True)]
