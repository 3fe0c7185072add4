"""HTTP ingress against a real gateway: every mode, durable 202s, RFC 9457 problems for bad input."""

from __future__ import annotations

import base64
from typing import Any

import httpx
import orjson
import pytest

from tests.conftest import GatewayFactory, http_url
from umcef.fabric.gateway import Gateway

pytestmark = pytest.mark.pure_twin
STRUCTURED = {"content-type": "application/cloudevents+json"}
BATCH = {"content-type": "application/cloudevents-batch+json"}


def order(n: int, **extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"o-{n}", "source": "/shop", "type": "com.example.order.placed",
            "datacontenttype": "application/json", "data": {"orderId": n, "note": "grüße ✓"}, **extra}


def stored(gateway: Gateway, topic: str = "default") -> list[dict[str, Any]]:
    return [orjson.loads(e.payload) for e in gateway.store.read(topic, 0, 100_000)]


async def post(gateway: Gateway, body: bytes, headers: dict[str, str]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        return await client.post("/v1/events", content=body, headers=headers)


async def test_structured_event_is_stored_before_202(gateway: Gateway) -> None:
    response = await post(gateway, orjson.dumps(order(1)), STRUCTURED)
    assert response.status_code == 202
    assert response.json() == {"accepted": ["o-1"], "duplicates": []}
    assert stored(gateway) == [order(1)]


async def test_binary_mode_keeps_body_bytes_and_percent_decodes(gateway: Gateway) -> None:
    body = bytes(range(256))
    headers = {"ce-specversion": "1.0", "ce-id": "b-1", "ce-source": "/bin", "ce-type": "t.bin",
               "ce-subject": "caf%C3%A9 %22q%22", "ce-partitionkey": "k1", "content-type": "application/octet-stream"}
    response = await post(gateway, body, headers)
    assert response.status_code == 202, response.text
    (event,) = stored(gateway)
    assert event["subject"] == 'café "q"'
    assert base64.b64decode(event["data_base64"]) == body
    assert event["datacontenttype"] == "application/octet-stream"


async def test_batch_all_land_in_order(gateway: Gateway) -> None:
    events = [order(i) for i in range(50)]
    response = await post(gateway, orjson.dumps(events), BATCH)
    assert response.status_code == 202
    assert response.json()["accepted"] == [e["id"] for e in events]
    assert [e["id"] for e in stored(gateway)] == [e["id"] for e in events]


async def test_duplicate_gets_same_answer_and_is_not_stored_twice(gateway: Gateway) -> None:
    first = await post(gateway, orjson.dumps(order(7)), STRUCTURED)
    again = await post(gateway, orjson.dumps(order(7)), STRUCTURED)
    assert first.status_code == again.status_code == 202
    assert again.json() == {"accepted": ["o-7"], "duplicates": ["o-7"]}
    assert len(stored(gateway)) == 1


async def test_routes_fan_out_and_unmatched_go_to_default(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(
        destinations={"orders": "local://orders", "audit": {"url": "local://audit"}},
        routes=[{"name": "orders", "filter": {"prefix": {"type": "com.example.order."}}, "to": ["orders", "audit"]},
                {"name": "eu", "filter": {"exact": {"region": "eu"}}, "to": ["audit"]}],
    )
    batch = [order(1), order(2, region="eu"), {**order(3), "type": "com.example.customer.created"}]
    assert (await post(gateway, orjson.dumps(batch), BATCH)).status_code == 202
    assert [e["id"] for e in stored(gateway, "orders")] == ["o-1", "o-2"]
    assert [e["id"] for e in stored(gateway, "audit")] == ["o-1", "o-2"]
    assert [e["id"] for e in stored(gateway, "default")] == ["o-3"]


def _problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = response.json()
    assert body["status"] == status and body["title"] and body["detail"] and body["type"]
    return body


@pytest.mark.parametrize(
    ("body", "headers", "status", "attribute"),
    [
        (b"{not json", STRUCTURED, 400, None),
        (orjson.dumps({**order(1), "source": ""}), STRUCTURED, 422, "source"),
        (orjson.dumps({k: v for k, v in order(1).items() if k != "type"}), STRUCTURED, 422, "type"),
        (orjson.dumps({**order(1), "specversion": "0.3"}), STRUCTURED, 422, "specversion"),
        (orjson.dumps({**order(1), "time": "2024-02-30T10:00:00Z"}), STRUCTURED, 422, "time"),
        (orjson.dumps({**order(1), "Bad-Name": "x"}), STRUCTURED, 422, "Bad-Name"),
        (orjson.dumps({**order(1), "count": 2**40}), STRUCTURED, 422, "count"),
        (orjson.dumps({**order(1), "data_base64": "AAAA"}), STRUCTURED, 422, "data_base64"),
        (orjson.dumps([1, 2]), STRUCTURED, 422, None),
        (orjson.dumps(order(1)), BATCH, 422, None),
        (b"x", {"content-type": "text/plain"}, 415, None),
        (b"x", {"content-type": "application/cloudevents+xml"}, 415, None),
        (b"x", {"ce-id": "1", "ce-source": "/s", "ce-type": "t"}, 400, "specversion"),
        (b"x", {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-time": "yesterday"},
         400, "time"),
        (b"x", {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-x": "%FF"},
         400, "x"),
    ],
)
async def test_bad_input_gets_a_problem_naming_the_attribute(
    gateway: Gateway, body: bytes, headers: dict[str, str], status: int, attribute: str | None
) -> None:
    problem = _problem(await post(gateway, body, headers), status)
    assert problem.get("attribute") == attribute
    assert stored(gateway) == []


async def test_batch_error_names_the_index_and_accepts_nothing(gateway: Gateway) -> None:
    batch = [order(1), order(2), {**order(3), "id": ""}]
    problem = _problem(await post(gateway, orjson.dumps(batch), BATCH), 422)
    assert problem["index"] == 2 and problem["attribute"] == "id"
    assert stored(gateway) == []


async def test_limits_answer_413(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(limits={"max_body_bytes": 2000, "max_batch": 3, "max_attributes": 10,
                                         "max_attribute_bytes": 50})
    _problem(await post(gateway, orjson.dumps({**order(1), "data": "x" * 3000}), STRUCTURED), 413)
    _problem(await post(gateway, orjson.dumps([order(i) for i in range(4)]), BATCH), 413)
    too_many = {**order(1), **{f"e{i}": "v" for i in range(10)}}
    assert _problem(await post(gateway, orjson.dumps(too_many), STRUCTURED), 422)["detail"]
    assert _problem(await post(gateway, orjson.dumps({**order(1), "subject": "s" * 51}), STRUCTURED),
                    422)["attribute"] == "subject"
    assert stored(gateway) == []


async def test_chunked_body_over_limit_is_413(make_gateway: GatewayFactory) -> None:
    gateway = await make_gateway(limits={"max_body_bytes": 1000})

    async def chunks():  # type: ignore[no-untyped-def]
        for _ in range(10):
            yield b"x" * 500

    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        response = await client.post("/v1/events", content=chunks(), headers=STRUCTURED)
    _problem(response, 413)


async def test_health_and_unknown_paths(gateway: Gateway) -> None:
    async with httpx.AsyncClient(base_url=http_url(gateway)) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        assert (await client.get("/readyz")).status_code == 200
        _problem(await client.get("/nope"), 404)
        _problem(await client.get("/v1/events"), 405)
