"""The `servicebus://NAMESPACE/ENTITY[/SUBSCRIPTION]` adapter: Azure Service Bus on azure-servicebus (aio).

URL: `servicebus://NAMESPACE/QUEUE_OR_TOPIC` (sink; also a source when it is a queue) and
`servicebus://NAMESPACE/TOPIC/SUBSCRIPTION` (source). NAMESPACE is a short name (`myns` →
`myns.servicebus.windows.net`), a full host name, or `host:port` (a development endpoint). The URL says
*where*; credentials never come from it. In this order:

1. option `connection_string` (its `Endpoint` is replaced by the URL's namespace and any `EntityPath`
   dropped, so one key can serve every entity and the URL stays the single source of the destination);
2. option `credential`: an azure-core `AsyncTokenCredential` (Entra ID);
3. environment `UMCEF_SERVICEBUS_CONNECTION_STRING__<NAMESPACE>` (NAMESPACE as in the URL, upper-cased,
   every character other than A-Z and 0-9 replaced by `_`: `myns` → `..._MYNS`), then
   `UMCEF_SERVICEBUS_CONNECTION_STRING` (same Endpoint rule);
4. azure-identity's `DefaultAzureCredential` when that package is installed.

Without any, every operation fails with `Unauthorized`.

Other options (the URL's query may carry the non-secret ones for one entity; it wins over options):
`max_event_bytes` (262,144: the Standard tier; Premium entities may allow up to 100 MiB),
`max_batch` (events per send, 500), `max_header_bytes` (65,536: Service Bus's limit on the properties
section; a larger binary-mode encoding falls back to structured mode), `sessions` (`true`/`false`;
default: detected on the first consume), `max_sessions` (sessions consumed at once, 8),
`session_idle_seconds` (a session with no message for this long is released, 1.0), `session_wait_seconds`
(how long one receiver waits for a session to become available, 2.0), `default_session` (the SessionId
of events without `partitionkey`, needed only for session-enabled entities; default none: such events
are `Rejected` there), `lock_renewal_seconds` (how long a handler may keep a message locked, 300),
`duplicate_detection` (declare that the entity drops duplicate MessageIds: `capabilities.native_dedup`),
`probe_timeout` (5.0), `send_timeout` (30.0), `retry_total` (1: the delivery layer owns retries; one
SDK retry absorbs the reconnect after an idle link was closed by the service).

Mapping (docs/mapping-servicebus.md): the CloudEvents AMQP binding, `umcef.fabric.bindings.amqp`;
binary mode, `MessageId` = event id, `SessionId` = `partitionkey`.

- publish: native batches (`create_message_batch`, split when full or at `max_batch`); an event whose
  encoded AMQP message exceeds `max_event_bytes` is `Rejected` before anything is sent (one that fits
  alone but not in a batch envelope is sent alone). One sender, kept open, sends one batch at a time.
- consume: peek-lock, prefetch 0 (credit is issued per receive call for the free in-flight slots only,
  so at most `max_in_flight` messages are locked by this consumer at once). ack = complete,
  nack = abandon (after `requeue_after` seconds, holding the lock meanwhile), attempt =
  delivery count + 1. Settlements of a plain receiver run in its one pump task between receive calls:
  the SDK settles ~100x slower while a receive is pending on the same link. A lock keeper renews the
  locks of messages (or the session) whose handlers still run, at half the lock duration, up to
  `lock_renewal_seconds`; a crashed consumer stops renewing, so its locks expire and the broker
  redelivers. (The SDK's AutoLockRenewer checks once a second and misses locks shorter than ~5 s.)
  Messages that are not CloudEvents are dead-lettered with the reason.
- Session-enabled entities: up to `max_sessions` receivers each take the next available session and
  handle its messages one at a time, in order. A nacked message goes back first: the session's
  remaining fetched messages stay locked (the session lock covers them) until it has been redelivered.
- probe: queues and topics: `cancel-scheduled-message` for a sequence number that never exists (a
  management round trip with no effect; the service answers "not found", the test double "ok");
  subscriptions: peek of one message. Both on handlers kept open; bounded by `probe_timeout`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import re
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final, Literal
from urllib.parse import parse_qs, urlsplit

from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusMessage,
    ServiceBusReceivedMessage,
    ServiceBusReceiveMode,
    ServiceBusSessionFilter,
)
from azure.servicebus.aio import (
    ServiceBusClient,
    ServiceBusReceiver,
    ServiceBusSender,
    ServiceBusSession,
)
from azure.servicebus.amqp import AmqpMessageBodyType
from azure.servicebus.exceptions import (
    MessageNotFoundError,
    MessageSizeExceededError,
    MessagingEntityDisabledError,
    MessagingEntityNotFoundError,
    OperationTimeoutError,
    ServiceBusAuthenticationError,
    ServiceBusAuthorizationError,
    ServiceBusCommunicationError,
    ServiceBusConnectionError,
    ServiceBusError,
    ServiceBusQuotaExceededError,
    ServiceBusServerBusyError,
)

from umcef.adapters.contract import (
    AdapterError,
    Capabilities,
    Handler,
    NotFound,
    PublishOutcome,
    Rejected,
    Throttled,
    Transient,
    Unauthorized,
)
from umcef.fabric.bindings import amqp
from umcef.fabric.bindings.amqp import AmqpMessage
from umcef.fabric.errors import EventError
from umcef.fabric.event import Event

log = logging.getLogger(__name__)

DEFAULT_MAX_EVENT_BYTES: Final = 256 * 1024  # Standard tier
DEFAULT_MAX_HEADER_BYTES: Final = 64 * 1024  # Service Bus's limit on a message's properties
DEFAULT_MAX_BATCH: Final = 500
SERVICEBUS_SUFFIX: Final = ".servicebus.windows.net"
ENV_CONNECTION_STRING: Final = "UMCEF_SERVICEBUS_CONNECTION_STRING"
# Sequence numbers are 64-bit; the top 16 bits name the partition. This one is never assigned.
_PROBE_SEQUENCE_NUMBER: Final = 2**63 - 1
_PROBE_SESSION: Final = "umcef-probe"
# Seconds a receive call may wait while deliveries are in flight: their settlements wait for it.
_BUSY_POLL: Final = 0.1
_IDLE_POLL: Final = 1.0
# Service Bus asks clients to back off 10 s on ServerBusy; a full entity (quota) drains slower.
_SERVER_BUSY_RETRY_AFTER: Final = 10.0
_QUOTA_RETRY_AFTER: Final = 30.0
_DEAD_LETTER_REASON: Final = "NotACloudEvent"

Settle = Literal["complete", "abandon"]


# --------------------------------------------------------------------------------------------------
# errors


def classify(exc: BaseException, what: str) -> AdapterError:
    """A client library exception as one of the contract's typed errors."""
    if isinstance(exc, AdapterError):
        return exc
    text = f"{what}: {exc}"
    if isinstance(exc, MessagingEntityNotFoundError):
        return NotFound(text)
    if isinstance(exc, MessagingEntityDisabledError):
        return NotFound(text)  # disabled by an operator: retrying will not help until it is enabled
    if isinstance(exc, ServiceBusAuthenticationError | ServiceBusAuthorizationError):
        return Unauthorized(text)
    if isinstance(exc, ServiceBusServerBusyError):
        return Throttled(text, retry_after=_SERVER_BUSY_RETRY_AFTER)
    if isinstance(exc, ServiceBusQuotaExceededError):
        return Throttled(text, retry_after=_QUOTA_RETRY_AFTER)
    if isinstance(exc, MessageSizeExceededError):
        return Rejected(text)
    if isinstance(exc, OperationTimeoutError | ServiceBusConnectionError | ServiceBusCommunicationError
                  | TimeoutError | OSError):
        return Transient(text)
    if isinstance(exc, ServiceBusError):
        condition = str(getattr(exc, "_condition", "") or "")
        # not-allowed / argument-error answer *this* message (e.g. no SessionId for a session entity).
        if condition in ("amqp:not-allowed", "com.microsoft:argument-error", "amqp:decode-error"):
            return Rejected(text)
        return Transient(text)
    if isinstance(exc, ValueError | TypeError):  # the SDK refused to build or encode the message
        return Rejected(text)
    return Transient(text)


def _sessions_required(exc: BaseException) -> bool:
    """Did opening a plain receiver fail because the entity requires sessions?"""
    return (isinstance(exc, ServiceBusError) and str(getattr(exc, "_condition", "")) == "amqp:not-allowed"
            and "session" in str(exc).lower())


# --------------------------------------------------------------------------------------------------
# credentials


def fully_qualified_namespace(namespace: str) -> str:
    """`myns` → `myns.servicebus.windows.net`; host names and `host:port` stay as they are."""
    if "." in namespace or ":" in namespace:
        return namespace
    return namespace + SERVICEBUS_SUFFIX


def namespace_env_var(namespace: str) -> str:
    return f"{ENV_CONNECTION_STRING}__{re.sub(r'[^A-Z0-9]', '_', namespace.upper())}"


def connection_string_for(connection_string: str, host: str) -> str:
    """The connection string's credentials pointed at `host`: the URL names the namespace."""
    parts: list[str] = []
    for item in connection_string.split(";"):
        key, _, _ = item.partition("=")
        if not item.strip() or key.strip().lower() in ("endpoint", "entitypath"):
            continue
        parts.append(item)
    return ";".join([f"Endpoint=sb://{host}/", *parts])


def _default_credential() -> Any:
    """azure-identity's DefaultAzureCredential (environment, workload/managed identity, CLI...), if installed."""
    try:
        identity = importlib.import_module("azure.identity.aio")  # an optional extra: no hard dependency
    except ImportError:
        return None
    return identity.DefaultAzureCredential()


# --------------------------------------------------------------------------------------------------
# messages


def to_servicebus_message(msg: AmqpMessage) -> ServiceBusMessage:
    """The SDK message for a binding message.

    Integers go out as AMQP long (the binding's type for CloudEvents Integer): the SDK writes a plain
    Python int as a 32-bit AMQP int, so the value is handed over in the SDK's own typed form (what its
    `amqp_long_value` helper builds).
    """
    props: dict[str | bytes, Any] = {}
    for name, value in msg.application_properties.items():
        props[name] = {"TYPE": "LONG", "VALUE": value} if type(value) is int else value
    return ServiceBusMessage(
        msg.body,
        application_properties=props,
        content_type=msg.content_type,
        message_id=msg.message_id,
        session_id=msg.session_id,
    )


def from_servicebus_message(received: ServiceBusReceivedMessage) -> AmqpMessage:
    """The binding message for a received SDK message.

    The SDK hands application property names and string values back as bytes, and binary values too:
    it cannot tell them apart. A value that is valid UTF-8 is taken as a string (what we write: the
    binding sends Binary as its base64 string); other bytes stay binary.
    """
    props: dict[str, Any] = {}
    for raw_name, value in (received.application_properties or {}).items():
        name = raw_name.decode("utf-8", "replace") if isinstance(raw_name, bytes) else str(raw_name)
        if isinstance(value, bytes):
            with contextlib.suppress(UnicodeDecodeError):
                value = value.decode("utf-8")
        props[name] = value
    raw = received.raw_amqp_message
    if raw.body_type == AmqpMessageBodyType.DATA:
        body = b"".join(bytes(section) for section in raw.body)
    elif raw.body_type == AmqpMessageBodyType.VALUE and isinstance(raw.body, bytes | str):
        body = raw.body.encode("utf-8") if isinstance(raw.body, str) else raw.body
    else:
        raise EventError(f"an AMQP {raw.body_type.value} body cannot carry CloudEvents data")
    message_id = received.message_id
    return AmqpMessage(
        {},
        props,
        body,
        received.content_type,
        None if message_id is None else str(message_id),
        received.session_id,
    )


# --------------------------------------------------------------------------------------------------
# deliveries


class ServiceBusDelivery:
    """One received event; settled once. Settlement failures (a lost lock) are logged, not raised: the
    broker redelivers such a message, which is the at-least-once outcome either way."""

    __slots__ = ("_consumer", "attempt", "event", "message", "nacked", "settled")

    def __init__(self, consumer: _Settler, message: ServiceBusReceivedMessage, event: Event) -> None:
        self._consumer = consumer
        self.message = message
        self.event = event
        self.attempt = message.delivery_count + 1 if message.delivery_count is not None else 1
        self.settled = False
        self.nacked = False

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            await self._consumer.settle(self.message, "complete")

    async def nack(self, *, requeue_after: float | None = None) -> None:
        if self.settled:
            return
        self.settled = True
        self.nacked = True
        if requeue_after:
            # Abandon has no delay in Service Bus. Holding the lock (renewed) for the delay keeps the
            # message's identity, delivery count and place in its session; scheduling a copy would not.
            await asyncio.sleep(min(requeue_after, self._consumer.max_hold))
        await self._consumer.settle(self.message, "abandon")


class _Settler:
    """Something that settles messages of one receiver."""

    max_hold: float

    async def settle(self, message: ServiceBusReceivedMessage, op: Settle) -> None:
        raise NotImplementedError


async def _settle_now(receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage, op: Settle) -> None:
    try:
        if op == "complete":
            await receiver.complete_message(message)
        else:
            await receiver.abandon_message(message)
    except Exception as exc:  # lock lost, link gone: the broker redelivers after the lock expires
        log.warning("service bus: %s of message %s failed: %s", op, message.message_id, exc)


# --------------------------------------------------------------------------------------------------
# the adapter


class ServiceBusAdapter:
    def __init__(
        self,
        url: str,
        namespace: str,
        entity: str,
        subscription: str | None,
        *,
        connection_string: str | None = None,
        credential: Any = None,
        max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES,
        max_batch: int = DEFAULT_MAX_BATCH,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        sessions: bool | None = None,
        max_sessions: int = 8,
        session_idle_seconds: float = 1.0,
        session_wait_seconds: float = 2.0,
        default_session: str | None = None,
        lock_renewal_seconds: float = 300.0,
        duplicate_detection: bool = False,
        probe_timeout: float = 5.0,
        send_timeout: float = 30.0,
        retry_total: int = 1,
        owns_credential: bool = False,
    ) -> None:
        self.url = url
        self.namespace = namespace
        self.host = fully_qualified_namespace(namespace)
        self.entity = entity
        self.subscription = subscription
        self.capabilities = Capabilities(
            max_event_bytes=max_event_bytes,
            max_attributes=None,  # no count limit: only the 64 KiB properties section (structured beyond)
            ordering=True,  # per partitionkey on session-enabled entities (docs/mapping-servicebus.md)
            native_dedup=duplicate_detection,
            max_batch=max_batch,
            dead_letter=True,
        )
        self._connection_string = connection_string
        self._credential = credential
        self._owns_credential = owns_credential
        self._max_header_bytes = max_header_bytes
        self._sessions = sessions
        self._max_sessions = max(1, max_sessions)
        self._session_idle = session_idle_seconds
        self._session_wait = session_wait_seconds
        self._default_session = default_session
        self._lock_renewal = lock_renewal_seconds
        self._probe_timeout = probe_timeout
        self._send_timeout = send_timeout
        self._retry_total = retry_total
        self._client: ServiceBusClient | None = None
        self._sender: ServiceBusSender | None = None
        self._receiver: ServiceBusReceiver | None = None  # the plain receiver of the running consume()
        self._probe_receiver: ServiceBusReceiver | None = None
        self._send_lock = asyncio.Lock()
        self._sender_open_lock = asyncio.Lock()
        self._probe_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._wakers: set[asyncio.Event] = set()
        self._closed = False

    # -- plumbing ------------------------------------------------------------------------------

    def _get_client(self) -> ServiceBusClient:
        if self._closed:
            raise Transient(f"{self.url}: adapter is closed")
        if self._client is None:
            options: dict[str, Any] = {"retry_total": self._retry_total, "retry_backoff_factor": 0.5,
                                       "retry_backoff_max": 4}
            if self._connection_string is not None:
                self._client = ServiceBusClient.from_connection_string(
                    connection_string_for(self._connection_string, self.host), **options)
            elif self._credential is not None:
                self._client = ServiceBusClient(self.host, self._credential, **options)
            else:
                raise Unauthorized(f"{self.url}: no Service Bus credentials (option connection_string or "
                                   f"credential, {namespace_env_var(self.namespace)} or {ENV_CONNECTION_STRING}, "
                                   "or azure-identity)")
        return self._client

    async def _get_sender(self) -> ServiceBusSender:
        async with self._sender_open_lock:  # publish and probe share one sender: open it once
            if self._sender is None:
                sender = self._get_client().get_queue_sender(self.entity)  # a topic's address is its name too
                try:
                    await sender.__aenter__()  # opens the link: not-found and auth errors surface here
                except BaseException:
                    await _close_quietly(sender)
                    raise
                self._sender = sender
            return self._sender

    async def _drop_sender(self) -> None:
        sender, self._sender = self._sender, None
        if sender is not None:
            await _close_quietly(sender)

    def _new_receiver(self, *, session: str | ServiceBusSessionFilter | None = None, max_wait_time: float | None = None
                      ) -> ServiceBusReceiver:
        client = self._get_client()
        kwargs: dict[str, Any] = {"receive_mode": ServiceBusReceiveMode.PEEK_LOCK, "prefetch_count": 0}
        if session is not None:
            kwargs["session_id"] = session
        if max_wait_time is not None:
            kwargs["max_wait_time"] = max_wait_time
        if self.subscription is not None:
            return client.get_subscription_receiver(self.entity, self.subscription, **kwargs)
        return client.get_queue_receiver(self.entity, **kwargs)

    # -- publish -------------------------------------------------------------------------------

    def encode(self, event: Event) -> AmqpMessage:
        """Binary mode; structured when binary mode cannot carry the event here.

        That is when the properties would pass Service Bus's header limit, and when the data is itself
        a CloudEvents format (`datacontenttype: application/cloudevents...`): receivers take such a
        content-type for structured mode (spec §3), so binary mode would be misread.
        """
        content_type = event.attributes.get("datacontenttype")
        if isinstance(content_type, str) and content_type[:23].lower() == amqp.CLOUDEVENTS_MEDIA_PREFIX:
            return amqp.to_structured(event)
        msg = amqp.to_binary(event)
        if _properties_size(msg) > self._max_header_bytes:
            return amqp.to_structured(event)
        return msg

    def _prepare(self, event: Event) -> tuple[ServiceBusMessage, int]:
        msg = self.encode(event)
        if msg.session_id is None and self._default_session is not None:
            msg = AmqpMessage(msg.properties, msg.application_properties, msg.body, msg.content_type,
                              msg.message_id, self._default_session)
        sb_message = to_servicebus_message(msg)
        return sb_message, _encoded_size(sb_message)

    def encoded_size(self, event: Event) -> int:
        """Bytes of the AMQP message as the SDK puts it on the wire: what the link's size limit counts."""
        return self._prepare(event)[1]

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        outcomes: list[PublishOutcome | None] = [None] * len(batch)
        ready: list[tuple[int, ServiceBusMessage, int]] = []
        limit = self.capabilities.max_event_bytes
        for index, event in enumerate(batch):
            try:
                message, size = self._prepare(event)
            except (EventError, ValueError, TypeError, KeyError) as exc:
                outcomes[index] = PublishOutcome(_event_id(event), Rejected(f"cannot encode the event: {exc}"))
                continue
            if size > limit:
                outcomes[index] = PublishOutcome(event.id, Rejected(
                    f"event encodes to an AMQP message of {size} bytes, over Service Bus's limit of {limit} bytes"))
                continue
            ready.append((index, message, size))
        if ready:
            async with self._send_lock:  # one send at a time on the one sender: keeps per-key order
                for index, error in await self._send_all(ready):
                    outcomes[index] = PublishOutcome(batch[index].id, error)
        return [o if o is not None else PublishOutcome(batch[i].id) for i, o in enumerate(outcomes)]

    async def _send_all(self, ready: list[tuple[int, ServiceBusMessage, int]]
                        ) -> list[tuple[int, AdapterError | None]]:
        results: list[tuple[int, AdapterError | None]] = []
        try:
            sender = await asyncio.wait_for(self._get_sender(), self._send_timeout)
        except (Exception, TimeoutError) as exc:
            error = classify(exc, f"opening a sender for {self.entity}")
            await self._drop_sender()
            return [(index, error) for index, _, _ in ready]
        pending: list[tuple[int, ServiceBusMessage, int]] = []
        batch = await self._new_batch(sender)
        for item in ready:
            message = item[1]
            if len(pending) < self.capabilities.max_batch and _try_add(batch, message):
                pending.append(item)
                continue
            if pending:  # the batch is full: send it and start the next one with this message
                results += await self._send(sender, batch, pending)
                pending = []
                batch = await self._new_batch(sender)
                if _try_add(batch, message):
                    pending.append(item)
                    continue
            # Fits the link but not a batch envelope (the envelope costs a few bytes): send it alone.
            results += await self._send(sender, message, [item])
        if pending:
            results += await self._send(sender, batch, pending)
        return results

    async def _new_batch(self, sender: ServiceBusSender) -> Any:
        try:
            return await sender.create_message_batch()
        except Exception as exc:  # the link went away: every send will report it
            log.debug("service bus: create_message_batch failed: %s", exc)
            return None

    async def _send(self, sender: ServiceBusSender, payload: Any, items: list[tuple[int, ServiceBusMessage, int]]
                    ) -> list[tuple[int, AdapterError | None]]:
        try:
            await sender.send_messages(payload, timeout=self._send_timeout)
        except Exception as exc:
            error = classify(exc, f"sending {len(items)} message(s) to {self.entity}")
            if isinstance(error, Rejected) and "sessionid" in str(exc).lower():
                error = Rejected(f"{self.entity} requires sessions and an event has no partitionkey "
                                 f"(set the default_session option): {exc}")
            if not isinstance(exc, MessageSizeExceededError | ServiceBusError) or getattr(
                    exc, "_shutdown_handler", True):
                await self._drop_sender()  # the SDK closed the handler; the next publish reopens it
            return [(index, error) for index, _, _ in items]
        return [(index, None) for index, _, _ in items]

    # -- consume -------------------------------------------------------------------------------

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        self._stop.clear()
        if self._sessions is not True:
            receiver = await self._open_plain_receiver()
            if receiver is not None:
                try:
                    await _PlainConsumer(self, receiver, handler, max_in_flight).run()
                finally:
                    # Closed, not kept: an idle receiver keeps link credit, and the service would go on
                    # locking messages into its buffer that nobody handles.
                    self._receiver = None
                    await _close_quietly(receiver)
                return
        await self._consume_sessions(handler, max_in_flight)

    async def _open_plain_receiver(self) -> ServiceBusReceiver | None:
        """A plain receiver, or None when the entity turns out to require sessions."""
        receiver = self._new_receiver()
        try:
            await receiver.__aenter__()
        except Exception as exc:
            await _close_quietly(receiver)
            if _sessions_required(exc):
                self._sessions = True
                return None
            raise classify(exc, f"opening a receiver on {self._path()}") from None
        self._sessions = False
        self._receiver = receiver
        return receiver

    async def _consume_sessions(self, handler: Handler, max_in_flight: int) -> None:
        slots = asyncio.Semaphore(max_in_flight)
        closing: set[asyncio.Task[None]] = set()
        workers = [asyncio.create_task(self._session_worker(handler, slots, closing))
                   for _ in range(min(self._max_sessions, max_in_flight))]
        try:
            done, _ = await asyncio.wait(workers, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()  # a classified error (NotFound, Unauthorized) ends consume
        finally:
            for task in workers:
                if not task.done() and not self._stop.is_set():
                    task.cancel()  # a crash, or another worker failed: stop at once, settle nothing
            await asyncio.gather(*workers, return_exceptions=True)
            await asyncio.gather(*closing, return_exceptions=True)

    async def _session_worker(self, handler: Handler, slots: asyncio.Semaphore,
                              closing: set[asyncio.Task[None]]) -> None:
        failures = 0
        while not self._stop.is_set():
            receiver = self._new_receiver(session=NEXT_AVAILABLE_SESSION, max_wait_time=self._session_wait)
            try:
                # Waits up to session_wait for a session with messages; stop does not wait for it.
                if not await self._open_unless_stopped(receiver):
                    _close_later(receiver, closing)
                    return
            except OperationTimeoutError:
                _close_later(receiver, closing)
                continue  # no session available: ask again
            except BaseException as exc:
                _close_later(receiver, closing)
                if not isinstance(exc, Exception):
                    raise
                error = classify(exc, f"opening a session receiver on {self._path()}")
                if not isinstance(error, Transient | Throttled) or failures > 3:
                    raise error from None
                failures += 1
                await self._sleep_unless_stopped(min(2.0**failures * 0.25, 5.0))
                continue
            failures = 0
            try:
                await _SessionConsumer(self, receiver, handler, slots).run()
            finally:
                # Closing releases the session; it takes ~1 s (the SDK's keep-alive task), which the
                # next session need not wait for.
                _close_later(receiver, closing)

    async def _open_unless_stopped(self, receiver: ServiceBusReceiver) -> bool:
        """Open `receiver`; False (not opened) when stop_consuming came first."""
        opening = asyncio.ensure_future(receiver.__aenter__())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({opening, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopping.cancel()
            if not opening.done():
                opening.cancel()
                with contextlib.suppress(BaseException):
                    await opening
        if opening.cancelled():
            return False
        opening.result()
        return True

    async def _sleep_unless_stopped(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)

    def _path(self) -> str:
        return self.entity if self.subscription is None else f"{self.entity}/subscriptions/{self.subscription}"

    async def _dead_letter(self, receiver: ServiceBusReceiver, message: ServiceBusReceivedMessage,
                           reason: str) -> None:
        """A message that is not a CloudEvent: into the entity's dead-letter queue, never back in the loop."""
        log.warning("service bus: dead-lettering message %s from %s: %s", message.message_id, self._path(), reason)
        try:
            await receiver.dead_letter_message(message, reason=_DEAD_LETTER_REASON, error_description=reason[:1024])
        except Exception as exc:
            log.warning("service bus: dead-lettering message %s failed: %s", message.message_id, exc)

    async def stop_consuming(self) -> None:
        self._stop.set()
        for waker in self._wakers:
            waker.set()

    # -- probe ---------------------------------------------------------------------------------

    async def probe(self) -> float:
        async with self._probe_lock:
            try:
                return await asyncio.wait_for(self._probe(), self._probe_timeout)
            except TimeoutError:
                await self._drop_probe_handlers()
                raise Transient(f"{self.url}: no answer within {self._probe_timeout} s") from None
            except AdapterError:
                raise
            except Exception as exc:
                await self._drop_probe_handlers()
                error = classify(exc, f"probing {self._path()}")
                raise error if not isinstance(error, Rejected) else Transient(str(error)) from None

    async def _probe(self) -> float:
        if self.subscription is None:
            sender = await self._get_sender()  # opening is not part of the round trip
            started = time.perf_counter()
            with contextlib.suppress(MessageNotFoundError):  # the service's answer to our probe number
                await sender.cancel_scheduled_messages(_PROBE_SEQUENCE_NUMBER, timeout=self._probe_timeout)
            return max(time.perf_counter() - started, 1e-9)
        receiver = await self._get_probe_receiver()
        started = time.perf_counter()
        await receiver.peek_messages(max_message_count=1, timeout=self._probe_timeout)
        return max(time.perf_counter() - started, 1e-9)

    async def _get_probe_receiver(self) -> ServiceBusReceiver:
        if self._probe_receiver is None:
            # A session-enabled subscription only admits session receivers: peek inside a session that no
            # producer uses (accepting a session that has no messages is allowed and locks nothing else).
            receiver = self._new_receiver(session=_PROBE_SESSION if self._sessions else None)
            try:
                await receiver.__aenter__()
            except Exception as exc:
                await _close_quietly(receiver)
                if not _sessions_required(exc):
                    raise
                self._sessions = True
                receiver = self._new_receiver(session=_PROBE_SESSION)
                try:
                    await receiver.__aenter__()
                except BaseException:
                    await _close_quietly(receiver)
                    raise
            self._probe_receiver = receiver
        return self._probe_receiver

    async def _drop_probe_handlers(self) -> None:
        # The sender is shared with publish and left alone: the SDK reopens a failed handler itself.
        receiver, self._probe_receiver = self._probe_receiver, None
        if receiver is not None:
            await _close_quietly(receiver)

    # -- close ---------------------------------------------------------------------------------

    async def close(self) -> None:
        if self._closed:
            return
        await self.stop_consuming()
        self._closed = True
        handlers = [h for h in (self._sender, self._receiver, self._probe_receiver) if h is not None]
        self._sender = self._receiver = self._probe_receiver = None
        # Each handler's close waits for its keep-alive task (~1 s): close them side by side.
        await asyncio.gather(*(_close_quietly(h) for h in handlers))
        client, self._client = self._client, None
        if client is not None:
            await _close_quietly(client)
        credential = self._credential if self._owns_credential else None  # a caller's may be shared
        if credential is not None and hasattr(credential, "close"):
            with contextlib.suppress(Exception):
                await credential.close()


# --------------------------------------------------------------------------------------------------
# consumers


@dataclass(eq=False, slots=True)
class _Held:
    renew: Callable[[], Awaitable[datetime]]
    started: float  # monotonic: when its handler started
    next_renewal: float  # monotonic


class _LockKeeper:
    """Renews the locks of what is still being handled -- messages, or a session -- at half their span.

    A lock is renewed for at most `max_hold` seconds of one handler; then it is left to expire and the
    broker redelivers (a handler stuck for good must not pin a message forever). Cancelled with its
    consumer: a crashed consumer's locks expire.
    """

    def __init__(self, receiver: ServiceBusReceiver, max_hold: float) -> None:
        self.receiver = receiver
        self.max_hold = max_hold
        self.held: dict[int, _Held] = {}
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def hold(self, message: ServiceBusReceivedMessage) -> None:
        receiver = self.receiver
        self._add(message, message.locked_until_utc, lambda: receiver.renew_message_lock(message))

    def hold_session(self, session: ServiceBusSession) -> None:
        self._add(session, session.locked_until_utc, session.renew_lock)

    def touch(self, held: object) -> None:
        """A new handler started under this lock (a session's next message): its max_hold starts now."""
        entry = self.held.get(id(held))
        if entry is not None:
            entry.started = time.monotonic()

    def release(self, held: object) -> None:
        self.held.pop(id(held), None)

    def _add(self, held: object, locked_until: datetime | None, renew: Callable[[], Awaitable[datetime]]) -> None:
        if locked_until is None:
            return
        now = time.monotonic()
        self.held[id(held)] = _Held(renew, now, now + _half_span(locked_until))
        if self.task is None:
            self.task = asyncio.create_task(self._run())
        self.wake.set()

    async def _run(self) -> None:
        while True:
            now = time.monotonic()
            for key, entry in list(self.held.items()):
                if entry.next_renewal > now:
                    continue
                if now - entry.started > self.max_hold:
                    self.held.pop(key, None)
                    continue
                try:
                    locked_until = await entry.renew()
                except Exception as exc:  # lock already lost: the broker redelivers; nothing to keep
                    log.debug("service bus: lock renewal failed: %s", exc)
                    self.held.pop(key, None)
                    continue
                entry.next_renewal = time.monotonic() + _half_span(locked_until)
            due = min((e.next_renewal for e in self.held.values()), default=None)
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), None if due is None else max(0.0, due - time.monotonic()))

    async def close(self) -> None:
        task, self.task = self.task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def _half_span(locked_until: datetime) -> float:
    """Half the time left on a lock: when to renew it. (The broker's clock: skew shortens it, so it
    is floored; the SDK compares the same two clocks.)"""
    return max((locked_until - datetime.now(UTC)).total_seconds(), 0.2) / 2


class _PlainConsumer(_Settler):
    """One consume() call on a plain (non-session) receiver.

    One task owns the receiver: it receives for the free in-flight slots and, between receive calls,
    runs the settlements handlers asked for. The SDK settles in ~0.3 ms on an idle link but ~30 ms while
    a receive is pending on it, so settling between short receives is what makes throughput.
    """

    def __init__(self, adapter: ServiceBusAdapter, receiver: ServiceBusReceiver, handler: Handler,
                 max_in_flight: int) -> None:
        self.adapter = adapter
        self.receiver = receiver
        self.locks = _LockKeeper(receiver, adapter._lock_renewal)
        self.handler = handler
        self.max_in_flight = max(1, max_in_flight)
        self.max_hold = adapter._lock_renewal
        self.queue: deque[tuple[ServiceBusReceivedMessage, Settle, asyncio.Future[None]]] = deque()
        self.wake = asyncio.Event()
        self.running: set[asyncio.Task[None]] = set()

    async def settle(self, message: ServiceBusReceivedMessage, op: Settle) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.queue.append((message, op, future))
        self.wake.set()
        await future

    async def drain(self) -> None:
        while self.queue:
            message, op, future = self.queue.popleft()
            try:
                await _settle_now(self.receiver, message, op)
            finally:
                self.locks.release(message)
                if not future.done():
                    future.set_result(None)

    async def run(self) -> None:
        adapter = self.adapter
        adapter._wakers.add(self.wake)
        try:
            while not adapter._stop.is_set():
                await self.drain()
                free = self.max_in_flight - len(self.running)
                if free <= 0:
                    self.wake.clear()
                    if not self.queue:
                        await self.wake.wait()
                    continue
                try:
                    messages = await self.receiver.receive_messages(
                        max_message_count=free, max_wait_time=_BUSY_POLL if self.running else _IDLE_POLL)
                except Exception as exc:
                    await self._receive_failed(exc)
                    continue
                for message in messages:
                    await self._start(message)
            # Stopping: finish the handlers in flight, running what they settle; fetch nothing more.
            while self.running or self.queue:
                await self.drain()
                if self.running:
                    self.wake.clear()
                    if not self.queue:
                        await self.wake.wait()
        except asyncio.CancelledError:
            for task in self.running:
                task.cancel()
            for _, _, future in self.queue:
                future.cancel()
            raise
        finally:
            adapter._wakers.discard(self.wake)
            await self.locks.close()

    async def _receive_failed(self, exc: Exception) -> None:
        error = classify(exc, f"receiving from {self.adapter._path()}")
        if not isinstance(error, Transient | Throttled):
            raise error from None
        log.warning("service bus: %s; retrying", error)
        await self.adapter._sleep_unless_stopped(error.retry_after if isinstance(error, Throttled) else 1.0)

    async def _start(self, message: ServiceBusReceivedMessage) -> None:
        try:
            event = amqp.from_message(from_servicebus_message(message))
        except EventError as exc:
            await self.adapter._dead_letter(self.receiver, message, str(exc))
            return
        self.locks.hold(message)
        task = asyncio.create_task(self._handle(ServiceBusDelivery(self, message, event)))
        self.running.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self.wake.set()

    async def _handle(self, delivery: ServiceBusDelivery) -> None:
        try:
            await self.handler(delivery)
        except Exception:
            log.debug("service bus: handler failed for %s", delivery.event.id, exc_info=True)
            await delivery.nack()
        else:
            await delivery.ack()


class _SessionConsumer(_Settler):
    """One session, held by one receiver: its messages are handled one at a time, in order.

    Messages fetched ahead stay locked by the session lock. When one is nacked, it comes back at the
    head of the session, so the next receive is merged in by sequence number before anything else is
    handled. The session is released (the receiver closed) after `session_idle_seconds` without
    messages, or on stop; its unhandled messages go back to the broker unsettled.
    """

    BATCH = 16

    def __init__(self, adapter: ServiceBusAdapter, receiver: ServiceBusReceiver, handler: Handler,
                 slots: asyncio.Semaphore) -> None:
        self.adapter = adapter
        self.receiver = receiver
        self.handler = handler
        self.slots = slots
        self.max_hold = adapter._lock_renewal
        self.locks = _LockKeeper(receiver, adapter._lock_renewal)

    async def settle(self, message: ServiceBusReceivedMessage, op: Settle) -> None:
        # Nothing else runs on this receiver while its one handler does: settle directly.
        await _settle_now(self.receiver, message, op)

    async def run(self) -> None:
        self.locks.hold_session(self.receiver.session)  # message locks in a session are the session's lock
        try:
            await self._serve()
        finally:
            await self.locks.close()

    async def _serve(self) -> None:
        adapter = self.adapter
        pending: list[ServiceBusReceivedMessage] = []
        refetch = True
        idle_until = time.monotonic() + adapter._session_idle
        while not adapter._stop.is_set():
            if refetch or not pending:
                try:
                    got = await self.receiver.receive_messages(
                        max_message_count=self.BATCH, max_wait_time=_BUSY_POLL if pending else _IDLE_POLL)
                except Exception as exc:
                    error = classify(exc, f"receiving from a session of {adapter._path()}")
                    if isinstance(error, Transient | Throttled):
                        log.warning("service bus: %s; releasing the session", error)
                        return
                    raise error from None
                refetch = False
                if got:
                    pending = sorted(pending + got, key=_sequence_number)
                    idle_until = time.monotonic() + adapter._session_idle
                elif not pending:
                    if time.monotonic() >= idle_until:
                        return  # release the session so others get served
                    continue
            message = pending.pop(0)
            try:
                event = amqp.from_message(from_servicebus_message(message))
            except EventError as exc:
                await adapter._dead_letter(self.receiver, message, str(exc))
                continue
            delivery = ServiceBusDelivery(self, message, event)
            self.locks.touch(self.receiver.session)
            async with self.slots:
                try:
                    await self.handler(delivery)
                except Exception:
                    log.debug("service bus: handler failed for %s", event.id, exc_info=True)
                    await delivery.nack()
                else:
                    await delivery.ack()
            refetch = delivery.nacked  # the nacked message is the session's head again


def _sequence_number(message: ServiceBusReceivedMessage) -> int:
    return message.sequence_number or 0


# --------------------------------------------------------------------------------------------------
# helpers


def _close_later(handler: Any, closing: set[asyncio.Task[None]]) -> None:
    task = asyncio.ensure_future(_close_quietly(handler))
    closing.add(task)
    task.add_done_callback(closing.discard)


async def _close_quietly(handler: Any) -> None:
    try:
        await handler.close()
    except Exception as exc:
        log.debug("service bus: closing %r failed: %s", handler, exc)


def _try_add(batch: Any, message: ServiceBusMessage) -> bool:
    if batch is None:
        return False
    try:
        batch.add_message(message)
    except MessageSizeExceededError:
        return False
    return True


def _event_id(event: Event) -> str:
    value = event.attributes.get("id")
    return value if isinstance(value, str) else str(value)


def _encoded_size(message: ServiceBusMessage) -> int:
    """The exact bytes the SDK's AMQP encoder writes for this message (its transfer payload)."""
    from azure.servicebus._transport._pyamqp_transport import PyamqpTransport

    outgoing = PyamqpTransport.to_outgoing_amqp_message(message.raw_amqp_message)
    return int(PyamqpTransport.get_message_encoded_size(outgoing))


def _properties_size(msg: AmqpMessage) -> int:
    """An upper bound of the encoded application-properties section (names and values with their
    AMQP constructors and lengths): what Service Bus's 64 KiB header limit is about."""
    size = 8
    for name, value in msg.application_properties.items():
        size += len(name.encode("utf-8")) + 5
        size += len(value.encode("utf-8")) + 5 if isinstance(value, str) else 9
    return size


_BOOL_TRUE = {"1", "true", "yes", "on"}
_INT_OPTIONS = ("max_event_bytes", "max_batch", "max_header_bytes", "max_sessions", "retry_total")
_FLOAT_OPTIONS = ("session_idle_seconds", "session_wait_seconds", "lock_renewal_seconds", "probe_timeout",
                  "send_timeout")
_BOOL_OPTIONS = ("sessions", "duplicate_detection")


def from_url(url: str, **options: Any) -> ServiceBusAdapter:
    """`servicebus://NAMESPACE/QUEUE_OR_TOPIC[/SUBSCRIPTION]`; see the module docstring for options."""
    namespace, segments, settings = _parse(url, options)
    connection_string = options.get("connection_string")
    credential = options.get("credential")
    owns_credential = False
    if connection_string is None and credential is None:
        connection_string = os.environ.get(namespace_env_var(namespace)) or os.environ.get(ENV_CONNECTION_STRING)
        if not connection_string:
            connection_string = None
            credential = _default_credential()
            owns_credential = credential is not None
    return ServiceBusAdapter(url, namespace, segments[0], segments[1] if len(segments) == 2 else None,
                             connection_string=connection_string, credential=credential,
                             owns_credential=owns_credential, **settings)


def check_url(url: str, **options: Any) -> None:
    """Raises what `from_url` would for this URL and these options, opening nothing and looking up no
    credential (configuration checks)."""
    _parse(url, options)


def _parse(url: str, options: dict[str, Any]) -> tuple[str, list[str], dict[str, Any]]:
    parts = urlsplit(url)
    if parts.scheme.lower() != "servicebus":
        raise ValueError(f"expected servicebus://NAMESPACE/ENTITY[/SUBSCRIPTION], got {url!r}")
    if parts.username or parts.password:
        raise ValueError("credentials never go in the URL: pass them as options or use the environment")
    namespace = parts.netloc
    segments = [s for s in parts.path.split("/") if s]
    if not namespace or len(segments) not in (1, 2):
        raise ValueError(f"expected servicebus://NAMESPACE/QUEUE_OR_TOPIC[/SUBSCRIPTION], got {url!r}")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    settings: dict[str, Any] = {}
    for key in _INT_OPTIONS + _FLOAT_OPTIONS + _BOOL_OPTIONS + ("default_session",):
        value = query.get(key, options.get(key))
        if value is None:
            continue
        if key in _INT_OPTIONS + _FLOAT_OPTIONS:
            kind = int if key in _INT_OPTIONS else float
            try:
                settings[key] = kind(value)
            except (TypeError, ValueError):
                raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") \
                    from None
        elif key in _BOOL_OPTIONS:
            settings[key] = value if isinstance(value, bool) else str(value).lower() in _BOOL_TRUE
        else:
            settings[key] = str(value)
    return namespace, segments, settings
