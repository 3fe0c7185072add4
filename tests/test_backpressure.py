"""Backpressure: the undelivered spool depth has a high watermark; above it ingress answers 429 + Retry-After."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory, http_url
from umcef.fabric import config as config_mod
from umcef.fabric.backpressure import SpoolGauge
from umcef.fabric.delivery import spool_topic
from umcef.fabric.gateway import Gateway

HEADERS = {"content-type": "application/cloudevents-batch+json"}


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def batch(start: int, n: int) -> bytes:
    return orjson.dumps([{"specversion": "1.0", "id": str(i), "source": "/bp", "type": "t"}
                         for i in range(start, start + n)])


def test_gauge_counts_in_flight_and_lets_an_idle_spool_take_any_batch() -> None:
    drained = [0]
    gauge = SpoolGauge(100, 2.0, lambda: drained[0])
    assert gauge.refuse(500, 0) is None  # empty spool, nothing in flight: an oversized batch still passes
    gauge.add(90)
    assert gauge.refuse(10, 0) is None
    assert gauge.refuse(11, 0) is not None
    assert gauge.refuse(5, 6) is not None  # in-flight publishes may all be headed for the spool
    drained[0] = 50
    assert gauge.depth == 40 and gauge.refuse(60, 0) is None
    drained[0] = 200  # drained what another process (dlq replay) spooled: never negative
    assert gauge.depth == 0


def test_backpressure_config() -> None:
    cfg = config_mod.from_mapping({"backpressure": {"max_spooled_events": 10, "retry_after_seconds": 3}})
    assert (cfg.backpressure.max_spooled_events, cfg.backpressure.retry_after_seconds) == (10, 3.0)
    assert config_mod.from_mapping({}).backpressure.max_spooled_events is None
    with pytest.raises(config_mod.ConfigError,
                       match=r"^t: backpressure\.max_spooled_events: expected an integer at least 1, got 0$"):
        config_mod.from_mapping({"backpressure": {"max_spooled_events": 0}}, "t")
    with pytest.raises(config_mod.ConfigError, match=r"backpressure\.retry: unknown key"):
        config_mod.from_mapping({"backpressure": {"retry": 1}})


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
        destinations={"eu": f"kafka://127.0.0.1:{closed_port()}/orders"}, default="eu",
        backpressure={"max_spooled_events": 100, "retry_after_seconds": 3})
    accepted, refused = await fill_until_429(gateway)
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "3"
    assert refused.headers["content-type"].startswith("application/problem+json")
    assert "watermark 100" in refused.json()["detail"]
    assert accepted == 98  # 14 requests of 7; the 15th would have taken the depth to 105
    # Nothing accepted is lost: every 202'd event is in the spool, and nothing else is.
    spooled = [orjson.loads(s.payload)["id"] for s in gateway.store.read(spool_topic("eu"), 0, 1000)]
    assert sorted(spooled, key=int) == [str(i) for i in range(accepted)]
    assert gateway.workers["eu"].delivered == 0


async def test_restart_counts_the_spool_left_by_the_previous_run(make_gateway: GatewayFactory,
                                                                 tmp_path: Path) -> None:
    url = f"kafka://127.0.0.1:{closed_port()}/orders"
    first = await make_gateway(destinations={"eu": url}, default="eu", backpressure={"max_spooled_events": 50})
    accepted, _ = await fill_until_429(first, per_request=10)
    assert accepted == 50
    await first.stop()
    config = config_mod.from_mapping({"data_dir": str(first.config.data_dir), "server": {"port": 0, "grpc_port": 0},
                                      "destinations": {"eu": url}, "default": "eu",
                                      "backpressure": {"max_spooled_events": 50}}, "test")
    second = Gateway(config)
    await second.start()
    try:
        assert second.spool_gauge.depth == 50
        async with httpx.AsyncClient() as client:
            answer = await client.post(http_url(second) + "/v1/events", content=batch(1000, 1), headers=HEADERS)
        assert answer.status_code == 429 and answer.headers["Retry-After"] == "1"
    finally:
        await second.stop()
