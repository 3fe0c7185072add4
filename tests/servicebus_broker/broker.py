"""A protocol-level Azure Service Bus TEST DOUBLE for the real ``azure-servicebus`` SDK.

THIS IS A TEST DOUBLE, NOT A SERVICE BUS EMULATOR. It is our own code, written on python-qpid-proton,
so that tests can drive the real ``azure-servicebus`` client (sync and aio) over real AMQP 1.0 on
127.0.0.1 where Microsoft's emulator (Docker-only) cannot run. It answers the subset of the Service Bus
AMQP protocol that the SDK uses; behaviour outside that subset is absent or simplified. A green test
against it proves our code speaks the protocol the SDK speaks, not that Azure behaves the same way.

Implemented:

- plain AMQP on 127.0.0.1 and a free port, SASL ANONYMOUS; clients connect with
  ``Endpoint=sb://127.0.0.1:PORT/;SharedAccessKeyName=...;SharedAccessKey=...;UseDevelopmentEmulator=true``
  (``UseDevelopmentEmulator`` makes the SDK skip TLS and keep the port);
- CBS ``put-token`` on ``$cbs``: the SAS token's HMAC-SHA256 signature is checked against the key
  (wrong key / key name / expired token → status 401 → ``ServiceBusAuthenticationError``); links to
  entities are refused (``amqp:unauthorized-access``) on a connection that has no valid token;
- queues, topics with subscriptions (every message fans out to every subscription; no rules/filters),
  ``<entity>/$deadletterqueue`` sub-queues; unknown entities → ``amqp:not-found``;
- batched sends (one transfer whose ``data`` sections each hold a whole encoded message) are split;
  proton's binding does not expose the transfer's message-format, so batches are recognised by
  structure (see ``codec.split_batch``);
- the bare message (properties, application properties, body sections, footer) is stored and
  delivered byte for byte; outgoing messages get ``x-opt-sequence-number``, ``x-opt-enqueued-time``,
  ``x-opt-locked-until``, ``x-opt-message-state`` annotations and the header delivery-count;
- peek-lock with 16-byte delivery tags as lock tokens (``UUID(bytes_le=tag)``); receivers'
  rcv-settle-mode *second* is honoured (outcome echoed, then settled); complete (accepted),
  abandon (modified), defer (modified + undeliverable-here), dead-letter (rejected, reason and
  description from the error info), release; receive-and-delete (pre-settled) receivers;
- lock expiry → redelivery with delivery-count + 1; ``max_delivery_count`` → automatic dead-lettering
  (``MaxDeliveryCountExceeded``); settling a message whose lock expired → ``message-lock-lost``;
- sessions: ``com.microsoft:session-filter`` echoed on attach with the session id and
  ``com.microsoft:locked-until-utc``; one receiver per session (``session-cannot-be-locked``),
  next-available session (waits for one up to the link's ``com.microsoft:timeout``), per-session
  order by sequence number;
- ``<entity>/$management`` request/response: ``peek-message``, ``renew-lock``, ``update-disposition``,
  ``schedule-message``, ``cancel-scheduled-message``, ``receive-by-sequence-number``,
  ``renew-session-lock``, ``get-session-state``, ``set-session-state``, ``get-message-sessions``;
- maximum message size (default 256 KiB, the Standard tier) advertised on the link and enforced:
  a larger transfer is rejected with ``amqp:link:message-size-exceeded`` (``MessageSizeExceededError``).

Not implemented (do not test these against the double): TLS, websockets, Entra ID/JWT tokens and
per-entity claims (any valid SAS token authorises every entity), subscription rules and filters,
message TTL/expiry and ``DefaultMessageTimeToLive``, duplicate detection, auto-forwarding,
partitioned entities, transactions, quotas/throttling, the ATOM management REST API
(``ServiceBusAdministrationClient``), session-lock expiry (a session stays locked while its receiver
link is attached; its messages' locks do not expire individually), persistence (state is in memory
and lost on ``stop()``), and realistic performance.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import secrets
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast
from urllib.parse import parse_qs, quote_plus

from proton import (
    UNDESCRIBED,
    Array,
    Condition,
    Connection,
    Data,
    Delivery,
    Endpoint,
    Handler,
    Link,
    Message,
    Terminus,
    symbol,
    ulong,
)
from proton.reactor import ApplicationEvent, Container, EventInjector

from .codec import MalformedMessage, ParsedMessage, detach, split_batch, split_sections, to_timestamp
from .model import (
    DEAD_LETTER_DESCRIPTION,
    DEAD_LETTER_REASON,
    MAX_DELIVERY_COUNT_EXCEEDED,
    STANDARD_MAX_MESSAGE_SIZE,
    BrokerMessage,
    MessageStore,
    State,
    StoredMessage,
    Topic,
    now,
)

__all__ = ["BrokerMessage", "ServiceBusTestBroker"]

_log = logging.getLogger(__name__)

SESSION_FILTER = symbol("com.microsoft:session-filter")
LOCKED_UNTIL_UTC = symbol("com.microsoft:locked-until-utc")
OPERATION_TIMEOUT = "com.microsoft:timeout"
MAX_BATCH_SIZE = symbol("com.microsoft:max-message-batch-size")
DATETIMEOFFSET_EPOCH_TICKS = 621355968000000000
TICK_SECONDS = 0.02
INCOMING_CREDIT = 500
DEFAULT_SESSION_WAIT = 60.0

NOT_FOUND = "amqp:not-found"
UNAUTHORIZED = "amqp:unauthorized-access"
NOT_ALLOWED = "amqp:not-allowed"
DECODE_ERROR = "amqp:decode-error"
SIZE_EXCEEDED = "amqp:link:message-size-exceeded"
LOCK_LOST = "com.microsoft:message-lock-lost"
SESSION_LOCK_LOST = "com.microsoft:session-lock-lost"
SESSION_CANNOT_BE_LOCKED = "com.microsoft:session-cannot-be-locked"
MESSAGE_NOT_FOUND = "com.microsoft:message-not-found"
TIMEOUT = "com.microsoft:timeout"
ARGUMENT_ERROR = "com.microsoft:argument-error"

_T = TypeVar("_T")


class ManagementError(Exception):
    def __init__(self, status: int, condition: str, description: str) -> None:
        super().__init__(description)
        self.status = status
        self.condition = condition
        self.description = description


def entity_path(address: str | None) -> str:
    """``amqps://host:port/q1`` or ``q1/$management`` → the path inside the namespace."""
    if not address:
        return ""
    if "://" in address:
        rest = address.split("://", 1)[1]
        address = rest.split("/", 1)[1] if "/" in rest else ""
    return address.strip("/")


def _key(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _props(message: Message) -> dict[str, Any]:
    props: dict[Any, Any] = dict(message.properties or {})
    return {_key(k): detach(v) for k, v in props.items()}


def _body_map(message: Message) -> dict[str, Any]:
    body = message.body
    if not isinstance(body, dict):
        return {}
    return {_key(k): detach(v) for k, v in body.items()}


def _text(value: Any) -> str | None:
    if value is None:
        return None
    return value.decode() if isinstance(value, bytes) else str(value)


def _condition(name: str, description: str) -> Condition:
    # Always carry an info map, as Service Bus does (a tracking id): pyamqp's sender indexes the error's
    # third field unconditionally and a callback that fails there leaves the send waiting forever.
    return Condition(name, description, {symbol("com.microsoft:tracking-id"): str(uuid.uuid4())})


@dataclass(eq=False)
class _ConnState:
    connection: Connection
    authorized: bool = False
    links: list[_LinkState] = field(default_factory=list)


@dataclass(eq=False)
class _LinkState:
    link: Link
    conn: _ConnState
    kind: str  # "send" (client → entity), "receive" (entity → client), "mgmt-in"/"mgmt-out", "cbs-in"/"cbs-out"
    path: str = ""
    store: MessageStore | None = None
    targets: list[MessageStore] = field(default_factory=list)
    session_id: str | None = None
    session_requested: bool = False
    presettled: bool = False
    wait_deadline: float = 0.0
    unsettled: dict[Any, StoredMessage] = field(default_factory=dict)
    outbox: list[bytes] = field(default_factory=list)
    closed: bool = False


class _Core(Handler):
    """The proton event handler. Every method runs on the container thread under ``self.lock``."""

    def __init__(self, key_name: str, key: str) -> None:
        super().__init__()
        self.lock = threading.RLock()
        self.key_name = key_name
        self.key = key
        self.queues: dict[str, MessageStore] = {}
        self.topics: dict[str, Topic] = {}
        self.conns: dict[Connection, _ConnState] = {}
        self.links: dict[Link, _LinkState] = {}
        self.container: Container | None = None
        self.acceptor: Any = None
        self.timer: Any = None
        self.stopping = False
        self.counters = {"sent": 0, "delivered": 0, "completed": 0}

    # -- entity lookup -----------------------------------------------------------------------

    def stores(self) -> list[MessageStore]:
        result: list[MessageStore] = []
        for queue in self.queues.values():
            result.append(queue)
        for topic in self.topics.values():
            result.extend(topic.subscriptions.values())
        return result

    def resolve_store(self, path: str) -> MessageStore | None:
        parts = path.split("/")
        dead_letter = len(parts) > 1 and parts[-1].lower() == "$deadletterqueue"
        if dead_letter:
            parts = parts[:-1]
        store: MessageStore | None = None
        if len(parts) == 1:
            store = self.queues.get(parts[0].lower())
        elif len(parts) == 3 and parts[1].lower() == "subscriptions":
            topic = self.topics.get(parts[0].lower())
            store = topic.subscriptions.get(parts[2].lower()) if topic else None
        if store is not None and dead_letter:
            store = store.dead_letter
        return store

    def resolve_targets(self, path: str) -> list[MessageStore] | None:
        if "/" in path:
            return None
        queue = self.queues.get(path.lower())
        if queue is not None:
            return [queue]
        topic = self.topics.get(path.lower())
        if topic is not None:
            return list(topic.subscriptions.values())
        return None

    # -- proton plumbing ---------------------------------------------------------------------

    def on_reactor_init(self, event: Any) -> None:
        self.timer = event.container.schedule(TICK_SECONDS, self)

    def on_timer_task(self, event: Any) -> None:
        if self.stopping:
            return
        with self.lock:
            try:
                self.tick()
            except Exception:  # pragma: no cover - keep the broker alive, but say why
                _log.exception("service bus test double: tick failed")
        self.timer = event.container.schedule(TICK_SECONDS, self)

    def on_broker_stop(self, event: Any) -> None:
        self.stopping = True
        if self.timer is not None:
            self.timer.cancel()
        if self.acceptor is not None:
            self.acceptor.close()
        for conn in list(self.conns):
            conn.close()
        if self.container is not None:
            self.container.stop()

    def on_connection_bound(self, event: Any) -> None:
        sasl = event.transport.sasl()
        sasl.allowed_mechs("ANONYMOUS")
        sasl.allow_insecure_mechs = True

    def on_connection_remote_open(self, event: Any) -> None:
        with self.lock:
            conn = event.connection
            self.conns[conn] = _ConnState(conn)
            conn.container = "umcef-servicebus-test-double"
            conn.open()

    def on_session_remote_open(self, event: Any) -> None:
        event.session.open()

    def on_link_remote_open(self, event: Any) -> None:
        with self.lock:
            try:
                self.attach(event.link)
            except Exception:
                _log.exception("service bus test double: attach failed")
                self.refuse(event.link, "amqp:internal-error", "attach failed in the test double")

    def on_link_flow(self, event: Any) -> None:
        with self.lock:
            state = self.links.get(event.link)
            if state is None or state.closed:
                return
            if state.kind == "receive":
                assert state.store is not None
                self.pump(state.store)
            self.flush_outbox(state)
            if event.link.is_sender:
                event.link.drained()

    def on_delivery(self, event: Any) -> None:
        with self.lock:
            delivery = event.delivery
            state = self.links.get(delivery.link)
            if state is None:
                return
            try:
                if delivery.link.is_receiver:
                    self.incoming(state, delivery)
                else:
                    self.outcome(state, delivery)
            except Exception:
                _log.exception("service bus test double: delivery handling failed")

    def on_link_remote_close(self, event: Any) -> None:
        with self.lock:
            self.detach(event.link)
            if event.link.state & Endpoint.LOCAL_ACTIVE:
                event.link.close()

    def on_link_remote_detach(self, event: Any) -> None:
        self.on_link_remote_close(event)

    def on_session_remote_close(self, event: Any) -> None:
        with self.lock:
            for state in list(self.links.values()):
                if state.link.session == event.session:
                    self.detach(state.link)
            if event.session.state & Endpoint.LOCAL_ACTIVE:
                event.session.close()

    def on_connection_remote_close(self, event: Any) -> None:
        with self.lock:
            self.drop_connection(event.connection)
            if event.connection.state & Endpoint.LOCAL_ACTIVE:
                event.connection.close()

    def on_transport_closed(self, event: Any) -> None:
        with self.lock:
            if event.connection is not None:
                self.drop_connection(event.connection)

    def drop_connection(self, connection: Connection) -> None:
        conn = self.conns.pop(connection, None)
        if conn is None:
            return
        for state in list(conn.links):
            self.detach(state.link)

    # -- attach / detach ---------------------------------------------------------------------

    def refuse(self, link: Link, condition: str, description: str) -> None:
        """Refuse an attach the AMQP way: attach back with a null terminus, then detach with the error.

        The null terminus matters: pyamqp then never reports the link as attached, so the SDK raises
        the detach error (e.g. ``amqp:not-found``) instead of sending into a dying link.
        """
        link.source.type = Terminus.UNSPECIFIED
        link.target.type = Terminus.UNSPECIFIED
        link.open()
        link.condition = _condition(condition, description)
        link.close()

    def attach(self, link: Link) -> None:
        conn = self.conns.get(link.connection)
        if conn is None:
            conn = self.conns[link.connection] = _ConnState(link.connection)
        address = link.remote_source.address if link.is_sender else link.remote_target.address
        path = entity_path(address)
        link.snd_settle_mode = link.remote_snd_settle_mode
        link.rcv_settle_mode = link.remote_rcv_settle_mode
        lowered = path.lower()
        if lowered == "$cbs":
            self.open_simple(link, conn, "cbs-out" if link.is_sender else "cbs-in", path)
            return
        if not conn.authorized:
            self.refuse(link, UNAUTHORIZED, f"no valid CBS token was put on this connection before attaching {path}")
            return
        if lowered.endswith("/$management"):
            node_entity = path[: -len("/$management")]
            if self.resolve_store(node_entity) is None and self.resolve_targets(node_entity) is None:
                self.refuse(link, NOT_FOUND, f"The messaging entity '{node_entity}' could not be found.")
                return
            self.open_simple(link, conn, "mgmt-out" if link.is_sender else "mgmt-in", path)
            return
        if link.is_receiver:  # the client sends to an entity
            targets = self.resolve_targets(path)
            if targets is None:
                if self.resolve_store(path) is not None:
                    self.refuse(link, NOT_ALLOWED, f"Cannot send to '{path}': it is not a queue or topic.")
                else:
                    self.refuse(link, NOT_FOUND, f"The messaging entity '{path}' could not be found.")
                return
            state = _LinkState(link, conn, "send", path=path, targets=targets)
            link.target.copy(link.remote_target)
            link.source.copy(link.remote_source)
            max_size = min((t.max_message_size for t in targets), default=STANDARD_MAX_MESSAGE_SIZE)
            link.max_message_size = max_size
            link.properties = {MAX_BATCH_SIZE: ulong(max_size)}
            self.register(state)
            link.open()
            link.flow(INCOMING_CREDIT)
            return
        store = self.resolve_store(path)
        if store is None:
            self.refuse(link, NOT_FOUND, f"The messaging entity '{path}' could not be found.")
            return
        filters = self.source_filters(link)
        session_requested = SESSION_FILTER in filters
        if session_requested and not store.requires_session:
            self.refuse(link, NOT_ALLOWED, f"'{path}' does not require sessions; use a non-session receiver.")
            return
        if store.requires_session and not session_requested:
            self.refuse(link, NOT_ALLOWED, f"'{path}' requires sessions; use a session receiver.")
            return
        state = _LinkState(link, conn, "receive", path=path, store=store, session_requested=session_requested)
        state.presettled = link.remote_snd_settle_mode == Link.SND_SETTLED
        if session_requested:
            wanted = _text(filters.get(SESSION_FILTER))
            if wanted is not None:
                if wanted in store.session_owners:
                    self.refuse(
                        link, SESSION_CANNOT_BE_LOCKED, f"The session '{wanted}' is locked by another receiver."
                    )
                    return
                self.register(state)
                self.open_session_link(state, wanted)
            else:
                timeout_ms = (link.remote_properties or {}).get(symbol(OPERATION_TIMEOUT))
                wait = float(timeout_ms) / 1000.0 if timeout_ms else DEFAULT_SESSION_WAIT
                state.wait_deadline = now() + wait
                self.register(state)
                store.pending_session_links.append(state)
                self.pump(store)
            return
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        self.register(state)
        store.receivers.append(state)
        link.open()

    @staticmethod
    def source_filters(link: Link) -> dict[Any, Any]:
        data = link.remote_source.filter
        data.rewind()
        if not data.next():
            return {}
        obj = detach(data.get_object())
        data.rewind()
        return dict(obj) if isinstance(obj, dict) else {}

    def open_session_link(self, state: _LinkState, session_id: str) -> None:
        store = state.store
        assert store is not None
        link = state.link
        state.session_id = session_id
        store.session_owners[session_id] = state
        locked_until = now() + store.lock_duration
        store.session_locked_until[session_id] = locked_until
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        link.source.filter.clear()
        link.source.filter.put_object({SESSION_FILTER: session_id})
        ticks = DATETIMEOFFSET_EPOCH_TICKS + int(locked_until * 10_000_000)
        link.properties = {LOCKED_UNTIL_UTC: ticks}
        store.receivers.append(state)
        link.open()

    def open_simple(self, link: Link, conn: _ConnState, kind: str, path: str) -> None:
        state = _LinkState(link, conn, kind, path=path)
        link.source.copy(link.remote_source)
        link.target.copy(link.remote_target)
        self.register(state)
        link.open()
        if link.is_receiver:
            link.flow(INCOMING_CREDIT)

    def register(self, state: _LinkState) -> None:
        self.links[state.link] = state
        state.conn.links.append(state)

    def detach(self, link: Link) -> None:
        state = self.links.pop(link, None)
        if state is None or state.closed:
            return
        state.closed = True
        if state in state.conn.links:
            state.conn.links.remove(state)
        store = state.store
        if store is None:
            return
        if state in store.receivers:
            store.receivers.remove(state)
        if state in store.pending_session_links:
            store.pending_session_links.remove(state)
        t = now()
        for msg in list(state.unsettled.values()):
            if msg is _LOST:
                continue
            msg.delivery = None
            msg.link = None
            if state.session_id is not None:
                # Closing a session receiver gives up the session lock and with it the message locks.
                self.abandon(store, msg, t)
        state.unsettled.clear()
        if state.session_id is not None and store.session_owners.get(state.session_id) is state:
            del store.session_owners[state.session_id]
            store.session_locked_until.pop(state.session_id, None)
        self.pump(store)

    # -- incoming transfers ------------------------------------------------------------------

    def incoming(self, state: _LinkState, delivery: Delivery) -> None:
        link = delivery.link
        if delivery.aborted:
            link.advance()
            delivery.settle()
            return
        if delivery.partial:
            return
        payload = link.recv(delivery.pending) or b""
        link.advance()
        if link.credit < INCOMING_CREDIT // 2:
            link.flow(INCOMING_CREDIT - link.credit)
        if state.kind == "send":
            self.handle_send(state, delivery, bytes(payload))
        elif state.kind == "cbs-in":
            self.handle_cbs(state, delivery, bytes(payload))
        elif state.kind == "mgmt-in":
            self.handle_management(state, delivery, bytes(payload))
        else:
            self.reject(delivery, NOT_ALLOWED, "unexpected transfer")

    @staticmethod
    def accept(delivery: Delivery) -> None:
        delivery.update(Delivery.ACCEPTED)
        delivery.settle()

    @staticmethod
    def reject(delivery: Delivery, condition: str, description: str) -> None:
        delivery.local.condition = _condition(condition, description)
        delivery.update(Delivery.REJECTED)
        delivery.settle()

    def handle_send(self, state: _LinkState, delivery: Delivery, payload: bytes) -> None:
        max_size = min((t.max_message_size for t in state.targets), default=STANDARD_MAX_MESSAGE_SIZE)
        if len(payload) > max_size:
            self.reject(
                delivery,
                SIZE_EXCEEDED,
                f"The received message (delivery-id:0, size:{len(payload)} bytes) exceeds the limit "
                f"({max_size} bytes) currently allowed on the link.",
            )
            return
        try:
            sections = split_sections(payload)
            batch = split_batch(sections)
            messages = batch if batch is not None else [ParsedMessage.from_sections(sections, len(payload))]
        except MalformedMessage as exc:
            self.reject(delivery, DECODE_ERROR, str(exc))
            return
        for target in state.targets:
            if target.requires_session and any(m.session_id is None for m in messages):
                self.reject(
                    delivery,
                    NOT_ALLOWED,
                    f"The SessionId was not set on a message, and it cannot be sent to the entity '{target.path}'. "
                    "Entities that have session support enabled can only receive messages that have the SessionId set.",
                )
                return
        t = now()
        for target in state.targets:
            for parsed in messages:
                scheduled = parsed.annotation("x-opt-scheduled-enqueue-time")
                target.enqueue(parsed, now=t, scheduled_at=int(scheduled) / 1000.0 if scheduled else None)
            self.pump(target)
        self.counters["sent"] += len(messages)
        self.accept(delivery)

    # -- CBS ---------------------------------------------------------------------------------

    def validate_token(self, token: Any) -> tuple[bool, str]:
        token = _text(token) or ""
        prefix = "SharedAccessSignature "
        if not token.startswith(prefix):
            return False, "Only SAS tokens (SharedAccessSignature ...) are accepted by the test double."
        fields = {k: v[0] for k, v in parse_qs(token[len(prefix) :], keep_blank_values=True).items()}
        try:
            resource, signature, expiry = fields["sr"], fields["sig"], fields["se"]
        except KeyError:
            return False, "Malformed SAS token."
        if fields.get("skn") != self.key_name:
            return False, f"InvalidSignature: the key name '{fields.get('skn')}' is not known."
        to_sign = f"{quote_plus(resource)}\n{expiry}".encode()
        expected = base64.b64encode(hmac.new(self.key.encode(), to_sign, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(expected, signature):
            return False, "InvalidSignature: The token has an invalid signature."
        if int(expiry) < time.time():
            return False, "ExpiredToken: The token is expired."
        return True, "OK"

    def handle_cbs(self, state: _LinkState, delivery: Delivery, payload: bytes) -> None:
        request = Message()
        request.decode(payload)
        self.accept(delivery)
        props = _props(request)
        if _text(props.get("operation")) != "put-token":
            status, description = 400, "Unsupported CBS operation."
        else:
            ok, description = self.validate_token(request.body)
            status = 200 if ok else 401
            if ok:
                state.conn.authorized = True
        reply = Message(
            correlation_id=request.id,
            properties={"status-code": status, "status-description": description},
        )
        self.reply(state, "cbs-out", reply)

    def reply(self, request_state: _LinkState, kind: str, reply: Message) -> None:
        candidates = [
            s
            for s in request_state.conn.links
            if s.kind == kind and not s.closed and s.path.lower() == request_state.path.lower()
        ]
        same_session = [s for s in candidates if s.link.session == request_state.link.session]
        if not candidates:
            _log.warning("service bus test double: no reply link for %s", request_state.path)
            return
        target = (same_session or candidates)[0]
        target.outbox.append(bytes(reply.encode()))
        self.flush_outbox(target)

    def flush_outbox(self, state: _LinkState) -> None:
        link = state.link
        while state.outbox and link.credit > 0:
            payload = state.outbox.pop(0)
            delivery = link.delivery(uuid.uuid4().bytes)  # type: ignore[arg-type]  # proton takes bytes tags
            link.send(payload)
            link.advance()
            delivery.settle()

    # -- management --------------------------------------------------------------------------

    def handle_management(self, state: _LinkState, delivery: Delivery, payload: bytes) -> None:
        request = Message()
        request.decode(payload)
        self.accept(delivery)
        props = _props(request)
        operation = _text(props.get("operation")) or ""
        entity = state.path[: -len("/$management")]
        body: Any = None
        status = 200
        app: dict[str, Any] = {}
        try:
            handler = self.MANAGEMENT.get(operation)
            if handler is None:
                raise ManagementError(501, "amqp:not-implemented", f"Operation '{operation}' is not implemented.")
            body = handler(self, entity, _body_map(request))
            if body is None:
                status = 204
        except ManagementError as exc:
            status = exc.status
            app["errorCondition"] = symbol(exc.condition)
            app["statusDescription"] = exc.description
        app["statusCode"] = status
        app.setdefault("statusDescription", "OK" if status < 300 else "")
        reply = Message(correlation_id=request.id, properties=app, body=body)
        self.reply(state, "mgmt-out", reply)

    def mgmt_store(self, entity: str) -> MessageStore:
        store = self.resolve_store(entity)
        if store is None:
            raise ManagementError(404, NOT_FOUND, f"The messaging entity '{entity}' is not receivable.")
        return store

    def op_peek(self, entity: str, body: dict[str, Any]) -> Any:
        store = self.mgmt_store(entity)
        start = int(body.get("from-sequence-number") or 0)
        count = int(body.get("message-count") or 1)
        session = _text(body.get("session-id"))
        found: list[dict[str, Any]] = []
        for seq in sorted(store.messages):
            if seq < start:
                continue
            msg = store.messages[seq]
            if session is not None and msg.parsed.session_id != session:
                continue
            found.append({"message": msg.encode(include_lock=True)})
            if len(found) >= count:
                break
        return {"messages": found} if found else None

    def locked_message(self, store: MessageStore, token: Any) -> StoredMessage:
        msg = store.locks.get(token) if isinstance(token, uuid.UUID) else None
        if msg is None or msg.state is not State.LOCKED:
            raise ManagementError(
                410,
                LOCK_LOST,
                "The lock supplied is invalid. Either the lock expired, or the message has already "
                "been removed from the queue.",
            )
        return msg

    def op_renew_lock(self, entity: str, body: dict[str, Any]) -> Any:
        store = self.mgmt_store(entity)
        t = now()
        expirations = []
        for token in list(body.get("lock-tokens") or []):
            msg = self.locked_message(store, token)
            expirations.append(to_timestamp(store.renew(msg, t)))
        return {"expirations": Array(UNDESCRIBED, Data.TIMESTAMP, *expirations)}  # type: ignore[arg-type]

    def op_update_disposition(self, entity: str, body: dict[str, Any]) -> Any:
        store = self.mgmt_store(entity)
        status = _text(body.get("disposition-status"))
        t = now()
        for token in list(body.get("lock-tokens") or []):
            msg = self.locked_message(store, token)
            delivery = msg.delivery
            link_state = msg.link
            if link_state is not None and delivery is not None:
                link_state.unsettled.pop(delivery, None)
            if status == "completed":
                self.complete(store, msg)
            elif status == "abandoned":
                self.abandon(store, msg, t)
            elif status == "defered":
                store.defer(msg)
            elif status == "suspended":
                self.dead_letter(
                    store, msg, _text(body.get("deadletter-reason")), _text(body.get("deadletter-description")), t
                )
            else:
                raise ManagementError(400, ARGUMENT_ERROR, f"Unknown disposition-status '{status}'.")
            if delivery is not None:
                delivery.update(Delivery.ACCEPTED if status == "completed" else Delivery.MODIFIED)
                delivery.settle()
        self.pump(store)
        return {}

    def op_schedule(self, entity: str, body: dict[str, Any]) -> Any:
        targets = self.resolve_targets(entity)
        if targets is None:
            raise ManagementError(404, NOT_FOUND, f"'{entity}' is not a queue or topic.")
        numbers: list[int] = []
        t = now()
        for item in list(body.get("messages") or []):
            fields = {_key(k): v for k, v in dict(item).items()}
            try:
                parsed = ParsedMessage.decode(bytes(fields["message"]))
            except (KeyError, MalformedMessage) as exc:
                raise ManagementError(400, ARGUMENT_ERROR, f"bad scheduled message: {exc}") from exc
            when = parsed.annotation("x-opt-scheduled-enqueue-time")
            scheduled_at = int(when) / 1000.0 if when else t
            for store in targets:
                stored = store.enqueue(parsed, now=t, scheduled_at=scheduled_at)
            numbers.append(stored.sequence_number)
        for store in targets:
            self.pump(store)
        return {"sequence-numbers": Array(UNDESCRIBED, Data.LONG, *numbers)}  # type: ignore[arg-type]

    def op_cancel_scheduled(self, entity: str, body: dict[str, Any]) -> Any:
        targets = self.resolve_targets(entity) or []
        for seq in list(body.get("sequence-numbers") or []):
            for store in targets:
                msg = store.messages.get(int(seq))
                if msg is not None and msg.state is State.SCHEDULED:
                    store.remove(msg)
        return {}

    def op_receive_by_sequence(self, entity: str, body: dict[str, Any]) -> Any:
        store = self.mgmt_store(entity)
        t = now()
        delete = int(body.get("receiver-settle-mode") or 1) == 0
        found: list[dict[str, Any]] = []
        for seq in list(body.get("sequence-numbers") or []):
            msg = store.messages.get(int(seq))
            if msg is None or msg.state is not State.DEFERRED:
                raise ManagementError(
                    404, MESSAGE_NOT_FOUND, f"Failed to retrieve the deferred message with sequence number {seq}."
                )
            token = uuid.uuid4()
            if delete:
                found.append({"message": msg.encode(include_lock=False)})
                store.remove(msg)
            else:
                store.lock(msg, None, t, token)
                found.append({"message": msg.encode(include_lock=True), "lock-token": token})
        return {"messages": found} if found else None

    def session_of(self, store: MessageStore, body: dict[str, Any]) -> str:
        session = _text(body.get("session-id"))
        if session is None:
            raise ManagementError(400, ARGUMENT_ERROR, "session-id is required.")
        return session

    def op_renew_session_lock(self, entity: str, body: dict[str, Any]) -> Any:
        store = self.mgmt_store(entity)
        session = self.session_of(store, body)
        if session not in store.session_owners:
            raise ManagementError(410, SESSION_LOCK_LOST, f"The session lock for '{session}' was lost.")
        until = now() + store.lock_duration
        store.session_locked_until[session] = until
        return {"expiration": to_timestamp(until)}

    def op_get_session_state(self, entity: str, body: dict[str, Any]) -> Any:
        store = self.mgmt_store(entity)
        session = self.session_of(store, body)
        return {"session-state": store.session_states.get(session)}

    def op_set_session_state(self, entity: str, body: dict[str, Any]) -> Any:
        store = self.mgmt_store(entity)
        session = self.session_of(store, body)
        value = body.get("session-state")
        store.session_states[session] = bytes(value) if value is not None else None
        return {}

    def op_get_sessions(self, entity: str, body: dict[str, Any]) -> Any:
        store = self.mgmt_store(entity)
        skip = int(body.get("skip") or 0)
        top = int(body.get("top") or 100)
        sessions = sorted({m.session_key for m in store.messages.values() if m.session_key is not None})
        page = sessions[skip : skip + top]
        if not page:
            return None
        return {"skip": skip + len(page), "sessions-ids": page}

    MANAGEMENT: dict[str, Callable[[_Core, str, dict[str, Any]], Any]] = {
        "com.microsoft:peek-message": op_peek,
        "com.microsoft:renew-lock": op_renew_lock,
        "com.microsoft:update-disposition": op_update_disposition,
        "com.microsoft:schedule-message": op_schedule,
        "com.microsoft:cancel-scheduled-message": op_cancel_scheduled,
        "com.microsoft:receive-by-sequence-number": op_receive_by_sequence,
        "com.microsoft:renew-session-lock": op_renew_session_lock,
        "com.microsoft:get-session-state": op_get_session_state,
        "com.microsoft:set-session-state": op_set_session_state,
        "com.microsoft:get-message-sessions": op_get_sessions,
    }

    # -- delivering --------------------------------------------------------------------------

    def pump(self, store: MessageStore) -> None:
        if store.requires_session:
            self.assign_sessions(store)
            for state in list(store.receivers):
                if state.session_id is None:
                    continue
                while state.link.credit > 0 and not state.closed:
                    msg = store.take(state.session_id)
                    if msg is None:
                        break
                    self.deliver(store, state, msg)
            return
        while True:
            ready = [s for s in store.receivers if s.link.credit > 0 and not s.closed]
            if not ready or store.peek_available(None) is None:
                return
            for i in range(len(ready)):
                state = ready[(store.rr_offset + i) % len(ready)]
                msg = store.take(None)
                if msg is None:
                    return
                self.deliver(store, state, msg)
            store.rr_offset += 1

    def assign_sessions(self, store: MessageStore) -> None:
        if not store.pending_session_links:
            return
        for session in store.sessions_with_messages():
            if not store.pending_session_links:
                return
            if session in store.session_owners:
                continue
            state = store.pending_session_links.pop(0)
            self.open_session_link(state, session)

    def deliver(self, store: MessageStore, state: _LinkState, msg: StoredMessage) -> None:
        link = state.link
        token = uuid.uuid4()
        t = now()
        store.lock(msg, state, t, token)
        payload = msg.encode(include_lock=not state.presettled)
        delivery = link.delivery(token.bytes_le)  # type: ignore[arg-type]  # 16-byte tag = lock token
        link.send(payload)
        link.advance()
        self.counters["delivered"] += 1
        if state.presettled:
            delivery.settle()
            store.remove(msg)
            return
        msg.delivery = delivery
        state.unsettled[delivery] = msg

    def outcome(self, state: _LinkState, delivery: Delivery) -> None:
        if state.kind != "receive":
            if delivery.settled:
                delivery.settle()
            return
        remote = delivery.remote_state
        msg = state.unsettled.pop(delivery, None)
        store = state.store
        assert store is not None
        if msg is None or msg.delivery is None or msg.delivery != delivery:
            # The lock expired (or the message moved on) before the client settled it.
            if remote in (Delivery.ACCEPTED, Delivery.REJECTED, Delivery.MODIFIED) and not delivery.settled:
                self.reject(
                    delivery,
                    LOCK_LOST,
                    "The lock supplied is invalid. Either the lock expired, or the "
                    "message has already been removed from the queue.",
                )
            elif delivery.settled or remote:
                delivery.settle()
            return
        t = now()
        if remote == Delivery.ACCEPTED:
            self.complete(store, msg)
            delivery.update(Delivery.ACCEPTED)
        elif remote == Delivery.RELEASED:
            store.make_available(msg)
            delivery.update(Delivery.RELEASED)
        elif remote == Delivery.MODIFIED:
            annotations = delivery.remote.annotations
            if isinstance(annotations, dict):
                msg.extra_annotations.update({str(k): detach(v) for k, v in annotations.items()})
            if delivery.remote.undeliverable:
                store.defer(msg)
            else:
                self.abandon(store, msg, t)
            delivery.local.failed = delivery.remote.failed
            delivery.local.undeliverable = delivery.remote.undeliverable
            delivery.update(Delivery.MODIFIED)
        elif remote == Delivery.REJECTED:
            condition = delivery.remote.condition
            raw_info = condition.info if condition is not None else None
            info = {_key(k): v for k, v in raw_info.items()} if isinstance(raw_info, dict) else {}
            reason = _text(info.get(DEAD_LETTER_REASON))
            description = _text(info.get(DEAD_LETTER_DESCRIPTION))
            if description is None and condition is not None:
                description = condition.description
            self.dead_letter(store, msg, reason, description, t)
            # Echo a bare 'rejected': the SDK treats a rejected echo that carries an error as a failed
            # settlement (that is how the service reports e.g. message-lock-lost).
            delivery.update(Delivery.REJECTED)
        else:
            # No outcome yet (e.g. a bare 'received' state): keep waiting.
            state.unsettled[delivery] = msg
            return
        delivery.settle()
        self.pump(store)

    def complete(self, store: MessageStore, msg: StoredMessage) -> None:
        store.remove(msg)
        self.counters["completed"] += 1

    def abandon(self, store: MessageStore, msg: StoredMessage, t: float) -> None:
        msg.delivery_count += 1
        if msg.delivery_count >= store.max_delivery_count and not store.is_dead_letter:
            self.dead_letter(
                store,
                msg,
                MAX_DELIVERY_COUNT_EXCEEDED,
                f"Message could not be consumed after {store.max_delivery_count} delivery attempts.",
                t,
            )
        else:
            store.make_available(msg)

    def dead_letter(
        self, store: MessageStore, msg: StoredMessage, reason: str | None, description: str | None, t: float
    ) -> None:
        store.remove(msg)
        if store.dead_letter is None:  # dead-lettering from the DLQ itself: the message is dropped
            return
        extra_app: dict[str, Any] = dict(msg.extra_application_properties)
        if reason is not None:
            extra_app[DEAD_LETTER_REASON] = reason
        if description is not None:
            extra_app[DEAD_LETTER_DESCRIPTION] = description
        moved = store.dead_letter.enqueue(
            msg.parsed,
            now=t,
            extra_application_properties=extra_app,
            extra_annotations={**msg.extra_annotations, "x-opt-deadletter-source": store.path},
        )
        moved.delivery_count = msg.delivery_count
        moved.enqueued_time = msg.enqueued_time
        self.pump(store.dead_letter)

    # -- periodic work -----------------------------------------------------------------------

    def tick(self) -> None:
        t = now()
        for store in self.stores():
            for sub in (store, store.dead_letter):
                if sub is None:
                    continue
                touched = False
                for msg in sub.due_scheduled(t):
                    msg.scheduled_at = None
                    sub.make_available(msg)
                    touched = True
                for msg in sub.expired_locks(t):
                    touched = True
                    state = msg.link
                    if state is not None and msg.delivery is not None:
                        state.unsettled.pop(msg.delivery, None)
                        # Keep the proton delivery known so a late settlement gets 'message-lock-lost'.
                        state.unsettled.setdefault(msg.delivery, _LOST)
                    self.abandon(sub, msg, t)
                for state in list(sub.pending_session_links):
                    if state.wait_deadline <= t:
                        sub.pending_session_links.remove(state)
                        self.links.pop(state.link, None)
                        if state in state.conn.links:
                            state.conn.links.remove(state)
                        state.closed = True
                        self.refuse(state.link, TIMEOUT, "No session available to receive from within the timeout.")
                if touched or sub.pending_session_links:
                    self.pump(sub)


# Sentinel for deliveries whose message lock expired: outcome() answers them with message-lock-lost.
_LOST = StoredMessage(0, 0.0, ParsedMessage(), None)


class ServiceBusTestBroker:
    """Start a Service Bus test double in a background thread; see the module docstring for its scope.

    >>> broker = ServiceBusTestBroker().start()
    >>> broker.create_queue("q1", lock_duration=2)
    >>> ServiceBusClient.from_connection_string(broker.connection_string)  # doctest: +SKIP
    >>> broker.stop()
    """

    def __init__(
        self, *, host: str = "127.0.0.1", key_name: str = "RootManageSharedAccessKey", key: str | None = None
    ) -> None:
        self.host = host
        self.key_name = key_name
        self.key = key or base64.b64encode(secrets.token_bytes(32)).decode()
        self.port = 0
        self._core = _Core(self.key_name, self.key)
        self._container: Container | None = None
        self._injector: EventInjector | None = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> ServiceBusTestBroker:
        container = Container(self._core)
        container.container_id = "umcef-servicebus-test-double"
        acceptor = container.acceptor(self.host, 0)  # type: ignore[arg-type]  # 0: the OS picks a free port
        listener = cast(socket.socket, acceptor._selectable._delegate)
        self.port = int(listener.getsockname()[1])
        self._core.acceptor = acceptor
        self._core.container = container
        injector = EventInjector()
        container.selectable(injector)
        self._container, self._injector = container, injector
        self._thread = threading.Thread(target=self._run, name=f"servicebus-test-double-{self.port}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        assert self._container is not None
        try:
            self._container.run()
        except BaseException as exc:  # pragma: no cover - surfaced by stop()
            self._error = exc
            _log.exception("service bus test double crashed")

    def stop(self, timeout: float = 5.0) -> None:
        if self._injector is None or self._thread is None:
            return
        self._injector.trigger(ApplicationEvent("broker_stop"))
        self._thread.join(timeout)
        self._injector.close()
        self._injector = None
        if self._error is not None:
            raise RuntimeError("the Service Bus test double crashed") from self._error

    def __enter__(self) -> ServiceBusTestBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- connection strings --------------------------------------------------------------------

    @property
    def namespace(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def connection_string(self) -> str:
        return self.connection_string_for()

    def connection_string_for(
        self, *, key: str | None = None, key_name: str | None = None, entity: str | None = None
    ) -> str:
        parts = [
            f"Endpoint=sb://{self.namespace}/",
            f"SharedAccessKeyName={key_name or self.key_name}",
            f"SharedAccessKey={key or self.key}",
        ]
        if entity:
            parts.append(f"EntityPath={entity}")
        parts.append("UseDevelopmentEmulator=true")
        return ";".join(parts)

    # -- entities ------------------------------------------------------------------------------

    def create_queue(
        self,
        name: str,
        *,
        requires_session: bool = False,
        max_delivery_count: int = 10,
        lock_duration: float = 30.0,
        max_message_size: int = STANDARD_MAX_MESSAGE_SIZE,
    ) -> None:
        with self._core.lock:
            if name.lower() in self._core.queues or name.lower() in self._core.topics:
                raise ValueError(f"entity {name!r} already exists")
            self._core.queues[name.lower()] = MessageStore(
                name,
                requires_session=requires_session,
                max_delivery_count=max_delivery_count,
                lock_duration=lock_duration,
                max_message_size=max_message_size,
            )

    def create_topic(self, name: str) -> None:
        with self._core.lock:
            if name.lower() in self._core.queues or name.lower() in self._core.topics:
                raise ValueError(f"entity {name!r} already exists")
            self._core.topics[name.lower()] = Topic(name)

    def create_subscription(
        self,
        topic: str,
        name: str,
        *,
        requires_session: bool = False,
        max_delivery_count: int = 10,
        lock_duration: float = 30.0,
        max_message_size: int = STANDARD_MAX_MESSAGE_SIZE,
    ) -> None:
        with self._core.lock:
            owner = self._core.topics.get(topic.lower())
            if owner is None:
                raise KeyError(f"no topic {topic!r}")
            if name.lower() in owner.subscriptions:
                raise ValueError(f"subscription {topic}/{name} already exists")
            owner.subscriptions[name.lower()] = MessageStore(
                f"{owner.name}/Subscriptions/{name}",
                requires_session=requires_session,
                max_delivery_count=max_delivery_count,
                lock_duration=lock_duration,
                max_message_size=max_message_size,
            )

    # -- introspection -------------------------------------------------------------------------

    def _store(self, entity: str) -> MessageStore:
        store = self._core.resolve_store(entity.strip("/"))
        if store is None:
            raise KeyError(f"no receivable entity {entity!r} (use 'queue' or 'topic/subscriptions/sub')")
        return store

    def messages(self, entity: str) -> list[BrokerMessage]:
        """Active messages of a queue, subscription or DLQ path (available, locked, deferred, scheduled)."""
        with self._core.lock:
            return self._store(entity).snapshot()

    def dead_letters(self, entity: str) -> list[BrokerMessage]:
        """Messages in ``entity``'s dead-letter sub-queue."""
        with self._core.lock:
            store = self._store(entity)
            assert store.dead_letter is not None
            return store.dead_letter.snapshot()

    def counters(self) -> dict[str, int]:
        with self._core.lock:
            return dict(self._core.counters)

    def wait_for(self, predicate: Callable[[], _T], timeout: float = 10.0, interval: float = 0.01) -> _T:
        """Poll ``predicate`` until it returns something truthy, or raise ``TimeoutError``."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() >= deadline:
                raise TimeoutError("condition not met within the deadline")
            time.sleep(interval)
