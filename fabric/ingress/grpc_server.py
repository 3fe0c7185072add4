"""gRPC ingress (grpc.aio): the `umcef.v1.Gateway` service of `fabric/formats/proto/gateway.proto`.

A response is sent only after every event of the request is durable (the pipeline returns then).

Both RPCs are unary on the wire but served as client-streaming handlers, which grpc calls before the
request message is read: each call first holds `max_body_bytes` against `backpressure.max_in_flight_bytes`
(its size is not known yet, as for a chunked HTTP body), so calls beyond the budget are refused before
they are read, decoded and published; once read, the request holds its real size. So
`max_in_flight_bytes / max_body_bytes` bounds how many calls are handled at once (64 at the defaults; the
gateway warns at start when it is below 8). grpc itself still receives a refused call's message (its flow
control grants the window for the whole message): under a flood, memory is bounded per connection, a
message or two each (docs/delivery.md). A call whose message does not arrive within
`BODY_READ_SECONDS` ends with DEADLINE_EXCEEDED and lets its bytes go.

Status codes: INVALID_ARGUMENT for an unacceptable request (the message names the attribute and, in a
batch, the index); RESOURCE_EXHAUSTED for a size/count limit and for backpressure (told apart by the
`umcef-reason` trailing metadata); UNAVAILABLE while the gateway drains; INTERNAL only for a bug.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from typing import Any, NamedTuple, Protocol, TypeAlias
from urllib.parse import quote

import grpc
import grpc.aio

from umcef.fabric.errors import EventError, LimitExceeded, MalformedBody
from umcef.fabric.event import Event
from umcef.fabric.formats import proto
from umcef.fabric.formats.proto.gateway_pb2 import PublishResponse
from umcef.fabric.formats.protobuf_format import decode, decode_batch, unwrap
from umcef.fabric.limits import BODY_READ_SECONDS, Limits
from umcef.fabric.pipeline import BytesHold, Overloaded, PublishResult, ShuttingDown

log = logging.getLogger("umcef.grpc")

Context: TypeAlias = grpc.aio.ServicerContext[bytes, bytes]

# Status details travel in an HTTP/2 trailer; clients refuse metadata beyond ~8 KiB by default, and an
# error quoting a huge bad value must still reach them as that error.
_MAX_DETAILS = 1024


class Publisher(Protocol):
    """What the ingress needs of `umcef.fabric.pipeline.Pipeline`."""

    closing: bool

    async def publish(self, events: list[Event], size: int = 0) -> PublishResult: ...

    def holding(self, size: int) -> AbstractContextManager[BytesHold]: ...


class GatewayService:
    """The two RPCs. Requests arrive as raw bytes: a malformed message is then our INVALID_ARGUMENT, not
    grpc's INTERNAL "Exception deserializing request", and the events go through the fast decoder."""

    def __init__(self, pipeline: Publisher, limits: Limits) -> None:
        self.pipeline = pipeline
        self.limits = limits

    async def admit(self, rpc: Callable[[bytes], Awaitable[bytes | _Status]], context: Context) -> bytes | _Status:
        """Hold the largest allowed request's bytes, read the request, then hold what it really is while
        `rpc` publishes it (its bytes are passed on as 0: they are held here). A refusal is returned."""
        pipeline = self.pipeline
        if pipeline.closing:  # (before holding and reading what would only be refused)
            return _Status(grpc.StatusCode.UNAVAILABLE, "the gateway is shutting down", proto.REASON_SHUTTING_DOWN)
        try:
            with pipeline.holding(self.limits.max_body_bytes) as held:
                try:
                    async with asyncio.timeout(BODY_READ_SECONDS):
                        request = await context.read()
                except TimeoutError:
                    return _Status(grpc.StatusCode.DEADLINE_EXCEEDED,
                                   f"the request did not arrive within {BODY_READ_SECONDS:g} s")
                if not isinstance(request, bytes):
                    if context.cancelled() or context.done():  # gone (cancelled, or grpc refused it as oversized)
                        return _EMPTY_RESPONSE  # (reaches no one)
                    return _Status(grpc.StatusCode.INVALID_ARGUMENT, "the call carried no request message",
                                   proto.REASON_INVALID)  # the client half-closed without one
                held.resize(len(request))
                return await rpc(request)
        except Overloaded as exc:  # (from the hold: `rpc` returns the pipeline's own refusals)
            return _overloaded(exc)

    async def publish(self, request: bytes) -> bytes | _Status:
        limits = self.limits
        try:
            body = unwrap(request, "umcef.v1.PublishRequest")
            if not body:
                raise MalformedBody("PublishRequest.event is missing")
            events = [decode(body, limits.max_attributes, limits.max_attribute_bytes)]
        except EventError as exc:
            return _for_event_error(exc)
        return await self._publish(events)

    async def publish_batch(self, request: bytes) -> bytes | _Status:
        limits = self.limits
        try:
            body = unwrap(request, "umcef.v1.PublishBatchRequest")
            events = decode_batch(body, limits.max_batch, limits.max_attributes, limits.max_attribute_bytes)
        except EventError as exc:
            return _for_event_error(exc)
        return await self._publish(events) if events else _EMPTY_RESPONSE

    async def _publish(self, events: list[Event]) -> bytes | _Status:
        try:
            result = await self.pipeline.publish(events)  # (the request's bytes are held by `admit`)
        except EventError as exc:
            return _for_event_error(exc)
        except Overloaded as exc:
            return _overloaded(exc)
        except ShuttingDown as exc:
            return _Status(grpc.StatusCode.UNAVAILABLE, str(exc), proto.REASON_SHUTTING_DOWN)
        except Exception:
            # A bug, not bad input: keep the traceback in our log, not in the client's face.
            log.exception("gRPC publish of %d event(s) failed", len(events))
            return _Status(grpc.StatusCode.INTERNAL, "internal error; see the gateway log")
        out: bytes = PublishResponse(ids=result.ids, duplicates=len(result.duplicates)).SerializeToString()
        return out


class _Status(NamedTuple):
    """A refusal: the status a call ends with."""

    code: grpc.StatusCode
    details: str
    reason: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()


_EMPTY_RESPONSE: bytes = PublishResponse().SerializeToString()


def _overloaded(exc: Overloaded) -> _Status:
    retry_ms = max(0, round(exc.retry_after * 1000))
    return _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc), proto.REASON_OVERLOADED,
                   ((proto.RETRY_AFTER_KEY, str(retry_ms)),))


def _for_event_error(exc: EventError) -> _Status:
    metadata: list[tuple[str, str]] = []
    if exc.attribute:
        metadata.append((proto.ATTRIBUTE_KEY, quote(exc.attribute, safe="")))
    if exc.index is not None:
        metadata.append((proto.INDEX_KEY, str(exc.index)))
    if isinstance(exc, LimitExceeded):
        return _Status(grpc.StatusCode.RESOURCE_EXHAUSTED, exc.describe(), proto.REASON_LIMIT, tuple(metadata))
    return _Status(grpc.StatusCode.INVALID_ARGUMENT, exc.describe(), proto.REASON_INVALID, tuple(metadata))


def _abort_args(status: _Status) -> tuple[grpc.StatusCode, str, tuple[tuple[str, str], ...]]:
    """`context.abort`'s arguments; the details cut short (an error may quote a huge bad value)."""
    details = status.details
    if len(details) > _MAX_DETAILS:
        details = details[: _MAX_DETAILS - 3] + "..."
    trailing = ((proto.REASON_KEY, status.reason), *status.metadata) if status.reason else status.metadata
    return status.code, details, trailing


def generic_handler(service: GatewayService) -> Any:
    """The service's handlers for `grpc.aio.Server.add_generic_rpc_handlers` (bytes in, bytes out)."""
    def admitted(rpc: Callable[[bytes], Awaitable[bytes | _Status]]) -> Any:
        async def handle(_requests: Any, context: Context) -> bytes:
            # The abort is raised here, once the frames that held the request have returned: grpc keeps an
            # aborted call's exception in a reference cycle, and through its traceback every frame it passed
            # and their locals (the request, its decoded events) until the next full garbage collection;
            # under a flood of refused 4 MiB calls that was hundreds of MiB.
            outcome = await service.admit(rpc, context)
            if isinstance(outcome, bytes):
                return outcome
            code, details, trailing = _abort_args(outcome)
            del outcome  # (its details may quote a large value in full)
            await context.abort(code, details, trailing)
            raise AssertionError("unreachable: ServicerContext.abort raises")  # for type checkers

        return grpc.stream_unary_rpc_method_handler(handle)

    return grpc.method_handlers_generic_handler(proto.SERVICE, {
        "Publish": admitted(service.publish),
        "PublishBatch": admitted(service.publish_batch),
    })


async def start_grpc_server(
    pipeline: Publisher,
    host: str,
    port: int,
    limits: Limits,
    credentials: grpc.ServerCredentials | None = None,
) -> tuple[grpc.aio.Server, int]:
    """Start serving on `host:port` (port 0 picks a free one); return the server and the bound port.

    Stop it with `await server.stop(grace)`: new calls are refused while in-flight ones finish.
    """
    options = [
        # Bigger messages are refused by grpc itself with RESOURCE_EXHAUSTED before any decoding.
        ("grpc.max_receive_message_length", limits.max_body_bytes or -1),
        # Without this Linux lets a second server bind the same port and silently share the traffic.
        ("grpc.so_reuseport", 0),
    ]
    server = grpc.aio.server(options=options)
    server.add_generic_rpc_handlers((generic_handler(GatewayService(pipeline, limits)),))
    address = f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
    try:
        if credentials is None:
            bound: int = server.add_insecure_port(address)
        else:
            bound = server.add_secure_port(address, credentials)
    except RuntimeError as exc:  # grpc reports a failed bind this way
        raise OSError(f"gRPC ingress cannot listen on {address}: {exc}") from None
    if bound == 0:  # older grpc versions return 0 instead of raising
        raise OSError(f"gRPC ingress cannot listen on {address}")
    await server.start()
    log.info("gRPC ingress listening on %s", f"{host}:{bound}")
    return server, bound
