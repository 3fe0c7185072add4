"""A configured source feeds the pipeline exactly like HTTP ingress: routed, deduplicated, durable."""

from __future__ import annotations

import asyncio
import time

import orjson

from tests.conftest import GatewayFactory
from umcef.adapters.local import Record
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format


async def test_local_source_runs_through_the_pipeline(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        destinations={"orders": "local://orders"},
        routes=[{"name": "orders", "filter": {"prefix": {"type": "com.example.order."}}, "to": ["orders"]}],
        sources=[{"name": "inbox", "url": "local://inbox?group=gateway"}],
    )
    events = [Event({"specversion": "1.0", "id": f"s{i}", "source": "/legacy", "type": "com.example.order.placed"},
                    {"n": i}) for i in range(20)]
    duplicate = events[3]
    records = [Record("inbox", json_format.encode(e), e.id) for e in [*events, duplicate]]
    await gateway.store.append(records)
    runner = gateway.sources["inbox"]
    deadline = time.monotonic() + 10
    while runner.accepted < len(records):
        assert time.monotonic() < deadline, f"source processed only {runner.accepted} of {len(records)}"
        await asyncio.sleep(0.02)
    ids = [orjson.loads(e.payload)["id"] for e in gateway.store.read("orders")]
    assert ids == [f"s{i}" for i in range(20)]  # routed in order, the duplicate dropped by dedup
