"""Publisher SDK: send CloudEvents to a UMCEF gateway over HTTP or gRPC, with safe retries.

```python
from umcef.fabric.sdk import Publisher

with Publisher("http://127.0.0.1:8080") as pub:
    event_id = pub.publish({"source": "/orders", "type": "order.created", "data": {"n": 1}})
```

`AsyncPublisher` is the same API with `await`. Events may be our `Event`, an official `cloudevents`
SDK event (anything with `get_attributes()` / `get_data()`), or a plain dict in the shape of the
structured JSON mode (attributes plus `data` or `data_base64`).

Idempotency: `id`, `time` and `specversion` are filled in *before* the first attempt and the request
is encoded once, so every retry sends byte-identical content with the same id; the gateway
deduplicates on (`source`, `id`), so a retry after a lost response never stores the event twice.
The caller's objects are never modified: to retry on your own after `GatewayUnavailable`, call
`prepare()` first and publish the returned event (it keeps its id).

Retries: HTTP 429/502/503/504, gRPC UNAVAILABLE / RESOURCE_EXHAUSTED (overloaded) / DEADLINE_EXCEEDED,
connection errors and timeouts are retried up to `max_attempts` times in all, sleeping
`random.uniform(0, min(backoff_max, backoff_base * 2**retry))` (full jitter) between attempts, but never
less than the server's `Retry-After`. A `Retry-After` longer than `max_retry_after` fails at once
rather than blocking the caller. Other 4xx answers are not retried (`InvalidEventError`).

Exceptions: `PublishError` is the base. `InvalidEventError` (rejected, locally or with a 4xx),
`GatewayUnavailable` (retries exhausted; carries the last status and cause), `PublishTimeout` (a
`GatewayUnavailable` whose last attempt timed out, or whose `deadline` ran out; the event may or may
not have been accepted — publishing it again with the same id is safe).

The HTTP transport needs only `httpx` and `orjson`; gRPC needs the `grpc` extra and is imported
only when `transport="grpc"` is chosen.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import email.utils
import math
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, Protocol

import httpx
import orjson

from umcef.fabric.accel import validate_attributes
from umcef.fabric.bindings import http as http_binding
from umcef.fabric.errors import EventError
from umcef.fabric.event import Event, fill_defaults

if TYPE_CHECKING:  # grpc is an optional extra: imported only when transport="grpc" is chosen
    from umcef.fabric.grpc_client import GrpcPublishError

__all__ = [
    "AsyncPublisher",
    "GatewayUnavailable",
    "InvalidEventError",
    "PublishError",
    "PublishTimeout",
    "Publisher",
    "parse_retry_after",
    "prepare",
]

EVENTS_PATH = "/v1/events"
USER_AGENT = "umcef-sdk-python/0.1"
RETRY_STATUSES = frozenset({429, 502, 503, 504})

Transport = Literal["http", "grpc"]
Mode = Literal["binary", "structured"]


# --------------------------------------------------------------------------------------------- errors


class PublishError(Exception):
    """Base of every error the publisher raises. `status` is the last HTTP status (or gRPC code name)."""

    def __init__(self, message: str, *, status: int | str | None = None, attempts: int = 0) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class InvalidEventError(PublishError):
    """The event (or request) was refused: by local validation (`status` None) or by a 4xx/INVALID_ARGUMENT.

    `attribute` names the offending attribute and `index` the event within a batch, when known.
    `problem` is the gateway's RFC 9457 problem document, when it sent one.
    """

    def __init__(self, detail: str, *, status: int | str | None = None, attribute: str | None = None,
                 index: int | None = None, problem: Mapping[str, Any] | None = None,
                 attempts: int = 0) -> None:
        where = f"event[{index}]: " if index is not None and f"event[{index}]" not in detail else ""
        what = f"attribute '{attribute}': " if attribute and f"'{attribute}'" not in detail else ""
        code = f" (status {status})" if status is not None else ""
        super().__init__(f"{where}{what}{detail}{code}", status=status, attempts=attempts)
        self.detail = detail
        self.attribute = attribute
        self.index = index
        self.problem = dict(problem) if problem is not None else None


class GatewayUnavailable(PublishError):
    """The gateway could not be reached or kept refusing with a retryable answer until retries ran out.

    `cause` is the last transport exception (None when the last attempt got an answer), `retry_after`
    the last delay the server asked for.
    """

    def __init__(self, message: str, *, status: int | str | None = None, cause: BaseException | None = None,
                 retry_after: float | None = None, attempts: int = 0) -> None:
        super().__init__(message, status=status, attempts=attempts)
        self.cause = cause
        self.retry_after = retry_after


class PublishTimeout(GatewayUnavailable):
    """No answer in time (per-attempt `timeout` on the last attempt, or the overall `deadline`).

    The outcome is unknown: the gateway may have stored the event. Publishing the same event again
    (same `source` and `id`) is safe: the gateway deduplicates it.
    """


# ------------------------------------------------------------------------------------------ events


def prepare(obj: Any, index: int | None = None) -> Event:
    """A validated copy of `obj` as an `Event`, with `id`, `time` and `specversion` filled in.

    Accepts an `Event`, an official `cloudevents` SDK event (duck-typed on `get_attributes()` and
    `get_data()`) or a structured-mode dict. `datetime` attribute values become RFC 3339 strings and
    `None` values are dropped (JSON format: null means absent). Raises `InvalidEventError` naming the
    attribute (and `index`, when given) and `TypeError` for an object that is no event at all.
    An `Event` that already has an id keeps it, so `publish(prepare(e))` can be repeated safely.
    """
    data: Any
    if isinstance(obj, Event):
        attrs = dict(obj.attributes)
        data = obj.data
    elif isinstance(obj, Mapping):
        attrs = dict(obj)
        data = None
        if "data" in attrs:
            data = attrs.pop("data")
            if "data_base64" in attrs:
                raise InvalidEventError("an event carries either 'data' or 'data_base64', not both",
                                        attribute="data_base64", index=index)
        elif "data_base64" in attrs:
            data = _b64decode(attrs.pop("data_base64"), index)
    elif callable(getattr(obj, "get_attributes", None)) and callable(getattr(obj, "get_data", None)):
        attrs = dict(obj.get_attributes())
        data = obj.get_data()
    else:
        raise TypeError(f"cannot publish a {type(obj).__name__}: expected an umcef Event, a cloudevents "
                        "CloudEvent or a dict of attributes")
    for name in [k for k, v in attrs.items() if v is None]:
        del attrs[name]
    for name, value in attrs.items():
        if not isinstance(name, str):
            raise InvalidEventError(f"attribute names must be strings, got {name!r}", index=index)
        if isinstance(value, datetime):
            attrs[name] = _rfc3339(name, value, index)
    if data is not None and not isinstance(data, bytes | bytearray | str | dict | list | int | float):
        raise InvalidEventError(f"data must be bytes, str or a JSON value, got {type(data).__name__}",
                                attribute="data", index=index)
    if isinstance(data, bytearray):
        data = bytes(data)
    fill_defaults(attrs)
    try:
        validate_attributes(attrs)
    except EventError as exc:
        raise InvalidEventError(exc.reason, attribute=exc.attribute, index=index) from None
    return Event(attrs, data)


def _b64decode(value: Any, index: int | None) -> bytes:
    if not isinstance(value, str | bytes):
        raise InvalidEventError("must be a base64 string", attribute="data_base64", index=index)
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidEventError("is not valid base64", attribute="data_base64", index=index) from None


def _rfc3339(name: str, value: datetime, index: int | None) -> str:
    if value.tzinfo is None or value.utcoffset() is None:
        raise InvalidEventError("a timestamp must be timezone-aware (naive datetime given)",
                                attribute=name, index=index)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


# ----------------------------------------------------------------------------------- retry policy


def parse_retry_after(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a `Retry-After` value: delta-seconds or an HTTP-date. None when absent/bad."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())
    return max(0.0, seconds) if math.isfinite(seconds) else None


class _Retry(Exception):
    """One attempt failed in a way worth retrying (raised by transports, consumed by the retry loop)."""

    def __init__(self, reason: str, *, status: int | str | None = None, retry_after: float | None = None,
                 cause: BaseException | None = None, timed_out: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after = retry_after
        self.cause = cause
        self.timed_out = timed_out


@dataclass(frozen=True, slots=True)
class _Policy:
    timeout: float
    max_attempts: int
    backoff_base: float
    backoff_max: float
    max_retry_after: float
    deadline: float | None
    rng: random.Random

    def start(self) -> float | None:
        """The absolute monotonic deadline for one publish call, if any."""
        return time.monotonic() + self.deadline if self.deadline is not None else None

    def attempt_timeout(self, deadline_at: float | None, attempts: int, last: _Retry | None) -> float:
        if deadline_at is None:
            return self.timeout
        remaining = deadline_at - time.monotonic()
        if remaining <= 0:
            raise self.gave_up(last, attempts, deadline=True)
        return min(self.timeout, remaining)

    def delay(self, retry: int, failure: _Retry, attempts: int, deadline_at: float | None) -> float:
        """Sleep before the next attempt (`retry` counts from 0), or raise when waiting is pointless."""
        jitter = self.rng.uniform(0.0, min(self.backoff_max, self.backoff_base * 2.0 ** min(retry, 60)))
        floor = failure.retry_after or 0.0
        if floor > self.max_retry_after:
            raise self.gave_up(failure, attempts, note=f"the gateway asked to retry after {floor:g}s, more "
                                                      f"than max_retry_after={self.max_retry_after:g}s")
        wait = max(floor, jitter)
        if deadline_at is not None and time.monotonic() + wait >= deadline_at:
            raise self.gave_up(failure, attempts, deadline=True)
        return wait

    def gave_up(self, last: _Retry | None, attempts: int, *, deadline: bool = False,
                note: str = "") -> GatewayUnavailable:
        why = last.reason if last is not None else "no attempt made"
        if deadline:
            message = f"deadline of {self.deadline:g}s exceeded after {attempts} attempt(s); last: {why}"
        else:
            message = f"gave up after {attempts} attempt(s): {note or why}"
        timed_out = deadline or (last is not None and last.timed_out and not note)
        cls = PublishTimeout if timed_out else GatewayUnavailable
        error = cls(message, status=last.status if last else None, cause=last.cause if last else None,
                    retry_after=last.retry_after if last else None, attempts=attempts)
        error.__cause__ = error.cause
        return error


def _run_sync(policy: _Policy, send: Callable[[float], list[str]]) -> list[str]:
    deadline_at = policy.start()
    last: _Retry | None = None
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return send(policy.attempt_timeout(deadline_at, attempt - 1, last))
        except _Retry as failure:
            last = failure
        except PublishError as exc:
            exc.attempts = attempt
            raise
        if attempt < policy.max_attempts:
            time.sleep(policy.delay(attempt - 1, last, attempt, deadline_at))
    raise policy.gave_up(last, policy.max_attempts)


async def _run_async(policy: _Policy, send: Callable[[float], Awaitable[list[str]]]) -> list[str]:
    deadline_at = policy.start()
    last: _Retry | None = None
    for attempt in range(1, policy.max_attempts + 1):
        try:
            return await send(policy.attempt_timeout(deadline_at, attempt - 1, last))
        except _Retry as failure:
            last = failure
        except PublishError as exc:
            exc.attempts = attempt
            raise
        if attempt < policy.max_attempts:
            await asyncio.sleep(policy.delay(attempt - 1, last, attempt, deadline_at))
    raise policy.gave_up(last, policy.max_attempts)


# ------------------------------------------------------------------------------------- transports


class _Request(NamedTuple):
    """One encoded publish request: built once, sent unchanged on every attempt."""

    ids: list[str]
    single: bool
    events: list[Event]
    headers: dict[str, str]
    body: bytes


class _SyncTransport(Protocol):
    def send(self, request: _Request, timeout: float) -> list[str]: ...
    def close(self) -> None: ...


class _AsyncTransport(Protocol):
    async def send(self, request: _Request, timeout: float) -> list[str]: ...
    async def close(self) -> None: ...


def _http_endpoint(url: str) -> str:
    parts = httpx.URL(url)
    if parts.scheme not in ("http", "https") or not parts.host:
        raise ValueError(f"expected an http:// or https:// gateway URL, got {url!r}")
    base = url.rstrip("/")
    return base if base.endswith(EVENTS_PATH) else base + EVENTS_PATH


def _encode_http(events: list[Event], single: bool, mode: Mode) -> tuple[dict[str, str], bytes]:
    headers: dict[str, str]
    body: bytes
    try:
        if not single:
            headers, body = http_binding.encode_batch(events)
        elif mode == "structured":
            headers, body = http_binding.encode_structured(events[0])
        else:
            event = events[0]
            if event.data is not None and not isinstance(event.data, bytes | str) and \
                    "datacontenttype" not in event.attributes:
                # A JSON value travels as a JSON body: say so, or the gateway would store opaque bytes.
                event = Event({**event.attributes, "datacontenttype": "application/json"}, event.data)
            headers, body = http_binding.encode_binary(event)
    except orjson.JSONEncodeError as exc:
        raise InvalidEventError(f"data is not JSON-serializable: {exc}", attribute="data") from None
    return headers, body


def _http_outcome(request: _Request, status: int, headers: httpx.Headers, body: bytes) -> list[str]:
    """Map one HTTP answer to ids, a retry, or an error."""
    if 200 <= status < 300:
        return request.ids
    problem = _problem(body)
    detail = _problem_detail(problem, body, status)
    if status in RETRY_STATUSES:
        raise _Retry(f"HTTP {status}: {detail}", status=status,
                     retry_after=parse_retry_after(headers.get("retry-after")))
    if 400 <= status < 500:
        attribute = problem.get("attribute") if problem else None
        index = problem.get("index") if problem else None
        if not isinstance(index, int) or isinstance(index, bool):
            index = None
        if not isinstance(attribute, str):
            attribute = None
        raise InvalidEventError(detail, status=status, attribute=attribute, index=index, problem=problem)
    raise PublishError(f"gateway answered HTTP {status}: {detail}", status=status)


def _problem(body: bytes) -> dict[str, Any] | None:
    try:
        doc = orjson.loads(body) if body else None
    except orjson.JSONDecodeError:
        return None
    return doc if isinstance(doc, dict) else None


def _problem_detail(problem: Mapping[str, Any] | None, body: bytes, status: int) -> str:
    if problem:
        for key in ("detail", "title"):
            if isinstance(problem.get(key), str) and problem[key]:
                return str(problem[key])
    text = body[:500].decode("utf-8", "replace").strip()
    return text or httpx.codes.get_reason_phrase(status) or f"status {status}"


def _http_failure(exc: httpx.HTTPError) -> BaseException:
    """Transport exceptions: timeouts and network failures are retried, anything else is final."""
    if isinstance(exc, httpx.TimeoutException):
        return _Retry(f"timed out ({type(exc).__name__})", cause=exc, timed_out=True)
    if isinstance(exc, httpx.NetworkError | httpx.RemoteProtocolError):
        return _Retry(f"connection failed ({type(exc).__name__}: {exc})", cause=exc)
    error = PublishError(f"request failed: {type(exc).__name__}: {exc}")
    error.__cause__ = exc
    return error


def _client_kwargs(headers: Mapping[str, str] | None, max_connections: int) -> dict[str, Any]:
    return {
        "http2": False,
        "headers": {"user-agent": USER_AGENT, **(headers or {})},
        "limits": httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections),
        "follow_redirects": False,
    }


class _SyncHttp:
    def __init__(self, url: str, headers: Mapping[str, str] | None, max_connections: int) -> None:
        self.endpoint = _http_endpoint(url)
        self.client = httpx.Client(**_client_kwargs(headers, max_connections))

    def send(self, request: _Request, timeout: float) -> list[str]:
        try:
            response = self.client.post(self.endpoint, content=request.body, headers=request.headers,
                                        timeout=timeout)
        except httpx.HTTPError as exc:
            raise _http_failure(exc) from exc
        return _http_outcome(request, response.status_code, response.headers, response.content)

    def close(self) -> None:
        self.client.close()


class _AsyncHttp:
    def __init__(self, url: str, headers: Mapping[str, str] | None, max_connections: int) -> None:
        self.endpoint = _http_endpoint(url)
        self.client = httpx.AsyncClient(**_client_kwargs(headers, max_connections))

    async def send(self, request: _Request, timeout: float) -> list[str]:
        try:
            response = await self.client.post(self.endpoint, content=request.body, headers=request.headers,
                                              timeout=timeout)
        except httpx.HTTPError as exc:
            raise _http_failure(exc) from exc
        return _http_outcome(request, response.status_code, response.headers, response.content)

    async def close(self) -> None:
        await self.client.aclose()


def _grpc_client_module() -> ModuleType:
    try:
        from umcef.fabric import grpc_client
    except ImportError as exc:
        raise ImportError(f"transport='grpc' needs the grpc extra (pip install 'umcef[grpc]'): {exc}") \
            from exc
    return grpc_client


def _grpc_target(url: str) -> tuple[str, bool]:
    """`host:port` and whether to use TLS, from `host:port`, `grpc://`, `grpcs://`, `http://` or `https://`."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "grpc", url
    scheme = scheme.lower()
    if scheme not in ("grpc", "grpcs", "http", "https"):
        raise ValueError(f"expected host:port or grpc://host:port for transport='grpc', got {url!r}")
    target = rest.rstrip("/")
    if not target or "/" in target:
        raise ValueError(f"expected host:port for transport='grpc', got {url!r}")
    return target, scheme in ("grpcs", "https")


def _grpc_channel_kwargs(url: str, headers: Mapping[str, str] | None) -> tuple[str, dict[str, Any]]:
    if headers:
        raise ValueError("headers are not supported with transport='grpc' (the gRPC client sends no "
                         "metadata yet)")
    target, tls = _grpc_target(url)
    kwargs: dict[str, Any] = {}
    if tls:
        import grpc

        kwargs["credentials"] = grpc.ssl_channel_credentials()
    return target, kwargs


def _grpc_failure(exc: GrpcPublishError) -> BaseException:
    """A `GrpcPublishError` from the client as a retry, an `InvalidEventError` or a final `PublishError`."""
    from umcef.fabric import grpc_client

    code = str(getattr(exc.code, "name", exc.code))
    if exc.retryable:
        return _Retry(f"gRPC {code}: {exc.message}", status=code, retry_after=exc.retry_after, cause=exc,
                      timed_out=isinstance(exc, grpc_client.GrpcDeadlineExceeded))
    if isinstance(exc, grpc_client.GrpcInvalidEvent | grpc_client.GrpcLimitExceeded):
        return InvalidEventError(exc.message, status=code, attribute=exc.attribute, index=exc.index)
    error = PublishError(f"gRPC {code}: {exc.message}", status=code)
    error.__cause__ = exc
    return error


def _grpc_encode_failure(exc: Exception) -> InvalidEventError:
    if isinstance(exc, EventError):
        return InvalidEventError(exc.reason, attribute=exc.attribute, index=exc.index)
    return InvalidEventError(f"data is not JSON-serializable: {exc}", attribute="data")


class _SyncGrpc:
    def __init__(self, url: str, headers: Mapping[str, str] | None) -> None:
        self.module = _grpc_client_module()
        target, kwargs = _grpc_channel_kwargs(url, headers)
        self.client = self.module.GrpcGatewayClient(target, **kwargs)

    def send(self, request: _Request, timeout: float) -> list[str]:
        try:
            self.client.publish(request.events, timeout=timeout)
        except self.module.GrpcPublishError as exc:
            raise _grpc_failure(exc) from exc
        except (EventError, orjson.JSONEncodeError) as exc:
            raise _grpc_encode_failure(exc) from None
        return request.ids

    def close(self) -> None:
        self.client.close()


class _AsyncGrpc:
    def __init__(self, url: str, headers: Mapping[str, str] | None) -> None:
        self.module = _grpc_client_module()
        target, kwargs = _grpc_channel_kwargs(url, headers)
        self.client = self.module.AsyncGrpcGatewayClient(target, **kwargs)

    async def send(self, request: _Request, timeout: float) -> list[str]:
        try:
            await self.client.publish(request.events, timeout=timeout)
        except self.module.GrpcPublishError as exc:
            raise _grpc_failure(exc) from exc
        except (EventError, orjson.JSONEncodeError) as exc:
            raise _grpc_encode_failure(exc) from None
        return request.ids

    async def close(self) -> None:
        await self.client.close()


# ------------------------------------------------------------------------------------- publishers


class _Base:
    def __init__(self, url: str, transport: Transport, mode: Mode, timeout: float, max_attempts: int,
                 backoff_base: float, backoff_max: float, max_retry_after: float, deadline: float | None,
                 headers: Mapping[str, str] | None, rng: random.Random | None) -> None:
        if transport not in ("http", "grpc"):
            raise ValueError(f"transport must be 'http' or 'grpc', got {transport!r}")
        if mode not in ("binary", "structured"):
            raise ValueError(f"mode must be 'binary' or 'structured', got {mode!r}")
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        for name, value in (("timeout", timeout), ("backoff_max", backoff_max)):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if backoff_base < 0 or max_retry_after < 0 or (deadline is not None and not deadline > 0):
            raise ValueError("backoff_base and max_retry_after must be >= 0 and deadline > 0")
        self.url = url
        self.transport = transport
        self.mode: Mode = mode
        self.policy = _Policy(timeout, max_attempts, backoff_base, backoff_max, max_retry_after, deadline,
                              rng or random.Random())
        self.closed = False

    def _request(self, events: list[Event], single: bool) -> _Request:
        ids = [e.id for e in events]
        if self.transport == "grpc":
            return _Request(ids, single, events, {}, b"")
        headers, body = _encode_http(events, single, self.mode)
        return _Request(ids, single, events, headers, body)

    def _check_open(self) -> None:
        if self.closed:
            raise PublishError("the publisher is closed")


def _prepare_batch(events: Iterable[Any]) -> list[Event]:
    return [prepare(event, index) for index, event in enumerate(events)]


class Publisher(_Base):
    """Blocking publisher with a pooled connection; safe to share between threads."""

    def __init__(self, url: str = "http://127.0.0.1:8080", *, transport: Transport = "http",
                 mode: Mode = "binary", timeout: float = 10.0, max_attempts: int = 5,
                 backoff_base: float = 0.1, backoff_max: float = 5.0, max_retry_after: float = 60.0,
                 deadline: float | None = None, headers: Mapping[str, str] | None = None,
                 max_connections: int = 10, rng: random.Random | None = None) -> None:
        super().__init__(url, transport, mode, timeout, max_attempts, backoff_base, backoff_max,
                         max_retry_after, deadline, headers, rng)
        self._transport: _SyncTransport
        if transport == "grpc":
            self._transport = _SyncGrpc(url, headers)
        else:
            self._transport = _SyncHttp(url, headers, max_connections)

    def publish(self, event: Any) -> str:
        """Publish one event; returns its id once the gateway has it durably."""
        self._check_open()
        request = self._request([prepare(event)], single=True)
        return _run_sync(self.policy, lambda timeout: self._transport.send(request, timeout))[0]

    def publish_batch(self, events: Iterable[Any]) -> list[str]:
        """Publish events in one request (accepted or rejected as a whole); returns their ids in order."""
        self._check_open()
        prepared = _prepare_batch(events)
        if not prepared:
            return []
        request = self._request(prepared, single=False)
        return _run_sync(self.policy, lambda timeout: self._transport.send(request, timeout))

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._transport.close()

    def __enter__(self) -> Publisher:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class AsyncPublisher(_Base):
    """asyncio publisher with a pooled connection; safe for concurrent tasks on one event loop."""

    def __init__(self, url: str = "http://127.0.0.1:8080", *, transport: Transport = "http",
                 mode: Mode = "binary", timeout: float = 10.0, max_attempts: int = 5,
                 backoff_base: float = 0.1, backoff_max: float = 5.0, max_retry_after: float = 60.0,
                 deadline: float | None = None, headers: Mapping[str, str] | None = None,
                 max_connections: int = 100, rng: random.Random | None = None) -> None:
        super().__init__(url, transport, mode, timeout, max_attempts, backoff_base, backoff_max,
                         max_retry_after, deadline, headers, rng)
        self._transport: _AsyncTransport
        if transport == "grpc":
            self._transport = _AsyncGrpc(url, headers)
        else:
            self._transport = _AsyncHttp(url, headers, max_connections)

    async def publish(self, event: Any) -> str:
        """Publish one event; returns its id once the gateway has it durably."""
        self._check_open()
        request = self._request([prepare(event)], single=True)
        return (await _run_async(self.policy, lambda timeout: self._transport.send(request, timeout)))[0]

    async def publish_batch(self, events: Iterable[Any]) -> list[str]:
        """Publish events in one request (accepted or rejected as a whole); returns their ids in order."""
        self._check_open()
        prepared = _prepare_batch(events)
        if not prepared:
            return []
        request = self._request(prepared, single=False)
        return await _run_async(self.policy, lambda timeout: self._transport.send(request, timeout))

    async def close(self) -> None:
        if not self.closed:
            self.closed = True
            await self._transport.close()

    async def __aenter__(self) -> AsyncPublisher:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()
