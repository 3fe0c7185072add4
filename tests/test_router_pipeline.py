"""The router in the data path: unroutable events are dead-lettered with the reason in the same durable
write, never sent elsewhere; delivery re-checks residency and reports ack latency to the estimator."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory, http_url
from umcef.adapters.contract import Capabilities, Handler, PublishOutcome, Rejected, Throttled, Transient
from umcef.adapters.local import LocalStore, Record
from umcef.fabric import config as config_mod
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC, DeadLetterQueue
from umcef.fabric.delivery import DeliveryWorker, spool_topic
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.gateway import Gateway, RoutedAdapter, build_router

BATCH = {"content-type": "application/cloudevents-batch+json"}

RESIDENT: dict[str, Any] = {
    "destinations": {"eu": {"url": "local://eu", "jurisdiction": "EU"},
                     "us": {"url": "local://us", "jurisdiction": "US"}},
    "residency": {"unmatched": "deny", "policies": [
        {"when": {"exact": {"dataregulation": "GDPR"}}, "allow": ["EU"]},
        {"when": {"exact": {"dataclassification": "public"}}, "allow": ["EU", "US"]}]},
    "routes": [{"name": "orders", "filter": {"prefix": {"type": "com.example.order."}}, "to": ["eu", "us"]},
               {"name": "eu-only", "filter": {"exact": {"subject": "eu"}}, "to": ["eu"]}],
}


def order(n: int, **extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"o-{n}", "source": "/shop", "type": "com.example.order.placed",
            "data": {"n": n}, **extra}


def stored(gateway: Gateway, topic: str) -> list[dict[str, Any]]:
    return [orjson.loads(e.payload) for e in gateway.store.read(topic, 0, 100_000)]


async def test_unroutable_events_are_dead_lettered_with_the_reason(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(**RESIDENT)
    batch = [
        order(1, dataregulation="GDPR"),  # EU only
        order(2, dataclassification="public"),  # both
        order(3),  # matches no policy: denied
        {**order(4, dataregulation="GDPR"), "type": "com.example.customer.created"},  # default has no jurisdiction
        order(5, subject="eu"),  # two routes, no policy: both denied
    ]
    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        response = await client.post("/v1/events", content=orjson.dumps(batch), headers=BATCH)
    assert response.status_code == 202, response.text
    assert [e["id"] for e in stored(gateway, "eu")] == ["o-1", "o-2"]
    assert [e["id"] for e in stored(gateway, "us")] == ["o-2"]
    assert stored(gateway, "default") == []
    dead = {e["id"]: e for e in stored(gateway, DEAD_LETTER_TOPIC)}
    assert sorted(dead) == ["o-3", "o-4", "o-5"]
    assert dead["o-3"]["fabricreason"] == ("route 'orders': the event matches no residency policy and unmatched "
                                          "events are denied")
    assert dead["o-4"]["fabricreason"] == ("no route matched (default destination): residency allows only EU "
                                          "(residency.policies[0]), and none of its destinations is there "
                                          "(default: none)")
    assert dead["o-3"]["fabricdest"] == "(router)" and dead["o-3"]["fabricattempts"] == 0
    assert dead["o-3"]["data"] == {"n": 3}
    assert "route 'orders'" in dead["o-5"]["fabricreason"] and "route 'eu-only'" in dead["o-5"]["fabricreason"]


async def test_partly_routable_events_go_where_allowed_and_a_copy_is_dead_lettered(
        make_gateway: GatewayFactory) -> None:
    config = {**RESIDENT, "residency": [{"when": {"exact": {"datacategory": "phi"}}, "allow": []}],
              "routes": [{"name": "all", "to": ["eu"]}, {"name": "us", "filter": {"exact": {"subject": "x"}},
                                                           "to": ["us"]}]}
    gateway = await make_gateway(**config)
    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        response = await client.post("/v1/events", content=orjson.dumps([order(1, subject="x", datacategory="phi"),
                                                                          order(2, subject="x")]), headers=BATCH)
    assert response.status_code == 202
    assert [e["id"] for e in stored(gateway, "eu")] == ["o-2"]
    assert [e["id"] for e in stored(gateway, "us")] == ["o-2"]
    dead = stored(gateway, DEAD_LETTER_TOPIC)
    assert [e["id"] for e in dead] == ["o-1"]
    assert "route 'all': residency allows no jurisdiction (residency[0])" in dead[0]["fabricreason"]
    assert "route 'us'" in dead[0]["fabricreason"]


class FakeAdapter:
    url = "fake://x"
    capabilities = Capabilities(1 << 20, None, False, False, 100, False)

    def __init__(self, errors: list[Any] | None = None) -> None:
        self.errors = errors or []
        self.published: list[str] = []

    def encoded_size(self, event: Event) -> int:
        return 0

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        self.published.extend(e.id for e in batch)
        error = self.errors.pop(0) if self.errors else None
        return [PublishOutcome(e.id, error) for e in batch]

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        raise NotImplementedError

    async def stop_consuming(self) -> None:
        pass

    async def probe(self) -> float:
        return 0.001

    async def close(self) -> None:
        pass


def remote_config() -> config_mod.Config:
    return config_mod.from_mapping({
        "destinations": {"eu": {"url": "kafka://eu:9092/t", "jurisdiction": "EU"},
                         "us": {"url": "kafka://us:9092/t", "jurisdiction": "US"}},
        "residency": [{"when": {"exact": {"dataregulation": "GDPR"}}, "allow": ["EU"]}],
        "routes": [{"name": "r", "to": ["eu", "us"]}],
        "router": {"estimator": {"eject_after_failures": 2}},
    }, "test")


def event(n: int, **extra: Any) -> Event:
    return Event({"specversion": "1.0", "id": f"e{n}", "source": "/s", "type": "t", **extra}, None)


async def test_delivery_rechecks_residency_and_reports_latency() -> None:
    router = build_router(remote_config())
    inner = FakeAdapter()
    adapter = RoutedAdapter(inner, "us", router)
    outcomes = await adapter.publish([event(1), event(2, dataregulation="GDPR"), event(3)])
    assert [o.event_id for o in outcomes] == ["e1", "e2", "e3"]
    assert outcomes[0].ok and outcomes[2].ok
    error = outcomes[1].error
    assert isinstance(error, Rejected) and str(error).startswith("residency: us (jurisdiction US) is not allowed")
    assert inner.published == ["e1", "e3"]  # the GDPR event never reached the broker
    # A delivery proves the destination alive (it clears the failure count: two failures eject here,
    # but not with a delivery between them); it never moves the RTT (a slow one asks for an early probe).
    est = router.estimator
    est.failure("us", "down")
    await adapter.publish([event(4)])
    est.failure("us", "down")
    assert est.up[est.slot("us")] == 1


async def test_delivery_failures_eject_but_rejections_and_throttling_do_not() -> None:
    router = build_router(remote_config())
    inner = FakeAdapter([Rejected("too big"), Throttled("slow down"), Rejected("too big"), Transient("down"),
                         Transient("down")])
    adapter = RoutedAdapter(inner, "eu", router)
    est = router.estimator
    for i in range(3):
        await adapter.publish([event(i)])
    assert est.up[est.slot("eu")] == 1
    await adapter.publish([event(3)])
    await adapter.publish([event(4)])
    assert est.up[est.slot("eu")] == 0 and "Transient: down" in est.describe_down(est.slot("eu"))


async def test_worker_dead_letters_a_spooled_event_residency_now_forbids(tmp_path: Path) -> None:
    store = LocalStore(tmp_path)
    try:
        router = build_router(remote_config())
        inner = FakeAdapter()
        dead_letters = DeadLetterQueue(store)
        worker = DeliveryWorker("us", RoutedAdapter(inner, "us", router), store, dead_letters)
        await store.append([Record(spool_topic("us"), json_format.encode(e), e.id)
                            for e in (event(1), event(2, dataregulation="GDPR"))])
        task = asyncio.create_task(worker.run())
        for _ in range(500):  # poll with a deadline
            if worker.delivered == 1 and dead_letters.count == 1:
                break
            await asyncio.sleep(0.01)
        await worker.stop()
        await task
        assert inner.published == ["e1"]
        (dead,) = [orjson.loads(s.payload) for s in store.read(DEAD_LETTER_TOPIC, 0, 10)]
        assert dead["id"] == "e2" and dead["fabricreason"].startswith("Rejected: residency: us (jurisdiction US)")
    finally:
        store.close()


@pytest.mark.parametrize("mode", ["best", "failover", "split"])
def test_gateway_router_pins_local_destinations(mode: str) -> None:
    cfg = config_mod.from_mapping({"destinations": {"a": "local://a", "b": {"url": "kafka://b:1/t"}},
                                   "routes": [{"name": "r", "to": ["b", "a"], "mode": mode}]}, "test")
    router = build_router(cfg)
    est = router.estimator
    assert est.rtt_ms[est.slot("a")] == 0.0 and est.rtt_ms[est.slot("b")] == 50.0
    if mode == "best":
        assert router.decide(event(1), now=0).destinations == ("a",)
