"""The publisher SDK against a real gateway (HTTP and gRPC) and against scripted HTTP servers for retries."""

from __future__ import annotations

import asyncio
import base64
import email.utils
import random
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import grpc
import grpc.aio
import httpx
import orjson
import pytest
from aiohttp import web

from tests.brokers import closed_port
from tests.conftest import GatewayFactory, http_url
from umcef.fabric.event import Event
from umcef.fabric.formats import proto
from umcef.fabric.formats.proto.gateway_pb2 import PublishBatchRequest, PublishRequest, PublishResponse
from umcef.fabric.gateway import Gateway
from umcef.fabric.sdk import (
    AsyncPublisher,
    GatewayUnavailable,
    InvalidEventError,
    Publisher,
    PublishError,
    PublishTimeout,
    _Retry,
    parse_retry_after,
    prepare,
)

TRANSPORTS = ["http-binary", "http-structured", "grpc"]


def stored(gateway: Gateway, topic: str = "default") -> list[dict[str, Any]]:
    return [orjson.loads(e.payload) for e in gateway.store.read(topic, 0, 100_000)]


def target(gateway: Gateway, transport: str) -> dict[str, Any]:
    """Publisher arguments reaching `gateway` over `transport` ("http-binary", "http-structured", "grpc")."""
    if transport == "grpc":
        return {"url": f"127.0.0.1:{gateway.endpoints.grpc_port}", "transport": "grpc"}
    return {"url": http_url(gateway), "transport": "http", "mode": transport.split("-")[1]}


def order(n: int, **extra: Any) -> dict[str, Any]:
    return {"id": f"o-{n}", "source": "/shop", "type": "com.example.order.placed",
            "data": {"orderId": n, "note": "grüße ✓"}, **extra}


# ------------------------------------------------------------------------------ real gateway



@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_publish_one_lands_in_store(gateway: Gateway, transport: str) -> None:
    async with AsyncPublisher(**target(gateway, transport)) as pub:
        event_id = await pub.publish(Event({"specversion": "1.0", "id": "e-1", "source": "/s",
                                            "type": "t.one", "subject": "café", "partitionkey": "k1"},
                                           b"\x00\x01raw"))
    assert event_id == "e-1"
    (event,) = stored(gateway)
    assert event["id"] == "e-1" and event["source"] == "/s" and event["type"] == "t.one"
    assert event["subject"] == "café" and event["partitionkey"] == "k1"
    assert base64.b64decode(event["data_base64"]) == b"\x00\x01raw"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_publish_batch_lands_in_order(gateway: Gateway, transport: str) -> None:
    events = [order(i) for i in range(25)]
    async with AsyncPublisher(**target(gateway, transport)) as pub:
        ids = await pub.publish_batch(events)
        assert await pub.publish_batch([]) == []
    assert ids == [f"o-{i}" for i in range(25)]
    got = stored(gateway)
    assert [e["id"] for e in got] == ids
    assert got[3]["data"] == {"orderId": 3, "note": "grüße ✓"}


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_sync_publisher(gateway: Gateway, transport: str) -> None:
    def run() -> tuple[str, list[str]]:
        with Publisher(**target(gateway, transport)) as pub:
            return pub.publish(order(1)), pub.publish_batch([order(2), order(3)])

    one, batch = await asyncio.to_thread(run)
    assert (one, batch) == ("o-1", ["o-2", "o-3"])
    assert [e["id"] for e in stored(gateway)] == ["o-1", "o-2", "o-3"]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_dicts_and_official_sdk_events_are_accepted(gateway: Gateway, transport: str) -> None:
    from cloudevents.core.v1.event import CloudEvent
    from cloudevents.v1.http import CloudEvent as LegacyCloudEvent

    when = datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=timezone(timedelta(hours=2)))
    official = CloudEvent({"id": "sdk-1", "source": "/official", "type": "t.sdk", "time": when,
                           "datacontenttype": "application/json", "traceparent": "00-abc-def-01"},
                          {"hello": "world"})
    plain = {"source": "/dict", "type": "t.dict", "data_base64": base64.b64encode(b"\xff\xfe").decode(),
             "subject": None}
    legacy = LegacyCloudEvent({"id": "legacy-1", "source": "/legacy", "type": "t.legacy"}, {"v": 1})
    async with AsyncPublisher(**target(gateway, transport)) as pub:
        assert await pub.publish(official) == "sdk-1"
        dict_id = await pub.publish(plain)
        assert await pub.publish(legacy) == "legacy-1"
    uuid.UUID(dict_id)  # filled in by the SDK
    first, second, third = stored(gateway)
    assert third["data"] == {"v": 1} and third["source"] == "/legacy"
    assert first["time"] == "2024-05-06T05:08:09.123456Z"
    assert first["data"] == {"hello": "world"} and first["traceparent"] == "00-abc-def-01"
    assert second["id"] == dict_id and second["specversion"] == "1.0" and "subject" not in second
    assert base64.b64decode(second["data_base64"]) == b"\xff\xfe"
    datetime.fromisoformat(second["time"])  # filled in as RFC 3339
    assert plain.keys() == {"source", "type", "data_base64", "subject"}  # the caller's dict is untouched


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_prepared_event_keeps_its_id_and_dedups(gateway: Gateway, transport: str) -> None:
    event = prepare({"source": "/again", "type": "t.again", "data": "x"})
    async with AsyncPublisher(**target(gateway, transport)) as pub:
        assert await pub.publish(event) == event.id
        assert await pub.publish(event) == event.id
    assert [e["id"] for e in stored(gateway)] == [event.id]


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_gateway_rejection_names_attribute_and_index(make_gateway: GatewayFactory,
                                                            transport: str) -> None:
    # Locally valid, but the gateway's configured attribute-size limit refuses it.
    gateway = await make_gateway(limits={"max_attribute_bytes": 32})
    long_subject = "s" * 100
    async with AsyncPublisher(**target(gateway, transport), max_attempts=3) as pub:
        with pytest.raises(InvalidEventError) as one:
            await pub.publish(order(1, subject=long_subject))
        with pytest.raises(InvalidEventError) as batch:
            await pub.publish_batch([order(2), order(3, subject=long_subject)])
    for caught in (one.value, batch.value):
        assert caught.attribute == "subject"
        assert caught.status is not None and caught.attempts == 1  # refused, not retried
        assert "32" in caught.detail
    assert batch.value.index == 1
    assert stored(gateway) == []


async def test_local_validation_fails_fast_without_a_request() -> None:
    fake = await FakeGateway.start([])
    try:
        async with AsyncPublisher(fake.url) as pub:
            with pytest.raises(InvalidEventError) as bad_name:
                await pub.publish({"source": "/s", "type": "t", "Bad_Name": "x"})
            with pytest.raises(InvalidEventError) as bad_time:
                await pub.publish_batch([order(1), order(2, time="yesterday")])
            with pytest.raises(InvalidEventError) as naive:
                await pub.publish(order(3, time=datetime(2024, 1, 1)))
            with pytest.raises(InvalidEventError) as no_source:
                await pub.publish({"type": "t"})
            with pytest.raises(InvalidEventError) as bad_data:
                await pub.publish(order(4, data={"when": object()}))
            with pytest.raises(TypeError):
                await pub.publish(42)
    finally:
        await fake.stop()
    assert bad_name.value.attribute == "Bad_Name" and bad_name.value.status is None
    assert (bad_time.value.attribute, bad_time.value.index) == ("time", 1)
    assert naive.value.attribute == "time"
    assert no_source.value.attribute == "source"
    assert bad_data.value.attribute == "data"
    assert "attribute 'Bad_Name'" in str(bad_name.value)
    assert fake.requests == []


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_draining_gateway_is_retried_then_unavailable(gateway: Gateway, transport: str) -> None:
    gateway.pipeline.closing = True
    async with AsyncPublisher(**target(gateway, transport), max_attempts=2, backoff_base=0.01) as pub:
        with pytest.raises(GatewayUnavailable) as caught:
            await pub.publish(order(1))
    assert caught.value.attempts == 2
    assert caught.value.status in (503, "UNAVAILABLE")
    assert not isinstance(caught.value, PublishTimeout)


# ---------------------------------------------------------------- scripted servers for retries


@dataclass
class Seen:
    at: float
    headers: dict[str, str]
    body: bytes


@dataclass
class FakeGateway:
    """A real aiohttp server answering a script of (status, headers) first, then 202 (or hanging)."""

    script: list[tuple[int, dict[str, str], bytes]]
    hang: bool = False
    requests: list[Seen] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    runner: web.AppRunner | None = None
    url: str = ""

    @classmethod
    async def start(cls, script: list[tuple[int, dict[str, str], bytes]], hang: bool = False) -> FakeGateway:
        fake = cls(list(script), hang)
        app = web.Application()
        app.router.add_post("/v1/events", fake.handle)
        fake.runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=0.1)
        await fake.runner.setup()
        site = web.TCPSite(fake.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        fake.url = f"http://127.0.0.1:{port}"
        return fake

    async def handle(self, request: web.Request) -> web.Response:
        self.requests.append(Seen(time.monotonic(), dict(request.headers), await request.read()))
        if self.script:
            status, headers, body = self.script.pop(0)
            return web.Response(status=status, headers=headers, body=body,
                                content_type="application/problem+json")
        if self.hang:
            await self.release.wait()
        return web.json_response({"accepted": [], "duplicates": []}, status=202)

    async def stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def gaps(self) -> list[float]:
        return [b.at - a.at for a, b in zip(self.requests, self.requests[1:], strict=False)]


@pytest.fixture
async def fake_gateway() -> AsyncIterator[Callable[..., Any]]:
    started: list[FakeGateway] = []

    async def make(script: list[tuple[int, dict[str, str], bytes]], hang: bool = False) -> FakeGateway:
        fake = await FakeGateway.start(script, hang)
        started.append(fake)
        return fake

    yield make
    for fake in started:
        await fake.stop()


def problem(status: int, detail: str, **extra: Any) -> bytes:
    return orjson.dumps({"type": "about:blank", "status": status, "detail": detail, **extra})


async def test_503_with_retry_after_is_retried_with_the_same_id(fake_gateway: Callable[..., Any]) -> None:
    busy = (503, {"Retry-After": "1"}, problem(503, "draining"))
    fake = await fake_gateway([busy, busy])
    async with AsyncPublisher(fake.url, max_attempts=3, backoff_base=0.001, backoff_max=0.01) as pub:
        event_id = await pub.publish({"source": "/r", "type": "t.retry", "data": {"n": 1}})
    assert len(fake.requests) == 3
    assert {r.headers["ce-id"] for r in fake.requests} == {event_id}
    assert len({r.body for r in fake.requests}) == 1
    assert len({r.headers["ce-time"] for r in fake.requests}) == 1
    # Retry-After: 1 is a floor; the jittered backoff alone would be at most 10 ms.
    assert all(gap >= 0.9 for gap in fake.gaps()), fake.gaps()


async def test_429_with_http_date_is_honoured_in_structured_batches(fake_gateway: Callable[..., Any]) -> None:
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=2), usegmt=True)
    fake = await fake_gateway([(429, {"Retry-After": later}, problem(429, "slow down"))])
    async with AsyncPublisher(fake.url, mode="structured", backoff_base=0.001, backoff_max=0.01) as pub:
        ids = await pub.publish_batch([{"source": "/r", "type": "t"}, {"source": "/r", "type": "t"}])
    assert len(fake.requests) == 2
    first, second = (orjson.loads(r.body) for r in fake.requests)
    assert [e["id"] for e in first] == [e["id"] for e in second] == ids
    assert fake.requests[0].headers["Content-Type"] == "application/cloudevents-batch+json"
    # The HTTP-date has 1 s resolution, so the wait is between 1 and 2 s.
    assert fake.gaps()[0] >= 0.5, fake.gaps()


async def test_sync_publisher_retries_and_reuses_the_id(fake_gateway: Callable[..., Any]) -> None:
    fake = await fake_gateway([(503, {}, b"busy"), (429, {"Retry-After": "0"}, b"")])

    def run() -> str:
        with Publisher(fake.url, mode="structured", backoff_base=0.001) as pub:
            return pub.publish(order(9))

    assert await asyncio.to_thread(run) == "o-9"
    assert len(fake.requests) == 3
    assert {orjson.loads(r.body)["id"] for r in fake.requests} == {"o-9"}


async def test_client_errors_are_not_retried(fake_gateway: Callable[..., Any]) -> None:
    fake = await fake_gateway([(422, {}, problem(422, "attribute 'type': is required", attribute="type",
                                                 index=4))])
    async with AsyncPublisher(fake.url, backoff_base=0.001) as pub:
        with pytest.raises(InvalidEventError) as caught:
            await pub.publish(order(1))
    assert len(fake.requests) == 1
    error = caught.value
    assert (error.status, error.attribute, error.index, error.attempts) == (422, "type", 4, 1)
    assert error.detail == "attribute 'type': is required"
    assert error.problem is not None and error.problem["status"] == 422


async def test_server_errors_other_than_unavailable_are_not_retried(fake_gateway: Callable[..., Any]) -> None:
    fake = await fake_gateway([(500, {}, problem(500, "the gateway failed"))])
    async with AsyncPublisher(fake.url, backoff_base=0.001) as pub:
        with pytest.raises(PublishError) as caught:
            await pub.publish(order(1))
    assert type(caught.value) is PublishError
    assert caught.value.status == 500 and "the gateway failed" in str(caught.value)
    assert len(fake.requests) == 1


async def test_retries_exhausted_raise_gateway_unavailable(fake_gateway: Callable[..., Any]) -> None:
    fake = await fake_gateway([(503, {}, problem(503, "draining"))] * 10)
    async with AsyncPublisher(fake.url, max_attempts=4, backoff_base=0.001) as pub:
        with pytest.raises(GatewayUnavailable) as caught:
            await pub.publish(order(1))
    assert len(fake.requests) == 4
    assert (caught.value.status, caught.value.attempts) == (503, 4)
    assert "draining" in str(caught.value)


async def test_retry_after_beyond_the_cap_fails_at_once(fake_gateway: Callable[..., Any]) -> None:
    fake = await fake_gateway([(429, {"Retry-After": "3600"}, problem(429, "come back later"))])
    async with AsyncPublisher(fake.url, max_retry_after=30) as pub:
        with pytest.raises(GatewayUnavailable) as caught:
            await pub.publish(order(1))
    assert len(fake.requests) == 1
    assert caught.value.retry_after == 3600 and caught.value.status == 429


async def test_timeouts_are_retried_then_raise_publish_timeout(fake_gateway: Callable[..., Any]) -> None:
    fake = await fake_gateway([], hang=True)
    async with AsyncPublisher(fake.url, timeout=0.2, max_attempts=2, backoff_base=0.001) as pub:
        with pytest.raises(PublishTimeout) as caught:
            await pub.publish(order(1))
    assert len(fake.requests) == 2
    assert caught.value.attempts == 2
    assert isinstance(caught.value.cause, httpx.TimeoutException)


async def test_deadline_bounds_the_whole_call(fake_gateway: Callable[..., Any]) -> None:
    fake = await fake_gateway([(503, {"Retry-After": "5"}, b"")] * 10)
    started = time.monotonic()
    async with AsyncPublisher(fake.url, deadline=1.0) as pub:
        with pytest.raises(PublishTimeout):
            await pub.publish(order(1))
    assert time.monotonic() - started < 4  # did not sit out the 5 s Retry-After
    assert len(fake.requests) == 1


@dataclass
class FakeGrpcGateway:
    """A real grpc.aio server speaking umcef.v1.Gateway: fails with a script of (code, trailers) first."""

    script: list[tuple[Any, tuple[tuple[str, str], ...]]]
    hang: bool = False
    calls: list[tuple[float, list[str]]] = field(default_factory=list)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    server: Any = None
    url: str = ""

    @classmethod
    async def start(cls, script: list[tuple[Any, tuple[tuple[str, str], ...]]],
                    hang: bool = False) -> FakeGrpcGateway:
        fake = cls(list(script), hang)
        fake.server = grpc.aio.server()
        fake.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(proto.SERVICE, {
            "Publish": grpc.unary_unary_rpc_method_handler(fake.publish),
            "PublishBatch": grpc.unary_unary_rpc_method_handler(fake.publish_batch),
        }),))
        port = fake.server.add_insecure_port("127.0.0.1:0")
        await fake.server.start()
        fake.url = f"grpc://127.0.0.1:{port}"
        return fake

    async def publish(self, request: bytes, context: Any) -> bytes:
        return await self.answer([PublishRequest.FromString(request).event.id], context)

    async def publish_batch(self, request: bytes, context: Any) -> bytes:
        batch = PublishBatchRequest.FromString(request).batch
        return await self.answer([e.id for e in batch.events], context)

    async def answer(self, ids: list[str], context: Any) -> bytes:
        self.calls.append((time.monotonic(), ids))
        if self.script:
            code, trailers = self.script.pop(0)
            await context.abort(code, "scripted failure", trailers)
        if self.hang:
            await self.release.wait()
        out: bytes = PublishResponse(ids=ids).SerializeToString()
        return out

    async def stop(self) -> None:
        self.release.set()
        await self.server.stop(0)


async def test_grpc_retries_unavailable_and_overloaded_with_the_same_id() -> None:
    overloaded = ((proto.REASON_KEY, proto.REASON_OVERLOADED), (proto.RETRY_AFTER_KEY, "1000"))
    fake = await FakeGrpcGateway.start([(grpc.StatusCode.UNAVAILABLE, ()),
                                        (grpc.StatusCode.RESOURCE_EXHAUSTED, overloaded)])
    try:
        async with AsyncPublisher(fake.url, transport="grpc", backoff_base=0.001, backoff_max=0.01) as pub:
            event_id = await pub.publish({"source": "/g", "type": "t.grpc"})
            ids = await pub.publish_batch([order(1), order(2)])
    finally:
        await fake.stop()
    assert [c[1] for c in fake.calls] == [[event_id]] * 3 + [["o-1", "o-2"]]
    assert fake.calls[2][0] - fake.calls[1][0] >= 0.9  # retry-after-ms 1000 honoured as a floor
    assert ids == ["o-1", "o-2"]


async def test_grpc_limit_is_not_retried_and_timeouts_are() -> None:
    limit = ((proto.REASON_KEY, proto.REASON_LIMIT), (proto.ATTRIBUTE_KEY, "subject"), (proto.INDEX_KEY, "0"))
    fake = await FakeGrpcGateway.start([(grpc.StatusCode.RESOURCE_EXHAUSTED, limit),
                                        (grpc.StatusCode.INTERNAL, ())], hang=True)
    try:
        async with AsyncPublisher(fake.url, transport="grpc", timeout=0.3, max_attempts=2,
                                  backoff_base=0.001) as pub:
            with pytest.raises(InvalidEventError) as limited:
                await pub.publish(order(1))
            with pytest.raises(PublishError) as internal:
                await pub.publish(order(2))
            with pytest.raises(PublishTimeout) as timed_out:
                await pub.publish(order(3))
    finally:
        await fake.stop()
    assert (limited.value.status, limited.value.attribute, limited.value.attempts) == ("RESOURCE_EXHAUSTED",
                                                                                        "subject", 1)
    assert type(internal.value) is PublishError and internal.value.status == "INTERNAL"
    assert timed_out.value.attempts == 2 and timed_out.value.status == "DEADLINE_EXCEEDED"
    assert [c[1] for c in fake.calls] == [["o-1"], ["o-2"], ["o-3"], ["o-3"]]


@pytest.mark.parametrize("transport", ["http", "grpc"])
async def test_connection_refused_is_retried_then_unavailable(transport: str) -> None:
    port = closed_port()
    url = f"127.0.0.1:{port}" if transport == "grpc" else f"http://127.0.0.1:{port}"
    async with AsyncPublisher(url, transport=transport,  # type: ignore[arg-type]
                              max_attempts=3, backoff_base=0.001, timeout=5) as pub:
        with pytest.raises(GatewayUnavailable) as caught:
            await pub.publish(order(1))
    assert caught.value.attempts == 3
    assert caught.value.cause is not None or caught.value.status == "UNAVAILABLE"
    if transport == "http":
        assert isinstance(caught.value.cause, httpx.ConnectError)

    def run() -> None:
        with Publisher(url, transport=transport, max_attempts=2, backoff_base=0.001) as pub:  # type: ignore[arg-type]
            pub.publish(order(2))

    with pytest.raises(GatewayUnavailable) as sync_caught:
        await asyncio.to_thread(run)
    assert sync_caught.value.attempts == 2


# ------------------------------------------------------------------------------------- units


def test_parse_retry_after() -> None:
    now = datetime(2024, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3", now) == 3.0
    assert parse_retry_after(" 1.5 ", now) == 1.5
    assert parse_retry_after("-4", now) == 0.0
    assert parse_retry_after("Mon, 01 Jan 2024 12:00:10 GMT", now) == 10.0
    assert parse_retry_after("Mon, 01 Jan 2024 11:00:00 GMT", now) == 0.0
    for bad in (None, "", "soon", "nan", "inf"):
        assert parse_retry_after(bad, now) is None


def test_backoff_is_full_jitter_capped_and_floored_by_retry_after() -> None:
    pub = Publisher("http://127.0.0.1:1", backoff_base=0.1, backoff_max=0.5, rng=random.Random(7))
    try:
        plain, floored = _Retry("busy"), _Retry("busy", retry_after=2.0)
        for retry in range(8):
            delays = [pub.policy.delay(retry, plain, 1, None) for _ in range(200)]
            cap = min(0.5, 0.1 * 2**retry)
            assert all(0 <= d <= cap for d in delays)
            assert max(delays) > cap * 0.8 and min(delays) < cap * 0.2  # spread over the whole range
            assert all(pub.policy.delay(retry, floored, 1, None) >= 2.0 for _ in range(20))
    finally:
        pub.close()


def test_prepare_copies_and_fills() -> None:
    original = Event({"source": "/p", "type": "t"}, {"a": 1})
    prepared = prepare(original)
    assert "id" not in original.attributes
    assert prepared.attributes["specversion"] == "1.0" and prepared.id and prepared.attributes["time"]
    assert prepare(prepared) == prepared  # already complete: unchanged, same id
    with pytest.raises(ValueError):
        Publisher("ftp://example.com")
    with pytest.raises(ValueError):
        Publisher("http://127.0.0.1:1", max_attempts=0)


def test_http_publisher_does_not_need_grpc() -> None:
    code = (
        "import sys; sys.modules['grpc'] = None; sys.modules['google.protobuf'] = None\n"
        "from umcef.fabric.sdk import Publisher\n"
        "Publisher('http://127.0.0.1:1').close()\n"
        "assert 'umcef.fabric.grpc_client' not in sys.modules\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
