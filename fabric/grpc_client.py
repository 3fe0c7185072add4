"""A thin gRPC client for the gateway's `umcef.v1.Gateway` service, sync and async.

`publish(events)` returns the event ids once the gateway has made every event durable. Failures raise
`GrpcPublishError` subclasses carrying the status code, whether a retry can help, and — for a bad
event — the attribute and batch index the gateway named. Retrying a publish is safe: the gateway
deduplicates on (`source`, `id`), so a retried event that did land is reported as a duplicate.
An event protobuf cannot carry (a malformed `time`, an integer beyond 32 bits) raises
`umcef.fabric.errors.InvalidAttribute` before anything is sent.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import unquote

import grpc
import grpc.aio

from umcef.fabric.event import Event
from umcef.fabric.formats import proto
from umcef.fabric.formats.proto.gateway_pb2 import PublishBatchRequest, PublishRequest, PublishResponse
from umcef.fabric.formats.protobuf_format import fill_batch, fill_message

DEFAULT_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class GrpcPublishResult:
    ids: list[str]
    duplicates: int  # how many of `ids` the gateway had already accepted earlier


class GrpcPublishError(Exception):
    """A publish the gateway (or the transport) refused. `retryable`: the same call may succeed later."""

    retryable = False

    def __init__(self, code: grpc.StatusCode, message: str, attribute: str | None = None,
                 index: int | None = None, retry_after: float | None = None) -> None:
        self.code = code
        self.message = message
        self.attribute = attribute
        self.index = index
        self.retry_after = retry_after
        super().__init__(f"{getattr(code, 'name', code)}: {message}")


class GrpcInvalidEvent(GrpcPublishError):
    """INVALID_ARGUMENT: an event is not acceptable; `attribute`/`index` say which."""


class GrpcLimitExceeded(GrpcPublishError):
    """RESOURCE_EXHAUSTED for a size or count limit: split the batch or shrink the event."""


class GrpcOverloaded(GrpcPublishError):
    """RESOURCE_EXHAUSTED for backpressure: retry after `retry_after` seconds."""

    retryable = True


class GrpcUnavailable(GrpcPublishError):
    """UNAVAILABLE: the gateway is unreachable or draining."""

    retryable = True


class GrpcDeadlineExceeded(GrpcPublishError):
    """DEADLINE_EXCEEDED: no answer in time; the events may or may not be durable (retry is safe)."""

    retryable = True


def error_from_rpc(exc: Any) -> GrpcPublishError:
    """Map a failed call (sync `grpc.RpcError` or `grpc.aio.AioRpcError`; their metadata types differ,
    both iterate as (key, value) pairs) to a typed error."""
    code = exc.code()
    message = exc.details() or ""
    meta: dict[str, str] = {}
    for key, value in exc.trailing_metadata() or ():
        meta[key] = value if isinstance(value, str) else value.decode("latin-1")
    reason = meta.get(proto.REASON_KEY)
    attribute = unquote(meta[proto.ATTRIBUTE_KEY]) if proto.ATTRIBUTE_KEY in meta else None
    index = int(meta[proto.INDEX_KEY]) if meta.get(proto.INDEX_KEY, "").isdigit() else None
    retry_ms = meta.get(proto.RETRY_AFTER_KEY, "")
    retry_after = int(retry_ms) / 1000 if retry_ms.isdigit() else None
    kind: type[GrpcPublishError] = GrpcPublishError
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        kind = GrpcInvalidEvent
    elif code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # Only the gateway's backpressure is retryable; grpc's own "message larger than max" is a limit.
        kind = GrpcOverloaded if reason == proto.REASON_OVERLOADED else GrpcLimitExceeded
    elif code == grpc.StatusCode.UNAVAILABLE:
        kind = GrpcUnavailable
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        kind = GrpcDeadlineExceeded
    return kind(code, message, attribute, index, retry_after)


def encode_request(events: Sequence[Event]) -> tuple[str, bytes]:
    """The method and serialized request for `events`: Publish for one, PublishBatch for several."""
    if len(events) == 1:
        single = PublishRequest()
        fill_message(single.event, events[0])
        body: bytes = single.SerializeToString()
        return proto.PUBLISH_METHOD, body
    batch = PublishBatchRequest()
    fill_batch(batch.batch, events)
    body = batch.SerializeToString()
    return proto.PUBLISH_BATCH_METHOD, body


def decode_response(body: bytes) -> GrpcPublishResult:
    response = PublishResponse.FromString(body)
    return GrpcPublishResult(list(response.ids), response.duplicates)


def _options(max_message_bytes: int | None) -> list[tuple[str, Any]]:
    if max_message_bytes is None:
        return []
    return [("grpc.max_send_message_length", max_message_bytes)]


class AsyncGrpcGatewayClient:
    """asyncio client. `target` is `host:port`; pass `credentials` for TLS and `metadata` (lower-case
    keys) for headers such as authorization. `timeout` is the per-call deadline in seconds."""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT,
                 credentials: grpc.ChannelCredentials | None = None, wait_for_ready: bool = False,
                 max_message_bytes: int | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.metadata = tuple(metadata) if metadata else None  # sent with every call (e.g. auth)
        options = _options(max_message_bytes)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=options)
        self._publish: Any = self._channel.unary_unary(proto.PUBLISH_METHOD)
        self._publish_batch: Any = self._channel.unary_unary(proto.PUBLISH_BATCH_METHOD)

    async def publish(self, events: Sequence[Event], timeout: float | None = None) -> list[str]:
        return (await self.publish_result(events, timeout)).ids

    async def publish_result(
        self, events: Sequence[Event], timeout: float | None = None
    ) -> GrpcPublishResult:
        if not events:
            return GrpcPublishResult([], 0)
        method, body = encode_request(events)
        call = self._publish if method == proto.PUBLISH_METHOD else self._publish_batch
        try:
            response = await call(body, timeout=self.timeout if timeout is None else timeout,
                                  metadata=self.metadata, wait_for_ready=self.wait_for_ready)
        except grpc.aio.AioRpcError as exc:
            raise error_from_rpc(exc) from None
        return decode_response(response)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncGrpcGatewayClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()


class GrpcGatewayClient:
    """Blocking client (a grpc thread-safe channel; share one per process)."""

    def __init__(self, target: str, *, timeout: float = DEFAULT_TIMEOUT,
                 credentials: grpc.ChannelCredentials | None = None, wait_for_ready: bool = False,
                 max_message_bytes: int | None = None,
                 metadata: Sequence[tuple[str, str]] | None = None) -> None:
        self.timeout = timeout
        self.wait_for_ready = wait_for_ready
        self.metadata = tuple(metadata) if metadata else None  # sent with every call (e.g. auth)
        options = _options(max_message_bytes)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=options)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=options)
        self._publish: Any = self._channel.unary_unary(proto.PUBLISH_METHOD)
        self._publish_batch: Any = self._channel.unary_unary(proto.PUBLISH_BATCH_METHOD)

    def publish(self, events: Sequence[Event], timeout: float | None = None) -> list[str]:
        return self.publish_result(events, timeout).ids

    def publish_result(self, events: Sequence[Event], timeout: float | None = None) -> GrpcPublishResult:
        if not events:
            return GrpcPublishResult([], 0)
        method, body = encode_request(events)
        call = self._publish if method == proto.PUBLISH_METHOD else self._publish_batch
        try:
            response = call(body, timeout=self.timeout if timeout is None else timeout,
                            metadata=self.metadata, wait_for_ready=self.wait_for_ready)
        except grpc.RpcError as exc:
            raise error_from_rpc(exc) from None
        return decode_response(response)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> GrpcGatewayClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
