"""Shared fixtures: real gateways on free ports with their own data directories."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest_brokers import *  # noqa: F403  (real brokers: Tansu, moto, Pub/Sub emulator, Redis, PostgreSQL)
from umcef.fabric import config as config_mod
from umcef.fabric.gateway import Gateway

GatewayFactory = Callable[..., Awaitable[Gateway]]


def gateway_config(data_dir: Path, **extra: Any) -> config_mod.Config:
    raw: dict[str, Any] = {"data_dir": str(data_dir), "server": {"port": 0, "grpc_port": 0}}
    raw.update(extra)
    return config_mod.from_mapping(raw, "test")


@pytest.fixture
async def make_gateway(tmp_path: Path) -> AsyncIterator[GatewayFactory]:
    """Start as many gateways as a test needs; all are stopped at teardown."""
    started: list[Gateway] = []

    async def make(**extra: Any) -> Gateway:
        gateway = Gateway(gateway_config(tmp_path / f"gw{len(started)}", **extra))
        await gateway.start()
        started.append(gateway)
        return gateway

    yield make
    for gateway in started:
        await gateway.stop()


@pytest.fixture
async def gateway(make_gateway: GatewayFactory) -> Gateway:
    return await make_gateway()


def http_url(gateway: Gateway) -> str:
    return f"http://127.0.0.1:{gateway.endpoints.http_port}"
