"""Backpressure: the undelivered spool depth has high watermarks (global and per destination, events and
bytes); above them ingress answers 429 + Retry-After, low priority first."""

from __future__ import annotations

import asyncio
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc
import httpx
import orjson
import pytest

from tests.brokers import KafkaBroker, SqsServer, closed_port, eventually, unique_name
from tests.conformance.target_kafka import create_topic
from tests.conftest import GatewayFactory, http_url
from umcef.adapters.local import LocalStore, Record, Retention
from umcef.fabric import config as config_mod
from umcef.fabric.backpressure import HIGH, LOW, NORMAL, Lane, SpoolGauge
from umcef.fabric.config import SpoolLimit
from umcef.fabric.dedup import DedupWindow
from umcef.fabric.delivery import CURSOR_GROUP, spool_topic
from umcef.fabric.event import Event
from umcef.fabric.gateway import TRIM_DELIVERED, Gateway
from umcef.fabric.grpc_client import AsyncGrpcGatewayClient, GrpcOverloaded
from umcef.fabric.limits import NO_LIMITS
from umcef.fabric.pipeline import Overloaded, Pipeline
from umcef.fabric.sdk import AsyncPublisher

HEADERS = {"content-type": "application/cloudevents-batch+json"}


def batch(start: int, n: int) -> bytes:
    return orjson.dumps([{"specversion": "1.0", "id": str(i), "source": "/bp", "type": "t"}
                         for i in range(start, start + n)])


def lane_gauge(max_events: int | None = None, max_bytes: int | None = None, **kw: Any) -> tuple[SpoolGauge, list[int]]:
    drained = [0]
    gauge = SpoolGauge(None, 2.0, **kw)
    gauge.lane(Lane("eu", max_events, max_bytes, lambda: drained[0]), "_deadletter")
    return gauge, drained


def test_reservations_count_until_commit_and_an_empty_spool_takes_any_batch() -> None:
    gauge, drained = lane_gauge(100)
    big = gauge.demand([("eu",)] * 500, [HIGH] * 500)
    assert gauge.reserve(big) is None  # empty spool, nothing reserved: an oversized batch still passes
    gauge.release(big)
    first = gauge.demand([("eu",), ("local",)] * 90, [HIGH] * 180)  # local destinations do not count
    assert gauge.reserve(first) is None
    ten, eleven = gauge.demand([("eu",)] * 10, [HIGH] * 10), gauge.demand([("eu",)] * 11, [HIGH] * 11)
    assert "'eu': 0 events wait in the delivery spool (90 more being written)" in (gauge.reserve(eleven) or "")
    gauge.commit(first, first)
    assert gauge.lanes["eu"].depth == 90 and gauge.lanes["eu"].reserved == 0
    assert gauge.reserve(ten) is None and gauge.lanes["eu"].reserved == 10
    gauge.release(ten)
    drained[0] = 50
    assert gauge.lanes["eu"].depth == 40 and gauge.reserve(gauge.demand([("eu",)] * 60, [HIGH] * 60)) is None
    drained[0] = 500  # drained what another process (dlq replay) spooled: never negative
    assert gauge.lanes["eu"].depth == 0
    assert gauge.lanes["_deadletter"] is gauge.lanes["eu"]  # router refusals spooled to eu count there


def test_appends_by_other_processes_are_what_the_store_gained_beyond_what_this_one_was_told() -> None:
    dead_letters_in = [0]
    gauge = SpoolGauge(100)
    lane = gauge.lane(Lane("eu", 50, drained=lambda: 0, spooled_in=lambda: dead_letters_in[0]))
    lane.add(5)  # the depth found at start ...
    lane.baseline(appended=12)  # ... of a spool whose appended counter reads 12 (7 of those delivered before)
    demand = gauge.demand([("eu",)] * 10, [NORMAL] * 10)
    assert gauge.reserve(demand) is None
    gauge.commit(demand, demand)
    gauge.add(10)  # the spool step's own report
    gauge.add({"eu": 2})  # failover moved two in
    dead_letters_in[0] = 3  # another destination's worker dead-lettered three into it
    gauge.reconcile({lane: 12 + 10 + 2 + 3})
    assert (lane.foreign, lane.depth) == (0, 5 + 10 + 2)  # (dead letters in: `drained` is net of them)
    gauge.reconcile({lane: 12 + 10 + 2 + 3 + 8})  # `umcef dlq replay` spooled eight
    assert (lane.foreign, lane.depth, gauge.foreign) == (8, 5 + 10 + 2 + 8, 8)
    gauge.reconcile({lane: 12 + 10 + 2 + 3 + 8 + 4})  # a batch committed to the store, not yet to the gauge
    assert (lane.foreign, gauge.foreign) == (12, 12)
    lane.add(4)  # committed: the next look corrects the count, nothing drifts
    gauge.reconcile({lane: 12 + 10 + 2 + 3 + 8 + 4})
    assert (lane.foreign, gauge.foreign) == (8, 8)
    gauge.reconcile({lane: 0})  # a counter behind what this process counted itself: never below zero
    assert lane.foreign == 0


def test_a_batch_in_the_store_before_its_reservation_is_committed_is_not_counted_twice() -> None:
    # The writer committed the batch and bumped the counter; the pipeline has not resumed to commit its
    # reservation yet. A look in between must see it as this process's own (it is in `reserved`).
    gauge = SpoolGauge(100)
    lane = gauge.lane(Lane("eu", 50, drained=lambda: 0))
    lane.baseline(appended=0)
    demand = gauge.demand([("eu",)] * 40, [NORMAL] * 40)
    assert gauge.reserve(demand) is None
    gauge.reconcile({lane: 40})
    assert (lane.foreign, lane.depth + lane.reserved) == (0, 40)
    gauge.commit(demand, demand)
    gauge.reconcile({lane: 40})
    assert (lane.foreign, lane.depth, lane.reserved) == (0, 40, 0)


def test_low_priority_is_shed_first() -> None:
    gauge, _ = lane_gauge(100, shed_low_at=0.5, shed_normal_at=0.8)
    forty = gauge.demand([("eu",)] * 40, [HIGH] * 40)
    assert gauge.reserve(forty) is None
    gauge.commit(forty, forty)
    assert gauge.reserve(gauge.demand([("eu",)] * 10, [LOW] * 10)) is None  # 50: not above 0.5 x 100
    gauge.release(gauge.demand([("eu",)] * 10, [LOW] * 10))
    why = gauge.reserve(gauge.demand([("eu",)] * 11, [LOW] * 11))
    assert why == ("destination 'eu': 40 events wait in the delivery spool (0 more being written); 11 more would "
                   "exceed 50 (low priority is shed at 0.5 x watermark 100)")
    # A batch is all or nothing: its lowest class decides.
    assert gauge.reserve(gauge.demand([("eu",)] * 11, [HIGH] * 10 + [LOW])) is not None
    assert gauge.reserve(gauge.demand([("eu",)] * 41, [NORMAL] * 41)) is not None
    assert gauge.reserve(gauge.demand([("eu",)] * 60, [HIGH] * 60)) is None


def test_spool_bytes_follow_the_drain_in_order() -> None:
    gauge, drained = lane_gauge(max_bytes=1000)
    lane = gauge.lanes["eu"]
    for sizes in ([100, 100], [300], [10, 20, 30, 40]):  # three appends
        demand = gauge.demand([("eu",)] * len(sizes), [NORMAL] * len(sizes), sizes)
        assert gauge.reserve(demand) is None
        gauge.commit(demand, demand)
    assert (lane.depth, lane.depth_bytes) == (7, 600)
    drained[0] = 2
    assert lane.depth_bytes == 400  # the first append left: its 200 bytes
    drained[0] = 3
    assert lane.depth_bytes == 100
    drained[0] = 5
    assert lane.depth_bytes == 50  # half of the last append, interpolated: 100 - 100 x 2/4
    lane.add(2)  # moved in by failover, sizes unknown: the mean size so far (600 / 7)
    assert (lane.depth, lane.depth_bytes) == (4, 50 + 2 * 600 // 7)
    assert gauge.reserve(gauge.demand([("eu",)], [NORMAL], [900])) is not None  # 221 + 900 > 1000


def test_backpressure_config() -> None:
    cfg = config_mod.from_mapping({
        "backpressure": {"max_spooled_events": 10, "retry_after_seconds": 3, "max_spooled_bytes": 5000,
                         "shed_low_at": 0.25, "shed_normal_at": 1, "max_in_flight_bytes": None},
        "destinations": {"eu": {"url": "kafka://127.0.0.1:9092/o", "max_spooled_events": 7},
                         "us": {"url": "sqs://o", "max_spooled_bytes": 900, "delivery": {"max_attempts": 3}},
                         "orders": "local://orders"},
        "routes": [{"name": "vip", "to": ["eu"], "priority_class": "high", "priority": 3},
                   {"to": ["us"], "priority_class": "low"}],
    })
    bp = cfg.backpressure
    assert (bp.max_spooled_events, bp.max_spooled_bytes, bp.retry_after_seconds) == (10, 5000, 3.0)
    assert (bp.shed_low_at, bp.shed_normal_at, bp.max_in_flight_bytes) == (0.25, 1.0, None)
    assert bp.destinations == {"eu": SpoolLimit(7, None), "us": SpoolLimit(None, 900)}
    assert bp.route_classes == {"vip": "high", "route1": "low"}
    assert cfg.routes[0].priority == 3  # the route ordering key is untouched
    # Bounded unless told otherwise, with headroom for high priority; null lifts the bound.
    default = config_mod.from_mapping({}).backpressure
    assert (default.max_spooled_events, default.shed_low_at, default.shed_normal_at) == (1_000_000, 0.5, 0.9)
    assert default.max_in_flight_bytes == 256 * 1024 * 1024
    assert config_mod.from_mapping({"backpressure": {"max_spooled_events": None}}).backpressure.max_spooled_events \
        is None
    # A shed_low_at above the default shed_normal_at, set alone (valid before that default was 0.9), still loads.
    alone = config_mod.from_mapping({"backpressure": {"shed_low_at": 0.95}}).backpressure
    assert (alone.shed_low_at, alone.shed_normal_at) == (0.95, 0.95)


@pytest.mark.parametrize(("raw", "message"), [
    ({"backpressure": {"max_spooled_events": 0}},
     "backpressure.max_spooled_events: expected an integer at least 1, got 0"),
    ({"backpressure": {"retry": 1}}, "backpressure.retry: unknown key; expected one of max_spooled_events, "
     "max_spooled_bytes, retry_after_seconds, shed_low_at, shed_normal_at, max_in_flight_bytes"),
    ({"backpressure": {"shed_normal_at": 1.5}},
     "backpressure.shed_normal_at: expected a fraction above 0 and at most 1, got 1.5"),
    ({"backpressure": {"shed_low_at": 0.9, "shed_normal_at": 0.75}},
     "backpressure.shed_low_at: expected a fraction above 0 and at most shed_normal_at (0.75), got 0.9"),
    ({"backpressure": {"shed_low_at": 0}},
     "backpressure.shed_low_at: expected a fraction above 0 and at most shed_normal_at (0.9), got 0"),
    ({"destinations": {"eu": {"url": "kafka://h:1/t", "max_spooled_bytes": "1MB"}}},
     "destinations.eu.max_spooled_bytes: expected an integer, got a string '1MB'"),
    ({"destinations": {"o": {"url": "local://o", "max_spooled_events": 5}}},
     "destinations.o.max_spooled_events: only for remote destinations: a local:// destination has no delivery "
     "spool (the durable write is the delivery)"),
    ({"routes": [{"name": "r", "to": ["default"], "priority_class": "urgent"}]},
     "routes[0].priority_class: expected one of low, normal, high, got 'urgent'"),
])
def test_backpressure_config_mistakes_are_exact(raw: dict[str, Any], message: str) -> None:
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.from_mapping(raw, "t")
    assert str(info.value) == f"t: {message}"


async def fill_until_429(gateway: Gateway, per_request: int = 7) -> tuple[int, httpx.Response]:
    accepted = 0
    async with httpx.AsyncClient() as client:
        for start in range(0, 10_000, per_request):
            answer = await client.post(http_url(gateway) + "/v1/events", content=batch(start, per_request),
                                       headers=HEADERS)
            if answer.status_code != 202:
                return accepted, answer
            accepted += len(answer.json()["accepted"])
    raise AssertionError("never refused")


async def test_down_destination_fills_the_spool_to_the_watermark_then_429(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        destinations={"eu": {"url": f"kafka://127.0.0.1:{closed_port()}/orders", "max_spooled_events": 100}},
        default="eu", backpressure={"retry_after_seconds": 3})
    accepted, refused = await fill_until_429(gateway)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "3"
    assert refused.headers["content-type"].startswith("application/problem+json")
    # By default normal priority stops at nine tenths of the watermark (high keeps the last tenth).
    assert refused.json()["detail"] == ("destination 'eu': 84 events wait in the delivery spool (0 more being "
                                        "written); 7 more would exceed 90 (normal priority is shed at 0.9 x "
                                        "watermark 100)")
    assert accepted == 84  # 12 requests of 7; the 13th would have taken the depth to 91
    # Nothing accepted is lost: every 202'd event is in the spool, and nothing else is.
    spooled = [orjson.loads(s.payload)["id"] for s in gateway.store.read(spool_topic("eu"), 0, 1000)]
    assert sorted(spooled, key=int) == [str(i) for i in range(accepted)]
    assert gateway.workers["eu"].delivered == 0
    assert (await post(gateway, events(1000, 7, priorityclass="high"))).status_code == 202  # 91 <= 100


async def test_restart_counts_the_spool_left_by_the_previous_run(make_gateway: GatewayFactory,
                                                                 tmp_path: Path) -> None:
    url = f"kafka://127.0.0.1:{closed_port()}/orders"
    limits = {"max_spooled_events": 50, "shed_normal_at": 1}
    first = await make_gateway(destinations={"eu": url}, default="eu", backpressure=limits)
    accepted, _ = await fill_until_429(first, per_request=10)
    assert accepted == 50
    await first.stop()
    config = config_mod.from_mapping({"data_dir": str(first.config.data_dir), "server": {"port": 0, "grpc_port": 0},
                                      "destinations": {"eu": url}, "default": "eu",
                                      "backpressure": limits}, "test")
    second = Gateway(config)
    await second.start()
    try:
        assert second.spool_gauge.depth == 50 and second.spool_gauge.lanes["eu"].depth == 50
        async with httpx.AsyncClient() as client:
            answer = await client.post(http_url(second) + "/v1/events", content=batch(1000, 1), headers=HEADERS)
        assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
    finally:
        await second.stop()


def events(start: int, n: int, kind: str = "t", **ext: Any) -> bytes:
    return orjson.dumps([{"specversion": "1.0", "id": str(i), "source": "/bp", "type": kind, **ext}
                         for i in range(start, start + n)])


async def post(gateway: Gateway, body: bytes) -> httpx.Response:
    async with httpx.AsyncClient() as client:
        return await client.post(http_url(gateway) + "/v1/events", content=body, headers=HEADERS)


async def test_a_dead_destination_does_not_refuse_a_healthy_ones_events(make_gateway: GatewayFactory,
                                                                       sqs_server: SqsServer) -> None:
    import boto3

    queue = unique_name("bp")
    boto3.client("sqs", **sqs_server.client_kwargs()).create_queue(QueueName=queue)
    options = {"aws_access_key_id": sqs_server.access_key, "aws_secret_access_key": sqs_server.secret_key,
               "region_name": sqs_server.region, "endpoint_url": sqs_server.endpoint_url}
    gateway = await make_gateway(
        destinations={"eu": {"url": f"kafka://127.0.0.1:{closed_port()}/orders", "max_spooled_events": 20},
                      "us": {"url": f"sqs://{queue}", "options": options, "max_spooled_events": 1000}},
        routes=[{"name": "orders", "filter": {"prefix": {"type": "order."}}, "to": ["eu"]},
                {"name": "audit", "filter": {"prefix": {"type": "audit."}}, "to": ["us"]}])
    n = 0
    while (answer := await post(gateway, events(n, 7, "order.placed"))).status_code == 202:
        n += 7
    assert n == 14 and answer.status_code == 429  # 21 > 20
    assert answer.json()["detail"].startswith("destination 'eu': 14 events wait")
    for start in range(1000, 1100, 10):  # 100 events for the healthy destination: more than eu's watermark
        assert (await post(gateway, events(start, 10, "audit.logged"))).status_code == 202
    # Events for eu in a batch refuse the batch (all or nothing), and nothing of it is stored.
    mixed = orjson.dumps([*orjson.loads(events(2000, 3, "audit.logged")), *orjson.loads(events(2003, 7, "order.x"))])
    refused = await post(gateway, mixed)
    assert refused.status_code == 429 and "destination 'eu'" in refused.json()["detail"]
    # us delivers (and trims what it delivered): its appended counter says what its spool ever took.
    spooled = [orjson.loads(s.payload)["id"] for s in gateway.store.read(spool_topic("us"), 0, 1000)]
    assert set(spooled) <= {str(i) for i in range(1000, 1100)}
    assert gateway.store.appended()[spool_topic("us")] == 100
    assert gateway.spool_gauge.lanes["eu"].depth == 14


async def test_low_priority_is_shed_while_high_keeps_flowing(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        destinations={"eu": {"url": f"kafka://127.0.0.1:{closed_port()}/orders", "max_spooled_events": 100}},
        default="eu", backpressure={"shed_low_at": 0.5, "shed_normal_at": 0.8},
        routes=[{"name": "vip", "filter": {"prefix": {"type": "vip."}}, "to": ["eu"], "priority_class": "high"}])
    n = 0
    while (await post(gateway, events(n, 10, priorityclass="low"))).status_code == 202:
        n += 10
    assert n == 50  # low: refused above 50
    assert (await post(gateway, events(n, 10))).status_code == 202  # normal still flows up to 80
    n += 10
    # High by its extension, or by its route's priority_class (no extension), up to the watermark itself.
    for kind, ext in (("t", {"priorityclass": "high"}), ("vip.order", {})) * 2:
        assert (await post(gateway, events(n, 10, kind, **ext))).status_code == 202
        n += 10
    assert n == 100
    assert (await post(gateway, events(n, 1, priorityclass="high"))).status_code == 429
    # The extension wins over the route's class: a low vip event is shed.
    low_vip = await post(gateway, events(n, 1, "vip.x", priorityclass="low"))
    assert "low priority is shed at 0.5 x watermark 100" in low_vip.json()["detail"]
    assert len(gateway.store.read(spool_topic("eu"), 0, 1000)) == 100


async def test_a_resent_accepted_batch_gets_its_first_answer_above_the_watermark(
        make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        destinations={"eu": {"url": f"kafka://127.0.0.1:{closed_port()}/orders", "max_spooled_events": 20}},
        default="eu", backpressure={"shed_normal_at": 1})
    ids = [str(i) for i in range(10)]
    assert (await post(gateway, events(0, 10))).json() == {"accepted": ids, "duplicates": []}
    assert (await post(gateway, events(10, 10))).status_code == 202
    assert (await post(gateway, events(20, 1))).status_code == 429  # the spool is full
    # A client retrying a batch whose 202 it never saw: accepted before, so the same answer, not a 429.
    again = await post(gateway, events(0, 10))
    assert again.status_code == 202 and again.json() == {"accepted": ids, "duplicates": ids}
    # One new event among them: the batch is refused as a whole, and the new event's claim goes back.
    mixed = await post(gateway, events(15, 6))
    assert mixed.status_code == 429 and "20 events wait" in mixed.json()["detail"]
    assert len(gateway.store.read(spool_topic("eu"), 0, 100)) == 20
    dedup = gateway.pipeline.dedup
    assert await dedup.claim_batch([("/bp", "20"), ("/bp", "19")]) == [True, False]
    await dedup.release_batch([("/bp", "20")])


async def test_request_bytes_are_held_before_the_body_is_read(make_gateway: GatewayFactory) -> None:
    """Many large bodies at once are refused from their headers, not buffered first: a request whose body
    is still arriving holds its Content-Length against max_in_flight_bytes."""
    gateway = await make_gateway(backpressure={"max_in_flight_bytes": 1000})
    alone = events(200, 20)
    assert len(alone) > 1000
    assert (await post(gateway, alone)).status_code == 202  # an idle gateway takes any request
    body = events(0, 12)
    assert 500 < len(body) <= 1000

    async def send_head(length: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.endpoints.http_port)
        writer.write(f"POST /v1/events HTTP/1.1\r\nHost: t\r\ncontent-type: {HEADERS['content-type']}\r\n"
                     f"content-length: {length}\r\n\r\n".encode())
        await writer.drain()
        return reader, writer

    async def status(reader: asyncio.StreamReader) -> int:
        line = await asyncio.wait_for(reader.readline(), 10)
        return int(line.split()[1])

    slow_reader, slow = await send_head(len(body))
    slow.write(body[:100])  # the rest comes later: the gateway is reading this body
    await slow.drain()
    await eventually(lambda: gateway.pipeline.in_flight_bytes == len(body))
    big_reader, big = await send_head(len(body))  # no body sent: only its length can refuse it
    assert await status(big_reader) == 429
    small = events(100, 1)
    small_reader, small_writer = await send_head(len(small))  # fits beside the slow one
    small_writer.write(small)
    assert await status(small_reader) == 202
    slow.write(body[100:])
    assert await status(slow_reader) == 202
    for writer in (slow, big, small_writer):
        writer.close()
    assert gateway.pipeline.in_flight_bytes == 0
    assert sorted(orjson.loads(r.payload)["id"] for r in gateway.store.read("default", 0, 100)) == \
        sorted([*(str(i) for i in range(12)), "100", *(str(i) for i in range(200, 220))])


async def test_a_body_that_stalls_is_answered_408_and_lets_its_bytes_go(make_gateway: GatewayFactory,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    from umcef.fabric.ingress import http_server

    monkeypatch.setattr(http_server, "BODY_READ_SECONDS", 0.5)
    gateway = await make_gateway(backpressure={"max_in_flight_bytes": 1000})
    reader, writer = await asyncio.open_connection("127.0.0.1", gateway.endpoints.http_port)
    writer.write(f"POST /v1/events HTTP/1.1\r\nHost: t\r\ncontent-type: {HEADERS['content-type']}\r\n"
                 "content-length: 900\r\n\r\n".encode())  # ... and no body
    await writer.drain()
    await eventually(lambda: gateway.pipeline.in_flight_bytes == 900)
    line = await asyncio.wait_for(reader.readline(), 10)
    assert int(line.split()[1]) == 408
    writer.close()
    assert gateway.pipeline.in_flight_bytes == 0
    assert (await post(gateway, events(0, 12))).status_code == 202  # its 900 bytes no longer count


async def test_an_invalid_priority_class_is_a_422_naming_the_attribute(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway()
    ok = {"specversion": "1.0", "id": "a", "source": "/bp", "type": "t"}
    answer = await post(gateway, orjson.dumps([ok, ok, {**ok, "id": "b", "priorityclass": "urgent"}]))
    assert answer.status_code == 422
    body = answer.json()
    assert (body["attribute"], body["index"]) == ("priorityclass", 2)  # its index in the request
    assert body["detail"] == "event[2]: attribute 'priorityclass': expected one of low, normal, high, got 'urgent'"
    assert gateway.store.read("default", 0, 10) == []  # all or nothing


async def test_the_bytes_watermark_bounds_the_encoded_spool(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        destinations={"eu": {"url": f"kafka://127.0.0.1:{closed_port()}/orders", "max_spooled_bytes": 20_000}},
        default="eu")
    n = 0
    while (answer := await post(gateway, events(n, 3, priorityclass="high", note="x" * (n % 7) * 100))).status_code \
            == 202:
        n += 3
    spooled = sum(len(s.payload) for s in gateway.store.read(spool_topic("eu"), 0, 10_000))
    refused = sum(len(orjson.dumps(e)) for e in orjson.loads(events(n, 3, priorityclass="high",
                                                                     note="x" * (n % 7) * 100)))
    assert spooled <= 20_000 < spooled + refused
    assert answer.json()["detail"] == (f"destination 'eu': {spooled} bytes wait in the delivery spool (0 more being "
                                       f"written); {refused} more would exceed watermark 20000")
    assert gateway.spool_gauge.lanes["eu"].depth_bytes == spooled


async def test_grpc_answers_resource_exhausted_above_the_global_watermark(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        server={"port": 0, "grpc_port": 0}, default="eu",
        destinations={"eu": f"kafka://127.0.0.1:{closed_port()}/orders"},
        backpressure={"max_spooled_events": 10, "retry_after_seconds": 2, "shed_normal_at": 1})
    batch = [Event({"specversion": "1.0", "id": f"g{i}", "source": "/bp", "type": "t"}) for i in range(4)]
    async with AsyncGrpcGatewayClient(f"127.0.0.1:{gateway.endpoints.grpc_port}", timeout=10.0) as client:
        assert await client.publish(batch[:2]) == ["g0", "g1"]
        assert await client.publish(batch[2:]) == ["g2", "g3"]
        with pytest.raises(GrpcOverloaded) as err:
            await client.publish([Event({**batch[0].attributes, "id": f"x{i}"}) for i in range(8)])  # 4 + 8 > 10
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and err.value.retry_after == 2.0
    assert "the delivery spools: 4 events wait" in err.value.message


class GatedSpool:
    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.written: list[str] = []

    async def write(self, events: Sequence[Event], destinations: Sequence[tuple[str, ...]]) -> None:
        await self.gate.wait()
        self.written.extend(e.id for e in events)


async def test_request_bytes_in_flight_are_bounded() -> None:
    spool = GatedSpool()
    pipeline = Pipeline(DedupWindow(60.0), lambda_router(), spool, NO_LIMITS,
                        backpressure=SpoolGauge(max_in_flight_bytes=300))
    held = asyncio.create_task(pipeline.ingest_http(HEADERS, events(0, 2)))  # ~130 bytes: any size passes when idle
    while not pipeline.in_flight:
        await asyncio.sleep(0.01)
    second = events(10, 2)
    assert pipeline.in_flight_bytes + len(second) <= 300
    big = events(20, 4)
    assert pipeline.in_flight_bytes + len(big) > 300
    with pytest.raises(Overloaded, match=r"^\d+ request bytes in flight, limit 300$"):
        await pipeline.ingest_http(HEADERS, big)
    other = asyncio.create_task(pipeline.ingest_http(HEADERS, second))
    spool.gate.set()
    assert (await held).ids == ["0", "1"] and (await other).ids == ["10", "11"]
    assert pipeline.in_flight_bytes == 0


def test_a_hold_turns_into_the_real_size_and_growing_it_is_checked() -> None:
    pipeline = Pipeline(DedupWindow(60.0), lambda_router(), GatedSpool(), NO_LIMITS,
                        backpressure=SpoolGauge(max_in_flight_bytes=300))
    pipeline.hold_bytes(200)  # another request's
    pipeline.hold_bytes(50)
    pipeline.resize_hold(50, 20)  # announced 50, was 20
    assert pipeline.in_flight_bytes == 220
    with pytest.raises(Overloaded, match=r"^200 request bytes in flight, limit 300$"):
        pipeline.resize_hold(20, 150)  # unknown length (held 20), turned out to be 150
    assert pipeline.in_flight_bytes == 220  # the 20 stay held until the caller lets them go
    pipeline.resize_hold(20, 90)
    assert pipeline.in_flight_bytes == 290


async def test_grpc_request_bytes_in_flight_are_bounded_too() -> None:
    from umcef.fabric.ingress.grpc_server import start_grpc_server

    spool = GatedSpool()
    pipeline = Pipeline(DedupWindow(60.0), lambda_router(), spool, NO_LIMITS,
                        backpressure=SpoolGauge(max_in_flight_bytes=400))
    server, port = await start_grpc_server(pipeline, "127.0.0.1", 0, NO_LIMITS)
    try:
        async with AsyncGrpcGatewayClient(f"127.0.0.1:{port}", timeout=10.0) as client:
            one = [Event({"specversion": "1.0", "id": f"g{i}", "source": "/bp", "type": "t"}) for i in range(2)]
            held = asyncio.create_task(client.publish(one))  # any size passes while nothing is in flight
            while not pipeline.in_flight_bytes:
                await asyncio.sleep(0.01)
            big = [Event({"specversion": "1.0", "id": f"b{i}", "source": "/bp", "type": "t", "pad": "x" * 100})
                   for i in range(4)]
            with pytest.raises(GrpcOverloaded) as err:
                await client.publish(big)
            assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert re.fullmatch(r"\d+ request bytes in flight, limit 400", err.value.message)
            spool.gate.set()
            assert await held == ["g0", "g1"]
        assert pipeline.in_flight_bytes == 0
    finally:
        await server.stop(None)


async def test_a_grpc_call_holds_the_largest_request_before_its_message_arrives(
        make_gateway: GatewayFactory, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A call's message size is unknown until it is read, so the call holds max_body_bytes from its start
    (as a chunked HTTP body does): calls beyond the budget are refused before they are read and decoded. A
    call whose message never comes ends with DEADLINE_EXCEEDED and lets its bytes go. A budget for fewer than
    8 such calls is warned of at start."""
    from umcef.fabric.formats import proto
    from umcef.fabric.ingress import grpc_server

    # (long enough that the SDK's retries below are seen refused on a loaded machine before the stall ends)
    monkeypatch.setattr(grpc_server, "BODY_READ_SECONDS", 3.0)
    gateway = await make_gateway(limits={"max_body_bytes": 1000}, backpressure={"max_in_flight_bytes": 1500})
    assert "backpressure.max_in_flight_bytes (1500) admits 1 gRPC call(s) at once" in caplog.text
    target = f"127.0.0.1:{gateway.endpoints.grpc_port}"
    never = asyncio.Event()

    async def no_message() -> Any:  # a client that opens the call and stalls before sending its request
        await never.wait()
        yield b""

    async with grpc.aio.insecure_channel(target) as channel, \
            AsyncGrpcGatewayClient(target, timeout=10.0) as client:
        stalled = channel.stream_unary(proto.PUBLISH_METHOD)(no_message())
        await eventually(lambda: gateway.pipeline.in_flight_bytes == 1000)
        one = [Event({"specversion": "1.0", "id": "g1", "source": "/bp", "type": "t"})]
        with pytest.raises(GrpcOverloaded) as err:  # its 1000 bytes cannot be held beside the stalled call's
            await client.publish(one)
        assert err.value.message == "1000 request bytes in flight, limit 1500"
        assert err.value.retry_after is not None and err.value.retry_after > 0
        async with AsyncPublisher(target, transport="grpc", max_attempts=100, backoff_max=0.2) as sdk:
            retried = asyncio.create_task(sdk.publish({**one[0].attributes, "id": "g2"}))
            await asyncio.sleep(0.3)
            assert not retried.done()  # refused and retried (a non-retryable answer would have ended it)
            with pytest.raises(grpc.aio.AioRpcError) as stall:
                await stalled
            assert stall.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert stall.value.details() == "the request did not arrive within 3 s"
            assert await retried == "g2"  # accepted once the stalled call let its bytes go
        assert await client.publish(one) == ["g1"]
    assert gateway.pipeline.in_flight_bytes == 0
    assert [orjson.loads(r.payload)["id"] for r in gateway.store.read("default", 0, 10)] == ["g2", "g1"]


def lambda_router() -> Any:
    class Default:
        def route(self, event: Event) -> tuple[str, ...]:
            return ("default",)

    return Default()


# -- appends by another process: `umcef dlq replay` into a running gateway's spools ---------------------------

NEVER_EJECT = {"estimator": {"eject_after_failures": 1000}}
MODES = pytest.mark.parametrize("process", [False, True], ids=["in-process", "delivery-process"])


async def replay_with_the_cli(gateway: Gateway, destination: str, n: int) -> None:
    """`n` dead letters of `destination` in the gateway's `_deadletter`, re-driven by `umcef dlq replay` in a
    process of its own, as an operator does on a running gateway."""
    for i in range(n):
        event = Event({"specversion": "1.0", "id": f"r{i}", "source": "/bp", "type": "t"})
        await gateway.dead_letters.put(event, "Transient: broker down", destination=destination, attempts=3)
    before = gateway.store.appended().get(spool_topic(destination), 0)
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "umcef.fabric.cli", "dlq", "replay", "--data-dir",
                         str(gateway.config.data_dir), "--all"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    # Counted, not read: a running gateway may have delivered and trimmed them already.
    assert gateway.store.appended()[spool_topic(destination)] - before == n


@MODES
async def test_events_replayed_by_another_process_count_toward_the_watermark(make_gateway: GatewayFactory,
                                                                            process: bool) -> None:
    gateway = await make_gateway(
        destinations={"eu": {"url": f"kafka://127.0.0.1:{closed_port()}/orders", "max_spooled_events": 10}},
        default="eu", backpressure={"max_spooled_events": 50, "shed_normal_at": 1}, router=NEVER_EJECT,
        delivery={"process": process})
    await replay_with_the_cli(gateway, "eu", 8)
    lane = gateway.spool_gauge.lanes["eu"]
    await eventually(lambda: lane.depth == 8, 10, "the gateway to count the 8 replayed events")
    assert gateway.spool_gauge.depth == 8
    # Without them in the depth, an empty spool would take this batch.
    answer = await post(gateway, events(100, 3))
    assert answer.status_code == 429
    assert answer.json()["detail"] == ("destination 'eu': 8 events wait in the delivery spool (0 more being "
                                       "written); 3 more would exceed watermark 10")
    assert (await post(gateway, events(100, 2))).status_code == 202
    assert (lane.depth, gateway.spool_gauge.depth) == (10, 10)


async def kafka_gateway(make_gateway: GatewayFactory, kafka_broker: KafkaBroker, prefix: str,
                        process: bool) -> Gateway:
    """A gateway whose only destination `k` is a new one-partition topic on the test broker."""
    topic = unique_name(prefix)
    await create_topic(kafka_broker.bootstrap, topic, partitions=1)
    return await make_gateway(destinations={"k": f"kafka://{kafka_broker.bootstrap}/{topic}"}, default="k",
                              delivery={"process": process})


@MODES
async def test_replayed_events_that_are_delivered_leave_the_depth(make_gateway: GatewayFactory,
                                                                 kafka_broker: KafkaBroker, process: bool) -> None:
    gateway = await kafka_gateway(make_gateway, kafka_broker, "bp-replay", process)
    await replay_with_the_cli(gateway, "k", 8)
    lane = gateway.spool_gauge.lanes["k"]
    await eventually(lambda: lane.foreign == 8 and gateway._lane_drained("k") == 8 and gateway._drained() == 8, 30,
                     "the replayed events counted, delivered and reported")
    assert (lane.depth, gateway.spool_gauge.depth) == (0, 0)  # counted once in, once out


# -- trimming: delivered records leave the spools all the time, appends by others must still count -----------


def test_reconcile_counts_another_writers_appends_while_delivered_records_are_trimmed(tmp_path: Path) -> None:
    spool = spool_topic("eu")
    trim = Retention(None, None, (TRIM_DELIVERED,))  # the gateway's own rule
    with LocalStore(tmp_path, sync="normal", retention=trim, trim_interval=3600) as store, \
            LocalStore(tmp_path, sync="normal", retention=Retention(None, None)) as other:  # `umcef dlq replay`
        drained = [0]
        gauge = SpoolGauge(100)
        lane = gauge.lane(Lane("eu", drained=lambda: drained[0]))
        lane.baseline(store.appended().get(spool, 0))
        own = store.append_sync([Record(spool, b"{}", f"own{i}") for i in range(10)])
        lane.add(10)
        other.append_sync([Record(spool, b"{}", f"replayed{i}") for i in range(3)])
        gauge.reconcile({lane: store.appended()[spool]})
        assert (lane.foreign, lane.depth) == (3, 13)
        store.commit_cursor(CURSOR_GROUP, spool, own[-1])  # this process's ten delivered ...
        drained[0] = 10
        assert store.trim_consumed() == 10  # ... and trimmed between two looks
        gauge.reconcile({lane: store.appended()[spool]})
        assert store.topics()[spool] == 3
        assert (lane.foreign, lane.depth, gauge.foreign) == (3, 3, 3), "the trimming hid the other writer's appends"


@MODES
async def test_replayed_events_count_while_delivered_ones_are_trimmed(make_gateway: GatewayFactory,
                                                                      kafka_broker: KafkaBroker, process: bool) -> None:
    gateway = await kafka_gateway(make_gateway, kafka_broker, "bp-trim", process)
    spool, lane = spool_topic("k"), gateway.spool_gauge.lanes["k"]
    assert (await post(gateway, events(0, 20))).status_code == 202
    await eventually(lambda: gateway._lane_drained("k") == 20 and spool not in gateway.store.topics(), 30,
                     "the gateway's 20 events delivered and trimmed from the spool")
    await replay_with_the_cli(gateway, "k", 8)
    # Counting records, these eight would hide behind the twenty trimmed: the spool never holds more than 20.
    await eventually(lambda: lane.foreign == 8 and gateway._lane_drained("k") == 28 and gateway._drained() == 28, 30,
                     "the replayed events counted, delivered and reported")
    await eventually(lambda: spool not in gateway.store.topics(), 30, "the replayed events trimmed too")
    assert (lane.foreign, lane.depth, gateway.spool_gauge.depth) == (8, 0, 0)
