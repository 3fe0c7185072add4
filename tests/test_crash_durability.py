"""A 202 means durable: SIGKILL the gateway right after the 202s, restart, find every accepted event."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import orjson
import pytest

from tests.gateway_process import GatewayProcess
from umcef.adapters.local import LocalStore


def batch(worker: int, n: int, size: int) -> list[dict[str, object]]:
    return [{"specversion": "1.0", "id": f"w{worker}-{n}-{i}", "source": "/crash", "type": "t.crash",
             "partitionkey": f"k{i % 7}", "data": {"n": i}} for i in range(size)]


async def publish_until_killed(gateway: GatewayProcess, accepted: set[str], target: int) -> None:
    """Eight concurrent publishers; the gateway is SIGKILLed as soon as `target` events were acknowledged,
    while other requests are still in flight."""

    async def worker(w: int) -> None:
        async with httpx.AsyncClient(base_url=gateway.url, timeout=10) as client:
            for n in range(10_000):
                try:
                    response = await client.post(
                        "/v1/events", content=orjson.dumps(batch(w, n, 25)),
                        headers={"content-type": "application/cloudevents-batch+json"})
                except httpx.TransportError:
                    return
                if response.status_code == 202:
                    accepted.update(response.json()["accepted"])
                    if len(accepted) >= target and gateway.proc.poll() is None:
                        gateway.kill()

    await asyncio.gather(*(worker(w) for w in range(8)))


@pytest.mark.parametrize("sync", ["full", "interval"])  # both: the 202 waits for the store's own fsync
def test_sigkill_after_202_loses_nothing(tmp_path: Path, sync: str) -> None:
    data_dir = tmp_path / "store"
    accepted: set[str] = set()
    env = {"UMCEF_STORE__SYNC": sync}
    for round_ in range(3):
        gateway = GatewayProcess(data_dir, env=env)
        before = len(accepted)
        asyncio.run(publish_until_killed(gateway, accepted, before + 2000))
        assert gateway.proc.returncode == -9, f"round {round_}: gateway was not SIGKILLed"
        assert len(accepted) >= before + 2000

    store = LocalStore(data_dir)
    try:
        found = {orjson.loads(e.payload)["id"] for e in store.read("default", 0, 10_000_000)}
    finally:
        store.close()
    missing = accepted - found
    assert not missing, f"{len(missing)} acknowledged events lost, e.g. {sorted(missing)[:5]}"

    # The restarted gateway serves again on the same store.
    gateway = GatewayProcess(data_dir, env=env)
    try:
        response = httpx.post(gateway.url + "/v1/events", content=orjson.dumps(batch(99, 0, 3)),
                              headers={"content-type": "application/cloudevents-batch+json"})
        assert response.status_code == 202
    finally:
        assert gateway.stop() == 0
