"""gRPC ingress and client: a real gateway (durable answers, limits, draining) and a real grpc.aio server
around a small real `Pipeline` whose spool can be told to fail (status-code mapping)."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import grpc.aio
import orjson
import pytest

from tests.conftest import GatewayFactory
from umcef.fabric.dedup import DedupWindow
from umcef.fabric.errors import InvalidAttribute
from umcef.fabric.event import Event
from umcef.fabric.formats import proto
from umcef.fabric.formats.proto.cloudevents_pb2 import CloudEvent
from umcef.fabric.formats.proto.gateway_pb2 import PublishRequest, PublishResponse
from umcef.fabric.gateway import Gateway
from umcef.fabric.grpc_client import (
    AsyncGrpcGatewayClient,
    GrpcGatewayClient,
    GrpcInvalidEvent,
    GrpcLimitExceeded,
    GrpcOverloaded,
    GrpcPublishError,
    GrpcPublishResult,
    GrpcUnavailable,
)
from umcef.fabric.ingress.grpc_server import start_grpc_server
from umcef.fabric.limits import NO_LIMITS, Limits
from umcef.fabric.pipeline import Pipeline, PublishResult

TIMEOUT = 10.0


def order(n: int, **extra: Any) -> Event:
    attrs = {"specversion": "1.0", "id": f"o-{n}", "source": "/shop", "type": "com.example.order.placed",
             "datacontenttype": "application/json", **extra}
    return Event(attrs, {"orderId": n, "note": "grüße ✓"})


# -- against a real gateway --------------------------------------------------------------------------


async def grpc_gateway(make_gateway: GatewayFactory, **limits: int) -> Gateway:
    extra: dict[str, Any] = {"server": {"port": 0, "grpc_port": 0}}
    if limits:
        extra["limits"] = limits
    return await make_gateway(**extra)


def target(gateway: Gateway) -> str:
    return f"127.0.0.1:{gateway.endpoints.grpc_port}"


def stored(gateway: Gateway, topic: str = "default") -> list[dict[str, Any]]:
    return [orjson.loads(e.payload) for e in gateway.store.read(topic, 0, 100_000)]


async def test_publish_is_durable_when_answered(make_gateway: GatewayFactory) -> None:
    gateway = await grpc_gateway(make_gateway)
    ev = order(1, time="2024-05-01T12:34:56.123456Z", blob=b"\x00\xff", flag=True, count=-3)
    async with AsyncGrpcGatewayClient(target(gateway), timeout=TIMEOUT) as client:
        assert await client.publish([ev]) == ["o-1"]
    (got,) = stored(gateway)
    assert got["data"] == {"orderId": 1, "note": "grüße ✓"}
    assert got["time"] == "2024-05-01T12:34:56.123456Z"
    assert (got["blob"], got["flag"], got["count"]) == ("AP8=", True, -3)  # binary attributes as base64


async def test_batch_lands_in_order_and_duplicates_are_counted(make_gateway: GatewayFactory) -> None:
    gateway = await grpc_gateway(make_gateway)
    events = [order(i) for i in range(40)]
    async with AsyncGrpcGatewayClient(target(gateway), timeout=TIMEOUT) as client:
        first = await client.publish_result(events)
        again = await client.publish_result([*events[:5], order(99)])
        assert await client.publish([]) == []
    assert first.ids == [e.id for e in events] and first.duplicates == 0
    assert again.ids == ["o-0", "o-1", "o-2", "o-3", "o-4", "o-99"] and again.duplicates == 5
    assert [e["id"] for e in stored(gateway)] == [e.id for e in events] + ["o-99"]


async def test_sync_client(make_gateway: GatewayFactory) -> None:
    gateway = await grpc_gateway(make_gateway)

    def run() -> tuple[list[str], list[str]]:
        metadata = [("authorization", "Bearer t0ken")]  # passed through on every call
        with GrpcGatewayClient(target(gateway), timeout=TIMEOUT, metadata=metadata) as client:
            return client.publish([order(1)]), client.publish([order(2), order(3)])

    # The server shares this event loop, so the blocking client runs in a thread.
    assert await asyncio.to_thread(run) == (["o-1"], ["o-2", "o-3"])
    assert [e["id"] for e in stored(gateway)] == ["o-1", "o-2", "o-3"]


async def test_sync_client_maps_errors(make_gateway: GatewayFactory) -> None:
    gateway = await grpc_gateway(make_gateway)

    def run() -> GrpcPublishError:
        with GrpcGatewayClient(target(gateway), timeout=TIMEOUT) as client, \
                pytest.raises(GrpcInvalidEvent) as err:
            client.publish([order(1, dataschema="relative")])
        return err.value

    error = await asyncio.to_thread(run)
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and error.attribute == "dataschema"


async def test_invalid_event_names_the_attribute_and_index(make_gateway: GatewayFactory) -> None:
    gateway = await grpc_gateway(make_gateway)
    async with AsyncGrpcGatewayClient(target(gateway), timeout=TIMEOUT) as client:
        with pytest.raises(GrpcInvalidEvent) as err:
            await client.publish([order(1, dataschema="not-absolute")])
        assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT
        assert (err.value.attribute, err.value.index) == ("dataschema", None)
        assert "dataschema" in err.value.message and not err.value.retryable

        with pytest.raises(GrpcInvalidEvent) as err:
            await client.publish([order(1), order(2), order(3, subject="")])
        assert (err.value.attribute, err.value.index) == ("subject", 2)
        assert err.value.message == "event[2]: attribute 'subject': must be a non-empty string"

        with pytest.raises(InvalidAttribute) as local:  # protobuf cannot carry it: raised before sending
            await client.publish([order(1, time="2024-13-01T00:00:00Z")])
        assert local.value.attribute == "time"
    assert stored(gateway) == []


async def test_batch_and_message_limits_are_resource_exhausted(make_gateway: GatewayFactory) -> None:
    gateway = await grpc_gateway(make_gateway, max_batch=3, max_body_bytes=4096, max_attribute_bytes=100)
    async with AsyncGrpcGatewayClient(target(gateway), timeout=TIMEOUT) as client:
        with pytest.raises(GrpcLimitExceeded) as err:
            await client.publish([order(i) for i in range(4)])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not err.value.retryable
        assert "limit of 3" in err.value.message

        with pytest.raises(GrpcLimitExceeded) as err:  # refused by grpc before decoding
            await client.publish([Event(order(1).attributes, b"x" * 5000)])
        assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and not err.value.retryable

        with pytest.raises(GrpcInvalidEvent) as err:  # per-attribute size is a validation error
            await client.publish([order(1, note="x" * 101)])
        assert err.value.attribute == "note"

        assert await client.publish([order(i) for i in range(3)]) == ["o-0", "o-1", "o-2"]


async def test_draining_gateway_is_unavailable(make_gateway: GatewayFactory) -> None:
    gateway = await grpc_gateway(make_gateway)
    async with AsyncGrpcGatewayClient(target(gateway), timeout=TIMEOUT) as client:
        gateway.pipeline.closing = True
        with pytest.raises(GrpcUnavailable) as err:
            await client.publish([order(1)])
        assert err.value.retryable and err.value.code == grpc.StatusCode.UNAVAILABLE
        await gateway.stop()
        with pytest.raises(GrpcUnavailable):  # nobody listening any more
            await client.publish([order(2)], timeout=2.0)


async def test_malformed_request_is_invalid_argument_not_internal(make_gateway: GatewayFactory) -> None:
    gateway = await grpc_gateway(make_gateway)
    async with grpc.aio.insecure_channel(target(gateway)) as channel:
        for method in (proto.PUBLISH_METHOD, proto.PUBLISH_BATCH_METHOD):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await channel.unary_unary(method)(b"\xff\xff\xff", timeout=TIMEOUT)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.unary_unary(proto.PUBLISH_METHOD)(b"", timeout=TIMEOUT)  # no event at all
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "event is missing" in (err.value.details() or "")


async def test_generated_stub_interoperates(make_gateway: GatewayFactory) -> None:
    from umcef.fabric.formats.proto.gateway_pb2_grpc import GatewayStub

    gateway = await grpc_gateway(make_gateway)
    msg = CloudEvent(id="stub-1", source="/stub", spec_version="1.0", type="t.stub", text_data="hi")
    msg.attributes["datacontenttype"].ce_string = "text/plain"
    async with grpc.aio.insecure_channel(target(gateway)) as channel:
        response = await GatewayStub(channel).Publish(PublishRequest(event=msg), timeout=TIMEOUT)
    assert response == PublishResponse(ids=["stub-1"], duplicates=0)
    assert stored(gateway)[0]["data"] == "hi"


# -- a grpc.aio server around a small real pipeline ----------------------------------------------------


@dataclass
class RecordingSpool:
    events: list[Event] = field(default_factory=list)
    fail: BaseException | None = None
    gate: asyncio.Event | None = None

    async def write(self, events: Sequence[Event], destinations: Sequence[tuple[str, ...]]) -> None:
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        self.events.extend(events)


class EverythingToDefault:
    def route(self, event: Event) -> tuple[str, ...]:
        return ("default",)


@dataclass
class Served:
    pipeline: Pipeline
    spool: RecordingSpool
    port: int
    server: grpc.aio.Server

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"


@pytest.fixture
async def served() -> AsyncIterator[Served]:
    spool = RecordingSpool()
    pipeline = Pipeline(DedupWindow(60.0), EverythingToDefault(), spool, NO_LIMITS, max_in_flight=4)
    server, port = await start_grpc_server(pipeline, "127.0.0.1", 0, NO_LIMITS)
    yield Served(pipeline, spool, port, server)
    await server.stop(None)


async def test_port_zero_picks_a_free_port_and_a_taken_port_fails(served: Served) -> None:
    assert served.port > 0
    with pytest.raises(OSError, match="cannot listen"):
        await start_grpc_server(served.pipeline, "127.0.0.1", served.port, NO_LIMITS)
    with socket.socket() as probe:  # and the bound port really is ours
        assert probe.connect_ex(("127.0.0.1", served.port)) == 0


async def wait_in_flight(pipeline: Pipeline, count: int) -> None:
    for _ in range(500):  # poll with a deadline
        if pipeline.in_flight == count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{pipeline.in_flight} events in flight, expected {count}")


async def test_backpressure_is_retryable_resource_exhausted(served: Served) -> None:
    served.spool.gate = asyncio.Event()
    async with AsyncGrpcGatewayClient(served.target, timeout=TIMEOUT) as client:
        held = asyncio.create_task(client.publish([order(0)]))
        await wait_in_flight(served.pipeline, 1)
        with pytest.raises(GrpcOverloaded) as err:
            await client.publish([order(i) for i in range(1, 5)])  # 1 + 4 > max_in_flight
        served.spool.gate.set()
        assert await held == ["o-0"]
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert err.value.retryable and err.value.retry_after == 1.0
    assert [e.id for e in served.spool.events] == ["o-0"]


async def test_concurrent_publishes_beyond_capacity_shed_load(served: Served) -> None:
    served.spool.gate = asyncio.Event()
    async with AsyncGrpcGatewayClient(served.target, timeout=TIMEOUT) as client:
        held = [asyncio.create_task(client.publish([order(i)])) for i in range(4)]
        await wait_in_flight(served.pipeline, 4)
        with pytest.raises(GrpcOverloaded):
            await client.publish([order(9)])
        served.spool.gate.set()
        assert [ids for ids in await asyncio.gather(*held)] == [[f"o-{i}"] for i in range(4)]
    assert sorted(e.id for e in served.spool.events) == ["o-0", "o-1", "o-2", "o-3"]


async def test_a_pipeline_bug_is_internal_and_the_retry_is_not_a_duplicate(served: Served) -> None:
    served.spool.fail = RuntimeError("disk on fire")
    async with AsyncGrpcGatewayClient(served.target, timeout=TIMEOUT) as client:
        with pytest.raises(GrpcPublishError) as err:
            await client.publish([order(1)])
        assert err.value.code == grpc.StatusCode.INTERNAL and not err.value.retryable
        assert "disk on fire" not in err.value.message  # details stay in the gateway log
        served.spool.fail = None
        assert await client.publish_result([order(1)]) == GrpcPublishResult(["o-1"], 0)
    assert [e.id for e in served.spool.events] == ["o-1"]


async def test_a_call_without_a_request_message_is_invalid_and_holds_nothing(served: Served) -> None:
    async def nothing() -> Any:
        return
        yield b""

    async with grpc.aio.insecure_channel(served.target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await channel.stream_unary(proto.PUBLISH_METHOD)(nothing())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "the call carried no request message"
    assert served.pipeline.in_flight_bytes == 0


async def test_errors_raised_by_the_pipeline_are_mapped() -> None:
    class Rejecting:
        closing = False

        async def publish(self, events: list[Event], size: int = 0) -> PublishResult:
            raise InvalidAttribute("not allowed here", "tenant", 1)

        def holding(self, size: int) -> Any:
            return Pipeline(DedupWindow(60.0), EverythingToDefault(), RecordingSpool(), NO_LIMITS).holding(size)

    server, port = await start_grpc_server(Rejecting(), "127.0.0.1", 0, Limits())
    try:
        async with AsyncGrpcGatewayClient(f"127.0.0.1:{port}", timeout=TIMEOUT) as client:
            with pytest.raises(GrpcInvalidEvent) as err:
                await client.publish([order(1), order(2)])
    finally:
        await server.stop(None)
    assert (err.value.attribute, err.value.index) == ("tenant", 1)
    assert err.value.message == "event[1]: attribute 'tenant': not allowed here"


async def test_unicode_attribute_names_and_huge_errors_reach_the_client(served: Served) -> None:
    async with AsyncGrpcGatewayClient(served.target, timeout=TIMEOUT) as client:
        with pytest.raises(GrpcInvalidEvent) as err:
            await client.publish([order(1, **{"grüße": "x"})])
        assert err.value.attribute == "grüße"
        with pytest.raises(GrpcInvalidEvent) as err:  # the message quotes the value: it is cut short
            await client.publish([order(1, dataschema="x" * 100_000)])
        assert err.value.attribute == "dataschema" and len(err.value.message) <= 1024


async def test_unicode_and_binary_data_survive(served: Served) -> None:
    events = [
        Event({**order(1).attributes, "datacontenttype": "text/plain"}, "Grüße 世界 🌍"),
        Event({**order(2).attributes, "datacontenttype": "application/octet-stream"}, bytes(range(256))),
        Event({**order(3).attributes, "subject": "ünïcödé 👩‍👩‍👧"}, ["a", 1, None]),
    ]
    async with AsyncGrpcGatewayClient(served.target, timeout=TIMEOUT) as client:
        assert await client.publish(events) == ["o-1", "o-2", "o-3"]
    assert served.spool.events == events


async def test_client_deadline(served: Served) -> None:
    served.spool.gate = asyncio.Event()
    async with AsyncGrpcGatewayClient(served.target, timeout=0.2) as client:
        with pytest.raises(GrpcPublishError) as err:
            await client.publish([order(1)])
    assert err.value.code == grpc.StatusCode.DEADLINE_EXCEEDED and err.value.retryable
    served.spool.gate.set()
