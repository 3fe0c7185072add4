"""The `kafka://HOST:PORT[,HOST:PORT...]/TOPIC?group=G&mode=binary|structured` adapter.

Publishing goes through confluent-kafka (librdkafka), consuming through aiokafka. Wire mapping:
`umcef.fabric.bindings.kafka` (the CloudEvents Kafka binding; binary mode by default). What this module
adds is the I/O and the delivery semantics of the contract (`docs/adapters.md`):

- publish: each event is encoded and size-checked (`Rejected` events are never sent; the size comes
  from the encoding pass, the exact record-batch size is computed only near the limit) and its record
  is handed to librdkafka with `produce()` right away, from the event loop; librdkafka batches per
  partition in its own threads. The call then waits for one future per chunk: a poll thread serves the
  delivery reports and resolves it on the loop once every record of the chunk has its report. One
  outcome per event. The topic must exist: it is looked up with a metadata request that forbids
  auto-creation (`NotFound` otherwise), and the producer never asks for auto-creation either.
  confluent's own `AIOProducer` is not used: it refuses headers, and binary mode needs them.
- consume: a consumer group with manual commits. Deliveries run concurrently across keys and in
  order within a key (records with the same Kafka key, i.e. the same `partitionkey`, never overlap).
  Only the contiguous prefix of acknowledged offsets of a partition is committed. A nack pauses the
  partition until `requeue_after`, then seeks back to the nacked offset: Kafka has no per-message
  redelivery, so the broker sends that record again (and what follows it; acknowledged records and
  ones still being handled are skipped when they come round again). Attempts are counted in memory.
- probe: one ApiVersions round trip on an already open connection, bounded by `probe_timeout`.

Options (keyword arguments of `from_url`), with why the defaults are what they are:

- producer: `acks="all"` (an event counts as published only when all in-sync replicas have it) and
  idempotence (`enable_idempotence`, default: on whenever acks is "all", which it needs): the broker
  drops duplicates caused by the producer's own retries, and a partition's order survives them.
  `linger_ms=0`: a publish call's records go out at once (records queued while a request is in flight
  are batched anyway); a linger adds its full length to every publish that is awaited before the next,
  which is how the delivery worker publishes (docs/mapping-kafka.md has the measurements). When publishes
  overlap a linger pays, so from `busy_events_per_s=10000` published events/s on, most of them in
  overlapping publishes, until the rate falls below half of it, publishes go through a second producer
  with `busy_linger_ms=2`: fewer, larger produce requests. The first publish after a switch waits until
  the other producer's records have their reports, so a partition keeps its order. `busy_linger_ms` <=
  `linger_ms` turns this off.
  `compression_type=None`, `max_batch_bytes=512 KiB` (`batch.size`), `request_timeout_ms=30000`,
  `delivery_timeout_ms=30000` (`message.timeout.ms`: a record not acknowledged by then is
  `Transient`), `max_queued_messages=100000` (librdkafka's queue) and `queue_full_timeout=1` s (how long
  a publish waits for room in a full queue before the rest of its events are `Throttled`).
- `max_event_bytes=1 MiB`: checked against `encoded_size`, the record batch the broker measures against
  `message.max.bytes` (default 1048588, i.e. 1 MiB + 12); the producer's `message.max.bytes` is set to
  it too, so its batches stay within what the broker takes.
- `max_batch=10000` events per chunk (publish splits longer batches).
- `key_mapper`: event -> Kafka key; default the spec's `partitionkey` mapper.
- consumer: `auto_offset_reset="earliest"` (a new group must not skip events published before it
  joined: at-least-once), `session_timeout_ms`, `heartbeat_interval_ms`, `max_poll_interval_ms`,
  `rebalance_timeout_ms`, `fetch_max_wait_ms`, `isolation_level`, `group_instance_id`,
  `commit_interval` (seconds between commits of the acknowledged prefix), `close_grace` (seconds
  `close()` lets running handlers finish, and unacknowledged published records be delivered, before it
  abandons them: handlers like a crash, records as `Transient`).
- bounds: `connect_timeout=10` s (aiokafka's bootstrap can otherwise hang on an unreachable address;
  librdkafka's `socket.connection.setup.timeout.ms`), `metadata_timeout=10` s, `probe_timeout=5` s;
  `topic_cache_seconds=60` (how long a found topic is not looked up again).
- connection/credentials (never from the URL), given to both clients: `security_protocol`,
  `ssl_cafile`, `ssl_certfile`, `ssl_keyfile`, `ssl_password`, `ssl_check_hostname`, `sasl_mechanism`,
  `sasl_plain_username`, `sasl_plain_password` (also SCRAM's), `sasl_oauth_token_provider` (an aiokafka
  `AbstractTokenProvider`; the producer asks it for tokens through the event loop), `client_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiokafka.errors as kafka_errors  # type: ignore[import-untyped]
from aiokafka import AIOKafkaConsumer
from aiokafka.abc import ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka.client import AIOKafkaClient  # type: ignore[import-untyped]
from aiokafka.helpers import create_ssl_context  # type: ignore[import-untyped]
from aiokafka.protocol.admin import ApiVersionRequest  # type: ignore[import-untyped]
from aiokafka.protocol.metadata import MetadataRequest  # type: ignore[import-untyped]
from confluent_kafka import KafkaError, KafkaException, Producer

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
from umcef.fabric.bindings import kafka as binding
from umcef.fabric.errors import EventError
from umcef.fabric.event import Event

log = logging.getLogger(__name__)
_librdkafka_log = logging.getLogger(f"{__name__}.librdkafka")  # librdkafka's own log lines, by syslog level

DEFAULT_PORT = 9092
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
DEFAULT_GROUP = "umcef"
UNKNOWN_TOPIC_OR_PARTITION = 3
TOPIC_AUTHORIZATION_FAILED = 29
_POLL_MS = 100  # longest a stop or a due redelivery waits for the consume loop to notice it
_PRODUCER_POLL_S = 0.1  # longest the producer's poll thread takes to notice close()
_LIBRDKAFKA_MIN_MESSAGE_MAX_BYTES = 1000
_RATE_WINDOW_S = 0.1  # the publish rate that picks the producer is measured over windows at least this long
# How long the first publish after a switch of producer waits for the other one's records to be reported
# (normally a linger and a round trip) before it stays on that producer instead.
_SWITCH_WAIT_S = 1.0


@dataclass(frozen=True)
class KafkaOptions:
    """Everything `from_url` accepts besides the URL; unknown options are a TypeError (a typo in a
    destination's config must not be silently ignored)."""

    acks: int | str = "all"
    enable_idempotence: bool | None = None  # None: on whenever acks is "all"
    linger_ms: float = 0
    busy_linger_ms: float = 2.0
    busy_events_per_s: float = 10_000
    compression_type: str | None = None
    max_batch_bytes: int = 512 * 1024
    request_timeout_ms: int = 30_000
    delivery_timeout_ms: int = 30_000
    max_queued_messages: int = 100_000
    queue_full_timeout: float = 1.0
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    max_batch: int = 10_000
    key_mapper: binding.KeyMapper = binding.partitionkey_mapper
    auto_offset_reset: str = "earliest"
    session_timeout_ms: int = 10_000
    heartbeat_interval_ms: int = 3_000
    max_poll_interval_ms: int = 300_000
    rebalance_timeout_ms: int | None = None
    fetch_max_wait_ms: int = 500
    isolation_level: str = "read_uncommitted"
    group_instance_id: str | None = None
    commit_interval: float = 0.25
    close_grace: float = 5.0
    connect_timeout: float = 10.0
    metadata_timeout: float = 10.0
    probe_timeout: float = 5.0
    topic_cache_seconds: float = 60.0
    client_id: str = "umcef"
    security_protocol: str = "PLAINTEXT"
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_password: str | None = field(default=None, repr=False)
    ssl_check_hostname: bool = True
    sasl_mechanism: str = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    sasl_oauth_token_provider: Any = None

    @property
    def adaptive(self) -> bool:
        """Whether busy publishing goes through a second, lingering producer (`KafkaAdapter._update_busy`)."""
        return self.busy_linger_ms > self.linger_ms

    @property
    def idempotent(self) -> bool:
        return self.acks in (-1, "all") if self.enable_idempotence is None else self.enable_idempotence

    def connection(self) -> dict[str, Any]:
        """What every aiokafka client (consumer, metadata client) gets."""
        ssl_context = None
        if self.security_protocol.upper() in ("SSL", "SASL_SSL"):
            ssl_context = create_ssl_context(cafile=self.ssl_cafile, certfile=self.ssl_certfile,
                                             keyfile=self.ssl_keyfile, password=self.ssl_password)
            ssl_context.check_hostname = self.ssl_check_hostname
        return {
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
            "ssl_context": ssl_context,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": self.sasl_plain_password,
            "sasl_oauth_token_provider": self.sasl_oauth_token_provider,
        }

    def producer_config(self, bootstrap: Sequence[str], busy: bool = False) -> dict[str, Any]:
        """The librdkafka configuration of the producer, or of the busy one (callbacks are added by
        `_Producer`)."""
        config: dict[str, Any] = {
            "bootstrap.servers": ",".join(bootstrap),
            "client.id": self.client_id,
            "acks": str(self.acks),
            "enable.idempotence": self.idempotent,
            "linger.ms": self.busy_linger_ms if busy else self.linger_ms,
            "compression.type": self.compression_type or "none",
            "batch.size": self.max_batch_bytes,
            # Our own check decides (it is exact and stricter than librdkafka's estimate); this keeps
            # librdkafka's multi-record batches within what the broker takes too.
            "message.max.bytes": max(_LIBRDKAFKA_MIN_MESSAGE_MAX_BYTES, self.max_event_bytes),
            "request.timeout.ms": self.request_timeout_ms,
            "message.timeout.ms": self.delivery_timeout_ms,
            "queue.buffering.max.messages": self.max_queued_messages,
            "socket.connection.setup.timeout.ms": max(1000, int(self.connect_timeout * 1000)),
            "allow.auto.create.topics": False,  # never create a topic by producing to it
            # The Java client's (and aiokafka's) key -> partition mapping, not librdkafka's CRC32 default:
            # a key stays on its partition whichever of these clients wrote it before.
            "partitioner": "murmur2_random",
            "log.connection.close": False,  # a broker closing idle connections is not news
        }
        protocol = self.security_protocol.upper()
        config["security.protocol"] = protocol
        if protocol in ("SSL", "SASL_SSL"):
            for option, key in (("ssl_cafile", "ssl.ca.location"), ("ssl_certfile", "ssl.certificate.location"),
                                ("ssl_keyfile", "ssl.key.location"), ("ssl_password", "ssl.key.password")):
                if getattr(self, option) is not None:
                    config[key] = getattr(self, option)
            config["ssl.endpoint.identification.algorithm"] = "https" if self.ssl_check_hostname else "none"
        if protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            config["sasl.mechanism"] = self.sasl_mechanism
            if self.sasl_plain_username is not None:
                config["sasl.username"] = self.sasl_plain_username
            if self.sasl_plain_password is not None:
                config["sasl.password"] = self.sasl_plain_password
        return config


# --------------------------------------------------------------------------------------------------
# error classification


_REJECTED = (
    kafka_errors.MessageSizeTooLargeError,
    kafka_errors.RecordListTooLargeError,
    kafka_errors.RecordTooLargeError,
    kafka_errors.CorruptRecordException,
    kafka_errors.InvalidTimestampError,
)
_UNAUTHORIZED = (
    kafka_errors.TopicAuthorizationFailedError,
    kafka_errors.GroupAuthorizationFailedError,
    kafka_errors.ClusterAuthorizationFailedError,
    kafka_errors.TransactionalIdAuthorizationFailed,
    kafka_errors.SaslAuthenticationFailed,
    kafka_errors.AuthenticationFailedError,
    kafka_errors.AuthenticationMethodNotSupported,
    kafka_errors.UnsupportedSaslMechanismError,
    kafka_errors.IllegalSaslStateError,
)
_NOT_FOUND = (kafka_errors.UnknownTopicOrPartitionError, kafka_errors.InvalidTopicError)

# librdkafka's error codes (delivery reports, produce() failures) by contract error; anything else,
# e.g. _MSG_TIMED_OUT, _TRANSPORT, _ALL_BROKERS_DOWN, NOT_LEADER_FOR_PARTITION, is Transient.
_REJECTED_CODES = frozenset({
    KafkaError.MSG_SIZE_TOO_LARGE,
    KafkaError.RECORD_LIST_TOO_LARGE,
    KafkaError.INVALID_MSG,  # CORRUPT_MESSAGE
    KafkaError.INVALID_MSG_SIZE,
    KafkaError.INVALID_RECORD,
    KafkaError.INVALID_TIMESTAMP,
})
_UNAUTHORIZED_CODES = frozenset({
    KafkaError.TOPIC_AUTHORIZATION_FAILED,
    KafkaError.GROUP_AUTHORIZATION_FAILED,
    KafkaError.CLUSTER_AUTHORIZATION_FAILED,  # e.g. no IdempotentWrite permission
    KafkaError.TRANSACTIONAL_ID_AUTHORIZATION_FAILED,
    KafkaError.SASL_AUTHENTICATION_FAILED,
    KafkaError.UNSUPPORTED_SASL_MECHANISM,
    KafkaError.ILLEGAL_SASL_STATE,
    KafkaError.DELEGATION_TOKEN_AUTHORIZATION_FAILED,
    KafkaError._AUTHENTICATION,
})
_NOT_FOUND_CODES = frozenset({
    KafkaError.UNKNOWN_TOPIC_OR_PART,
    KafkaError.TOPIC_EXCEPTION,  # an invalid topic name
    KafkaError.UNKNOWN_TOPIC_ID,
    KafkaError._UNKNOWN_TOPIC,
    KafkaError._UNKNOWN_PARTITION,
})
_THROTTLED_CODES = frozenset({KafkaError.THROTTLING_QUOTA_EXCEEDED, KafkaError._QUEUE_FULL})


def classify(exc: BaseException, what: str) -> AdapterError:
    """A client-library failure as one of the contract's typed errors.

    Anything not known to be about the event itself (size, corruption) or about permissions or a
    missing topic is `Transient`: a broker-level error the next attempt may not meet again must never
    send an event to the dead-letter queue.
    """
    if isinstance(exc, AdapterError):
        return exc
    if isinstance(exc, KafkaException) and exc.args and isinstance(exc.args[0], KafkaError):
        return classify_error(exc.args[0], what)
    text = str(exc)
    name = type(exc).__name__
    reason = f"{what}: {text if name in text else f'{name}: {text}'}".rstrip(": ")
    if isinstance(exc, _REJECTED):
        return Rejected(reason)
    if isinstance(exc, _UNAUTHORIZED):
        return Unauthorized(reason)
    if isinstance(exc, _NOT_FOUND):
        return NotFound(reason)
    if isinstance(exc, kafka_errors.QuotaViolationError):
        # Brokers usually throttle by delaying responses; an explicit quota error asks us to back off.
        return Throttled(reason, retry_after=1.0)
    return Transient(reason)


def classify_error(err: KafkaError, what: str) -> AdapterError:
    """A librdkafka error (a delivery report's, or one raised by `produce()`) as a contract error."""
    code = err.code()
    reason = f"{what}: {err.name()}: {err.str()}"
    if code in _REJECTED_CODES:
        return Rejected(reason)
    if code in _UNAUTHORIZED_CODES:
        return Unauthorized(reason)
    if code in _NOT_FOUND_CODES:
        return NotFound(reason)
    if code in _THROTTLED_CODES:
        return Throttled(reason, retry_after=1.0)
    return Transient(reason)


# --------------------------------------------------------------------------------------------------
# publishing: librdkafka behind asyncio


_PENDING: Any = object()  # a record whose delivery report has not arrived yet


class _Chunk:
    """The records of one `KafkaAdapter._send_chunk` call and their delivery reports.

    The loop thread counts what it handed to librdkafka (`sent`, then `closed`); the poll thread, the
    only one that serves delivery reports, counts them (`done`). Whichever sees `done == sent` after
    `closed` resolves the future (both may: resolving is idempotent), so no counter is written by two
    threads.
    """

    __slots__ = ("closed", "done", "future", "loop", "results", "sent")

    def __init__(self, loop: asyncio.AbstractEventLoop, count: int) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.results: list[Any] = [_PENDING] * count  # KafkaError, AdapterError or None (delivered)
        self.sent = 0
        self.done = 0
        self.closed = False

    def delivered(self, index: int, err: KafkaError | None, msg: Any) -> None:  # in the poll thread
        self.results[index] = err
        self.done += 1
        if self.closed and self.done == self.sent:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                self.loop.call_soon_threadsafe(self.resolve)

    def resolve(self) -> None:
        if not self.future.done():
            self.future.set_result(None)


def _rejected_for_good(result: Any) -> bool:
    return isinstance(result, KafkaError) and result.code() in _REJECTED_CODES


class _Producer:
    """A confluent-kafka producer and the thread that serves its delivery reports (and logs).

    `produce()` runs on the event loop (it only queues the record); librdkafka's threads batch and send;
    the poll thread runs the delivery callbacks and hands each finished chunk back to its loop.
    """

    def __init__(self, config: dict[str, Any], name: str, oauth: Any = None) -> None:
        self.fatal: KafkaError | None = None
        self.stuck = False  # a whole chunk timed out without a single delivery: replace this instance
        self.outstanding: set[asyncio.Future[None]] = set()  # chunks not yet fully reported (loop thread)
        self.failures = 0  # chunks with a record that was not delivered (loop thread)
        config = {**config, "error_cb": self._error, "logger": _librdkafka_log}
        if oauth is not None:
            config["oauth_cb"] = oauth
        self.producer = Producer(config)
        self._closing: float | None = None  # set by close(): seconds to flush before purging
        self._thread = threading.Thread(target=self._serve, name=f"umcef-kafka-{name}", daemon=True)
        self._thread.start()

    def _error(self, err: KafkaError) -> None:  # in the poll thread
        if err.fatal():
            self.fatal = err  # the instance is unusable now; the adapter replaces it
            log.error("Kafka producer fatal error: %s: %s", err.name(), err.str())
        else:
            log.info("Kafka producer: %s: %s", err.name(), err.str())

    def _serve(self) -> None:
        producer = self.producer
        while self._closing is None:
            try:
                producer.poll(_PRODUCER_POLL_S)
            except Exception:  # a callback failed; serving must go on or chunks would never finish
                log.exception("serving Kafka producer callbacks")
        try:
            if producer.flush(self._closing) > 0:
                # Whatever is left gets its report (_PURGE_QUEUE / _PURGE_INFLIGHT: Transient) now.
                producer.purge(in_queue=True, in_flight=True, blocking=True)
                producer.flush(1.0)
            producer.close()
        except Exception:
            log.exception("closing the Kafka producer")

    def track(self, chunk: _Chunk) -> None:
        """Counts `chunk` outstanding until every record has its report (see `KafkaAdapter._producer_now`)."""
        self.outstanding.add(chunk.future)
        chunk.future.add_done_callback(functools.partial(self._settled, chunk))

    def _settled(self, chunk: _Chunk, future: asyncio.Future[None]) -> None:
        self.outstanding.discard(future)
        # (Records rejected for good never go again, so a later record overtaking them is no reorder. A
        # record left _PENDING had no report: a failure.)
        if any(r is not None and not isinstance(r, Rejected) and not _rejected_for_good(r) for r in chunk.results):
            self.failures += 1

    async def close(self, grace: float) -> None:
        """Flush for at most `grace` seconds; what is not delivered by then fails as `Transient`."""
        self._closing = max(0.0, grace)
        await asyncio.to_thread(self._thread.join, grace + 15.0)


def _oauth_callback(provider: Any, loop: asyncio.AbstractEventLoop, timeout: float) -> Any:
    """librdkafka's `oauth_cb` (called in the poll thread) on top of an aiokafka token provider, whose
    `token()` is a coroutine that caches and refreshes its token itself: ask it on its loop, and make
    librdkafka ask again within a minute."""

    def oauth_cb(config: str) -> tuple[str, float]:
        token = asyncio.run_coroutine_threadsafe(provider.token(), loop).result(timeout)
        return str(token), time.time() + 60.0

    return oauth_cb


# --------------------------------------------------------------------------------------------------
# consuming


_TAKEN, _ACKED, _RELEASED = 1, 2, 3  # per-offset state: handed out / acknowledged / to be read again


class KafkaDelivery:
    """One consumed record as an event; settled once with `ack` or `nack`."""

    __slots__ = ("_part", "_run", "attempt", "event", "key", "offset", "settled")

    def __init__(self, run: _Run, part: _Partition, offset: int, key: bytes | None, event: Event,
                 attempt: int) -> None:
        self._run = run
        self._part = part
        self.offset = offset
        self.key = key
        self.event = event
        self.attempt = attempt
        self.settled = False

    @property
    def partition(self) -> int:
        return int(self._part.tp.partition)

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            self._run.acked(self._part, self.offset)

    async def nack(self, *, requeue_after: float | None = None) -> None:
        if not self.settled:
            self.settled = True
            self._run.nacked(self._part, self.offset, requeue_after or 0.0)


class _Partition:
    """Offsets of one assigned partition between the committed position and the highest one read."""

    __slots__ = ("attempts", "committed", "high", "lanes", "order", "retry_due", "retry_from", "revoked", "running",
                 "state", "tp")

    def __init__(self, tp: Any) -> None:
        self.tp = tp
        self.order: deque[int] = deque()  # offsets read and not yet below the commit point, ascending
        self.state: dict[int, int] = {}
        self.attempts: dict[int, int] = {}
        self.high = -1  # highest offset read in this assignment
        self.committed = -1  # last position committed by this run
        self.retry_from: int | None = None  # lowest nacked offset waiting for its seek
        self.retry_due = 0.0
        # Keys with a delivery ready or running -> the deliveries of that key waiting behind it.
        self.lanes: dict[bytes, deque[KafkaDelivery]] = {}
        self.running = 0  # handlers running now
        self.revoked = False

    def position(self) -> int | None:
        """The commit position: the first offset not acknowledged (every offset read before it is)."""
        order, state = self.order, self.state
        while order and state.get(order[0]) == _ACKED:
            offset = order.popleft()
            del state[offset]
            self.attempts.pop(offset, None)
        if order:
            return order[0]
        return self.high + 1 if self.high >= 0 else None


class _Run:
    """One `consume()` call: the poll loop, the workers and the commit bookkeeping.

    Deliveries wait in one FIFO `ready` queue served by up to `max_in_flight` worker tasks. A key has
    at most one delivery ready or running; the rest of that key waits in its partition's lane and moves
    to `ready` when its predecessor is done. Unkeyed records carry no order and go straight to `ready`.
    """

    def __init__(self, adapter: KafkaAdapter, consumer: Any, handler: Handler, max_in_flight: int) -> None:
        self.adapter = adapter
        self.consumer = consumer
        self.handler = handler
        self.max_in_flight = max(1, max_in_flight)
        self.in_flight = 0  # deliveries handed out (waiting, ready or running) and not finished
        self.parts: dict[Any, _Partition] = {}
        self.ready: deque[KafkaDelivery] = deque()
        self.workers: set[asyncio.Task[None]] = set()
        self.starting = False  # a worker task was created and has not taken its first delivery yet
        self.wake = asyncio.Event()
        self.next_commit = 0.0

    # -- the loop

    async def run(self) -> None:
        stop = self.adapter._stop
        try:
            while not stop.is_set():
                self._seek_due()
                await self._commit()
                free = self.max_in_flight - self.in_flight
                if free <= 0:
                    self.wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), _POLL_MS / 1000)
                    continue
                try:
                    batch = await self.consumer.getmany(timeout_ms=_POLL_MS, max_records=free)
                except kafka_errors.ConsumerStoppedError:
                    break  # close() stopped the consumer under us
                except kafka_errors.KafkaError as exc:
                    raise classify(exc, f"consuming from {self.adapter.topic}") from None
                for tp, records in batch.items():
                    self._take(tp, records)
                self._spawn_worker()
        except asyncio.CancelledError:
            # A crash: abandon the handlers and commit nothing more, so whatever was not committed is
            # delivered again to the next member of the group.
            for task in self.workers:
                task.cancel()
            raise
        except Exception:
            await self._finish()
            raise
        else:
            await self._finish()

    async def _finish(self) -> None:
        """A stop: handlers already running finish (their acks count), waiting ones are not started,
        then the acknowledged prefix is committed."""
        for part in self.parts.values():
            self._drop_waiting(part, after=-1)
        if self.workers:
            await asyncio.gather(*list(self.workers), return_exceptions=True)
        await self._commit(force=True)

    def _take(self, tp: Any, records: list[Any]) -> None:
        part = self.parts.get(tp)
        if part is None:
            part = self.parts[tp] = _Partition(tp)
        if part.retry_from is not None:
            return  # paused for a redelivery: all of this is read again after the seek
        for record in records:
            offset: int = record.offset
            if offset <= part.high:
                if part.state.get(offset) != _RELEASED:
                    continue  # acknowledged, still being handled, or already below the commit point
            else:
                part.order.append(offset)
                part.high = offset
            try:
                event = binding.from_message(binding.KafkaMessage(tuple(record.headers), record.key, record.value))
            except EventError as exc:
                # Not a CloudEvent (or an invalid one): skip it rather than block the partition forever.
                log.warning("skipping %s[%d] offset %d: %s", tp.topic, tp.partition, offset, exc)
                part.state[offset] = _ACKED
                continue
            part.state[offset] = _TAKEN
            attempt = part.attempts[offset] = part.attempts.get(offset, 0) + 1
            delivery = KafkaDelivery(self, part, offset, record.key, event, attempt)
            self.in_flight += 1
            key = record.key
            if key is None:
                self.ready.append(delivery)
            elif key in part.lanes:
                part.lanes[key].append(delivery)  # its key is busy: wait for the one before it
            else:
                part.lanes[key] = deque()
                self.ready.append(delivery)

    def _spawn_worker(self) -> None:
        """One more worker, if there is work, room, and no worker already on its way.

        Workers grow one at a time, each started by one that found more work before awaiting its handler:
        handlers that never suspend are served by one or two tasks, handlers waiting on I/O get up to
        `max_in_flight` of them within as many loop iterations. (Spawning a task per ready delivery costs
        more than decoding the record.) Workers exit when `ready` is empty.
        """
        if self.ready and not self.starting and len(self.workers) < self.max_in_flight:
            self.starting = True
            task = asyncio.create_task(self._work())
            self.workers.add(task)
            task.add_done_callback(self.workers.discard)

    async def _work(self) -> None:
        self.starting = False
        ready = self.ready  # never replaced, only mutated
        while ready:
            delivery = ready.popleft()
            delivery._part.running += 1
            self._spawn_worker()
            try:
                await self.handler(delivery)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.info("handler failed on %s[%d] offset %d (attempt %d): %r", delivery._part.tp.topic,
                         delivery.partition, delivery.offset, delivery.attempt, exc)
                await delivery.nack()
            else:
                await delivery.ack()  # a no-op when the handler settled it
            self._done(delivery)

    def _done(self, delivery: KafkaDelivery) -> None:
        """The handler of `delivery` returned: free its slot and let the next delivery of its key go."""
        delivery._part.running -= 1
        self.in_flight -= 1
        self.wake.set()
        key = delivery.key
        if key is None:
            return
        lanes = delivery._part.lanes
        waiting = lanes.get(key)
        if waiting:
            self.ready.append(waiting.popleft())  # this worker (or another) picks it up
        elif waiting is not None:
            del lanes[key]

    # -- settling

    def acked(self, part: _Partition, offset: int) -> None:
        if not part.revoked:
            part.state[offset] = _ACKED

    def nacked(self, part: _Partition, offset: int, delay: float) -> None:
        if part.revoked:
            return
        part.state[offset] = _RELEASED
        part.retry_from = offset if part.retry_from is None else min(part.retry_from, offset)
        part.retry_due = max(part.retry_due, time.monotonic() + max(0.0, delay))
        # Everything waiting behind it in this partition is read again after the seek; keeping it would
        # let a later record of the same key overtake the redelivered one.
        self._drop_waiting(part, after=offset)
        with contextlib.suppress(kafka_errors.IllegalStateError):
            self.consumer.pause(part.tp)
        self.wake.set()

    def _drop_waiting(self, part: _Partition, after: int) -> None:
        """Forget this partition's deliveries above `after` that no handler has started: they become
        unread again (and were no attempt)."""
        dropped: list[KafkaDelivery] = []
        kept: deque[KafkaDelivery] = deque()
        for delivery in self.ready:
            if delivery._part is part and delivery.offset > after:
                dropped.append(delivery)
                if delivery.key is not None:  # it headed its key's lane: everything behind it goes too
                    dropped.extend(part.lanes.pop(delivery.key, ()))
            else:
                kept.append(delivery)
        self.ready.clear()  # in place: workers hold a reference to this deque
        self.ready.extend(kept)
        for waiting in part.lanes.values():  # lanes whose head runs (or stays): drop what is above `after`
            while waiting and waiting[-1].offset > after:
                dropped.append(waiting.pop())
        for delivery in dropped:
            part.state[delivery.offset] = _RELEASED
            part.attempts[delivery.offset] -= 1
        if dropped:
            self.in_flight -= len(dropped)
            self.wake.set()

    def _seek_due(self) -> None:
        now = time.monotonic()
        for part in self.parts.values():
            if part.retry_from is not None and part.retry_due <= now:
                with contextlib.suppress(kafka_errors.IllegalStateError):
                    self.consumer.seek(part.tp, part.retry_from)
                    self.consumer.resume(part.tp)
                part.retry_from = None
                part.retry_due = 0.0

    # -- committing

    async def _commit(self, force: bool = False, parts: list[_Partition] | None = None) -> None:
        now = time.monotonic()
        if not force and now < self.next_commit:
            return
        self.next_commit = now + self.adapter.options.commit_interval
        offsets: dict[Any, int] = {}
        chosen = parts if parts is not None else list(self.parts.values())
        for part in chosen:
            position = part.position()
            if position is not None and position > part.committed:
                offsets[part.tp] = position
        if not offsets:
            return
        try:
            # aiokafka retries retriable commit errors forever (e.g. while the broker is down): bound it.
            await asyncio.wait_for(self.consumer.commit(offsets), self.adapter.options.request_timeout_ms / 1000)
        except (kafka_errors.KafkaError, kafka_errors.IllegalOperation, TimeoutError) as exc:
            # A rebalance or an outage: the next owner re-reads from the last commit (at-least-once).
            log.warning("commit of %s failed: %r", offsets, exc)
            return
        for part in chosen:
            if part.tp in offsets:
                part.committed = offsets[part.tp]

    async def revoke(self, revoked: Any) -> None:
        """Rebalance: the partitions we lose stop taking deliveries; handlers already running get a
        bounded time to finish (fewer duplicates, and a key's deliveries do not overlap across members),
        then the acknowledged prefix is committed. Outcomes arriving later no longer count: the new
        owner re-reads from the commit."""
        parts = [part for tp in revoked if (part := self.parts.pop(tp, None)) is not None]
        for part in parts:
            self._drop_waiting(part, after=-1)
            part.retry_from = None
        opts = self.adapter.options
        # The group waits for this callback only so long before it drops us as a member.
        grace = min(opts.close_grace, (opts.rebalance_timeout_ms or opts.session_timeout_ms) / 2000)
        deadline = time.monotonic() + grace
        while any(part.running for part in parts) and time.monotonic() < deadline:
            self.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), 0.05)
        await self._commit(force=True, parts=parts)
        for part in parts:
            part.revoked = True


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.run: _Run | None = None

    async def on_partitions_revoked(self, revoked: Any) -> None:
        if self.run is not None:
            await self.run.revoke(revoked)

    async def on_partitions_assigned(self, assigned: Any) -> None:
        return None  # partitions are tracked from their first record on


# --------------------------------------------------------------------------------------------------
# the adapter


class KafkaAdapter:
    def __init__(self, url: str, bootstrap: list[str], topic: str, *, group: str = DEFAULT_GROUP,
                 structured: bool = False, options: KafkaOptions | None = None) -> None:
        self.url = url
        self.bootstrap = bootstrap
        self.topic = topic
        self.group = group
        self.structured = structured
        self.options = options = options or KafkaOptions()
        self.capabilities = Capabilities(max_event_bytes=options.max_event_bytes, max_attributes=None, ordering=True,
                                         native_dedup=False, max_batch=options.max_batch, dead_letter=False,
                                         ordered_in_flight=options.idempotent)
        self._producer: _Producer | None = None
        # Above `busy_events_per_s` publishes go through a second producer that lingers (`_update_busy`).
        self._busy_producer: _Producer | None = None
        self._busy = False
        self.busy_switches = 0  # how often publishing changed producer (tests, diagnostics)
        self._rate_since = time.monotonic()
        self._rate_events = 0
        self._overlapped_events = 0  # of _rate_events: published while another publish was running
        self._publishing = 0  # publishes started and not returned
        self._client: Any = None
        self._lock = asyncio.Lock()
        # Held from a publish's start until all its records are in librdkafka's queue: publishes hand their
        # records over in the order they started, whatever they wait for on the way (a metadata refresh, a
        # full queue), which is what `ordered_in_flight` promises. Uncontended, it costs no loop iteration.
        self._issuing = asyncio.Lock()
        self._topic_seen = -1e18  # monotonic time the topic was last found
        self._stop = asyncio.Event()
        self._consuming: asyncio.Event | None = None  # set when the running consume() has returned
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._record = binding.structured_record if structured else binding.binary_record

    # -- encoding

    def _encode(self, event: Event) -> binding.KafkaMessage:
        headers, key, value, _ = self._record(event, self.options.key_mapper)
        return binding.KafkaMessage(tuple(headers), key, value)

    def encoded_size(self, event: Event) -> int:
        return binding.encoded_size(self._encode(event))

    # -- publishing

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        if not batch:
            return []
        overlapped = self._publishing > 0  # (another publish is running: what makes a linger pay)
        self._publishing += 1
        try:
            return await self._publish(batch, overlapped)
        finally:
            self._publishing -= 1

    async def _publish(self, batch: Sequence[Event], overlapped: bool) -> list[PublishOutcome]:
        issuing = self._issuing
        await issuing.acquire()
        released = False

        def issued() -> None:
            nonlocal released
            if not released:
                released = True
                issuing.release()

        try:
            try:
                await self._ensure_topic()
                self._update_busy(len(batch), overlapped)
                producer = await self._producer_now()
            except AdapterError as exc:
                # The size check does not depend on the broker: an event that can never go is Rejected anyway.
                return [PublishOutcome(event.id, record if isinstance(record := self._prepare(event), Rejected)
                                       else exc) for event in batch]
            results: list[Any] = []
            step = max(1, self.options.max_batch)
            for start in range(0, len(batch), step):
                # The last chunk lets the next publish go once its records are queued; earlier chunks of a
                # batch over max_batch are acknowledged before the next chunk is produced.
                last = start + step >= len(batch)
                results += await self._send_chunk(producer, batch[start:start + step],
                                                  issued=issued if last else None)
        finally:
            issued()
        what = f"publishing to {self.topic}"
        outcomes: list[PublishOutcome] = []
        delivered = timed_out = False
        for event, result in zip(batch, results, strict=True):
            if result is None:
                delivered = True
            elif not isinstance(result, AdapterError):  # a librdkafka KafkaError
                code = result.code()
                timed_out = timed_out or code == KafkaError._MSG_TIMED_OUT
                if code == KafkaError._FATAL and producer.fatal is not None:
                    result = producer.fatal  # the cause (e.g. an authorization failure), not "fatal"
                result = classify_error(result, what)
                if isinstance(result, NotFound):
                    self._topic_seen = -1e18  # look again next time (the topic may have been deleted)
            outcomes.append(PublishOutcome(event.id, result))
        if timed_out and not delivered:
            # Nothing got through for a whole delivery timeout. librdkafka reconnects by itself, but an
            # idempotent producer can stay stuck when the cluster lost its producer state (a broker that
            # came back empty answers UNKNOWN_PRODUCER_ID forever): a fresh instance starts clean.
            producer.stuck = True
        return outcomes

    def _prepare(self, event: Event) -> binding.Record | Rejected:
        """The record for `event`, or why it can never be published (checked before anything is sent)."""
        try:
            record = self._record(event, self.options.key_mapper)
        except (TypeError, ValueError) as exc:  # data the encoder cannot serialize
            return Rejected(f"cannot encode the event for Kafka: {exc}")
        headers, key, value, bound = record
        limit = self.options.max_event_bytes
        if bound > limit:  # the bound is cheap and a little high: the exact size decides
            size = binding.encoded_size(binding.KafkaMessage(tuple(headers), key, value))
            if size > limit:
                return Rejected(f"event of {size} bytes (Kafka record batch) exceeds the limit of {limit} bytes")
        return record

    async def _send_chunk(self, producer: _Producer, events: Sequence[Event],
                          issued: Callable[[], None] | None = None) -> list[Any]:
        """Encode and size-check each event and hand its record to librdkafka right away (the first records
        are on their way while the rest are encoded), then wait for every delivery report. Per event:
        None (delivered), a librdkafka KafkaError, or an AdapterError."""
        chunk = _Chunk(asyncio.get_running_loop(), len(events))
        if self.options.adaptive:  # (only a switch of producer reads what `track` counts)
            producer.track(chunk)
        results = chunk.results
        delivered = chunk.delivered
        produce = producer.producer.produce
        partial = functools.partial
        topic, opts = self.topic, self.options
        encode, key_mapper, limit = self._record, opts.key_mapper, opts.max_event_bytes
        try:
            full_since: float | None = None
            for index, event in enumerate(events):
                try:
                    headers, key, value, bound = encode(event, key_mapper)
                except (TypeError, ValueError):
                    bound = limit + 1  # _prepare says why
                if bound > limit:  # rare: near or over the limit, or not encodable
                    prepared = self._prepare(event)
                    if isinstance(prepared, Rejected):
                        results[index] = prepared
                        continue
                    headers, key, value, bound = prepared
                while True:
                    try:
                        # (list is invariant: confluent's HeadersType also allows str and None values)
                        produce(topic, value, key, headers=headers,  # type: ignore[arg-type]
                                on_delivery=partial(delivered, index))
                    except BufferError:  # librdkafka's queue is full: wait for room, up to queue_full_timeout
                        now = time.monotonic()
                        full_since = now if full_since is None else full_since
                        if now - full_since < opts.queue_full_timeout:
                            await asyncio.sleep(0.002)
                            continue
                        results[index] = Throttled(f"the Kafka producer's queue stayed full for "
                                                   f"{opts.queue_full_timeout:g} s", retry_after=1.0)
                    except KafkaException as exc:  # e.g. a fatal producer, librdkafka's own size check
                        results[index] = exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else \
                            Transient(f"producing to {topic}: {exc}")
                    except (TypeError, ValueError) as exc:  # e.g. a key mapper that returned neither bytes nor str
                        results[index] = Rejected(f"cannot produce the record: {exc}")
                    else:
                        chunk.sent += 1
                        full_since = None
                    break
        finally:
            # Closed whatever happens (a cancel while waiting for room, a key mapper that raised): the poll
            # thread then resolves the chunk once its records are reported, so no switch of producer
            # (`_producer_now`) waits for a chunk nobody would finish.
            chunk.closed = True
            if chunk.done == chunk.sent:
                chunk.resolve()
        if issued is not None:  # every record of the chunk is queued (or refused): the next publish may go
            issued()
        if not chunk.future.done():
            try:
                # librdkafka reports every record within message.timeout.ms; the margin covers close().
                async with asyncio.timeout(opts.delivery_timeout_ms / 1000 + opts.close_grace + 10.0):
                    # (shielded: a cancelled publish leaves its chunk outstanding until its records are reported)
                    await asyncio.shield(chunk.future)
            except TimeoutError:
                for index, result in enumerate(results):
                    if result is _PENDING:
                        results[index] = Transient("no delivery report from the Kafka producer")
                chunk.resolve()  # settled, as failed
        return results

    def _update_busy(self, events: int, overlapped: bool) -> None:
        """Whether publishes go through the busy producer, from windows of at least `_RATE_WINDOW_S`: from
        `busy_events_per_s` published events/s on, most of them in publishes that overlapped another, until
        the rate falls below half of that. Then a linger pays: fewer, larger produce requests (bench/gateway.py:
        on Tansu about a third less broker CPU per event at saturation). A linger adds its whole length to
        every publish awaited alone (a quiet delivery worker), and slows down one publisher that awaits each
        publish before the next (docs/mapping-kafka.md), however fast it goes."""
        opts = self.options
        if not opts.adaptive:
            return
        self._rate_events += events
        if overlapped:
            self._overlapped_events += events
        now = time.monotonic()
        elapsed = now - self._rate_since
        if elapsed < _RATE_WINDOW_S:
            return
        rate = self._rate_events / elapsed
        concurrent = self._overlapped_events * 2 >= self._rate_events
        self._rate_since, self._rate_events, self._overlapped_events = now, 0, 0
        busy = concurrent and rate >= (opts.busy_events_per_s / 2 if self._busy else opts.busy_events_per_s)
        if busy != self._busy:
            self._switch(f"{rate:.0f} events/s")

    def _switch(self, why: str) -> None:
        self._busy = not self._busy
        self.busy_switches += 1
        log.debug("Kafka %s: %s producer (%s)", self.topic, "busy" if self._busy else "quiet", why)

    async def _producer_now(self) -> _Producer:
        """The producer this publish goes through (called in turn, under `_issuing`). Two producers keep no
        order between them, so after a switch the first publish waits until every record sent through the
        other one has its report; if one of those failed it fails too (`Transient`) rather than overtake
        it: the caller publishes the failed records again first, and a partition keeps its order."""
        if self._busy_producer is None and self.options.adaptive:
            # Made with the first: a fresh idempotent producer needs ~0.5 s for its producer id, a stall that
            # would come just when the load rose (and would bring the rate down again). Made only when the rate
            # neared the threshold, it came too late for a load that rose at once (measured: the adapter
            # switched back and forth while the new producer waited for its id).
            await self._ensure_producer(True)
        other = self._producer if self._busy else self._busy_producer
        if other is not None and other.outstanding:
            failures = other.failures
            _, waiting = await asyncio.wait(list(other.outstanding), timeout=_SWITCH_WAIT_S)
            if self._closed:  # (close() purged what we waited for: that is the news, not an overtake)
                raise Transient(f"the Kafka adapter for {self.url} is closed")
            if waiting:
                # Its records are slow to be reported (e.g. a partition without a leader): stay on it rather than
                # hold every publish up to a delivery timeout (the next window decides again).
                self._switch("the other one's records are not reported yet")
            elif other.failures != failures:
                raise Transient(f"records published to {self.topic} just before this publish failed; "
                                "publishing it now could overtake them")
        return await self._ensure_producer(self._busy)

    async def _ensure_producer(self, busy: bool = False) -> _Producer:
        attribute = "_busy_producer" if busy else "_producer"
        producer: _Producer | None = getattr(self, attribute)
        if producer is not None and producer.fatal is None and not producer.stuck:
            return producer
        if self._closed:
            raise Transient(f"the Kafka adapter for {self.url} is closed")
        async with self._lock:
            producer = getattr(self, attribute)
            if producer is not None and (producer.fatal is not None or producer.stuck):
                # librdkafka cannot recover a producer after a fatal error (e.g. an idempotence
                # sequence it cannot repair): its records failed; a fresh instance takes the next ones.
                setattr(self, attribute, None)
                await producer.close(0.0)
                producer = None
            if producer is None:
                if self._closed:
                    raise Transient(f"the Kafka adapter for {self.url} is closed")
                opts = self.options
                oauth = None
                if opts.sasl_oauth_token_provider is not None and opts.sasl_mechanism.upper() == "OAUTHBEARER":
                    oauth = _oauth_callback(opts.sasl_oauth_token_provider, asyncio.get_running_loop(),
                                            opts.request_timeout_ms / 1000)
                try:
                    name = f"{self.topic}-busy" if busy else self.topic  # (the poll thread's name: tell them apart)
                    producer = _Producer(opts.producer_config(self.bootstrap, busy), name, oauth)
                except (KafkaException, ValueError, TypeError) as exc:  # librdkafka's configuration checks
                    raise Transient(f"cannot create the Kafka producer: {exc}") from None
                setattr(self, attribute, producer)
            return producer

    async def _ensure_client(self) -> Any:
        """A bare client for metadata lookups and probes (no producer or group membership needed)."""
        if self._client is not None:
            return self._client
        if self._closed:
            raise Transient(f"the Kafka adapter for {self.url} is closed")
        async with self._lock:
            if self._client is None:
                client = AIOKafkaClient(bootstrap_servers=self.bootstrap, **self.options.connection())
                try:
                    await asyncio.wait_for(client.bootstrap(), self.options.connect_timeout)
                except BaseException as exc:
                    with contextlib.suppress(Exception):
                        await client.close()
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    raise self._unreachable(exc) from None
                self._client = client
        return self._client

    async def _start(self, component: Any, what: str) -> None:
        """Start an aiokafka producer/consumer within `connect_timeout`, or clean up and raise."""
        try:
            await asyncio.wait_for(component.start(), self.options.connect_timeout)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(component.stop(), self.options.connect_timeout)
            if isinstance(exc, asyncio.CancelledError):
                raise
            raise self._unreachable(exc, what) from None

    def _unreachable(self, exc: BaseException, what: str = "client") -> AdapterError:
        if isinstance(exc, TimeoutError):
            return Transient(f"Kafka at {','.join(self.bootstrap)} did not answer within "
                             f"{self.options.connect_timeout:g} s (starting the {what})")
        return classify(exc, f"starting the Kafka {what} for {','.join(self.bootstrap)}")

    async def _ensure_topic(self, fresh: bool = False) -> None:
        """`NotFound` unless the topic exists, asked without letting the broker auto-create it."""
        if not fresh and time.monotonic() - self._topic_seen < self.options.topic_cache_seconds:
            return
        client = await self._ensure_client()
        deadline = time.monotonic() + self.options.metadata_timeout
        while True:
            try:
                code = await asyncio.wait_for(self._topic_error_code(client), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                raise Transient(f"no metadata for topic {self.topic!r} within {self.options.metadata_timeout:g} s") \
                    from None
            except kafka_errors.KafkaError as exc:
                raise classify(exc, f"looking up topic {self.topic!r}") from None
            if code == 0:
                self._topic_seen = time.monotonic()
                return
            if code == UNKNOWN_TOPIC_OR_PARTITION:
                raise NotFound(f"Kafka topic {self.topic!r} does not exist on {','.join(self.bootstrap)}")
            if code == TOPIC_AUTHORIZATION_FAILED:
                raise Unauthorized(f"not authorized to describe Kafka topic {self.topic!r}")
            if time.monotonic() >= deadline:  # e.g. LEADER_NOT_AVAILABLE while the topic is being created
                raise Transient(f"topic {self.topic!r} metadata error code {code}")
            await asyncio.sleep(0.1)

    async def _topic_error_code(self, client: Any) -> int:
        request = MetadataRequest([self.topic], allow_auto_topic_creation=False)
        response = await client.send(self._node(client), request)
        for topic in response.topics:
            if topic[1] == self.topic:
                return int(topic[0])
        return UNKNOWN_TOPIC_OR_PARTITION

    @staticmethod
    def _node(client: Any) -> Any:
        # A cluster without topics may list no brokers yet; then the bootstrap connection answers.
        node = client.get_random_node()
        return node if node is not None else "bootstrap"

    # -- consuming

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        if self._consuming is not None and not self._consuming.is_set():
            raise RuntimeError(f"{self.url} is already being consumed")
        if self._closed:
            raise Transient(f"the Kafka adapter for {self.url} is closed")
        self._stop.clear()
        await self._ensure_topic(fresh=True)  # NotFound / Transient before joining anything
        done = self._consuming = asyncio.Event()
        opts = self.options
        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.bootstrap,
            group_id=self.group,
            group_instance_id=opts.group_instance_id,
            enable_auto_commit=False,
            auto_offset_reset=opts.auto_offset_reset,
            session_timeout_ms=opts.session_timeout_ms,
            heartbeat_interval_ms=opts.heartbeat_interval_ms,
            max_poll_interval_ms=opts.max_poll_interval_ms,
            rebalance_timeout_ms=opts.rebalance_timeout_ms,
            fetch_max_wait_ms=opts.fetch_max_wait_ms,
            # Room for the largest event we publish; brokers return an oversized first batch anyway.
            max_partition_fetch_bytes=max(1024 * 1024, opts.max_event_bytes + 64 * 1024),
            isolation_level=opts.isolation_level,
            **opts.connection(),
        )
        try:
            # Started without topics, so start() only bootstraps (bounded); joining the group happens in
            # the background after subscribe(), however long the broker takes.
            await self._start(consumer, "consumer")
            listener = _Listener()
            consumer.subscribe([self.topic], listener=listener)
            run = listener.run = _Run(self, consumer, handler, max_in_flight)
            # The loop runs in its own task so that close() can abandon it (crash semantics: no further
            # commit) without cancelling the caller, whose consume() then simply returns.
            loop_task = self._loop_task = asyncio.create_task(run.run())
            try:
                await loop_task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise  # the caller was cancelled (awaiting loop_task cancelled it too)
        finally:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(consumer.stop(), opts.connect_timeout)
            done.set()

    async def stop_consuming(self) -> None:
        self._stop.set()

    # -- health

    async def probe(self) -> float:
        """One ApiVersions round trip (the cheapest request there is) on the metadata connection."""
        timeout = self.options.probe_timeout
        try:
            client = await asyncio.wait_for(self._ensure_client(), timeout)
            started = time.perf_counter()
            await asyncio.wait_for(client.send(self._node(client), ApiVersionRequest()), timeout)
        except TimeoutError:
            raise Transient(f"Kafka at {','.join(self.bootstrap)} did not answer a probe within {timeout:g} s") \
                from None
        except AdapterError as exc:
            raise exc if isinstance(exc, Transient) else Transient(str(exc)) from None
        except Exception as exc:
            raise Transient(str(classify(exc, "probing Kafka"))) from None
        return max(time.perf_counter() - started, 1e-9)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop.set()
        if self._consuming is not None and not self._consuming.is_set():
            # Running handlers get `close_grace` seconds to finish (their acks are committed); after that
            # the run is abandoned like a crash: nothing more is committed, the group redelivers.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._consuming.wait()), self.options.close_grace)
            if not self._consuming.is_set() and self._loop_task is not None:
                self._loop_task.cancel()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._consuming.wait(), self.options.connect_timeout)
        producers = [p for p in (self._producer, self._busy_producer) if p is not None]
        self._producer = self._busy_producer = None
        client, self._client = self._client, None
        for failed in await asyncio.gather(*(p.close(self.options.close_grace) for p in producers),
                                           return_exceptions=True):
            if isinstance(failed, Exception):
                log.warning("closing a Kafka producer of %s: %s", self.url, failed)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


# --------------------------------------------------------------------------------------------------
# opening


_OPTION_NAMES = frozenset(f.name for f in fields(KafkaOptions))


def from_url(url: str, **options: Any) -> KafkaAdapter:
    """`kafka://HOST:PORT[,HOST:PORT...]/TOPIC?group=G&mode=binary|structured` plus keyword options."""
    bootstrap, topic, query, opts = _parse(url, options)
    return KafkaAdapter(url, bootstrap, topic, group=query.get("group", DEFAULT_GROUP),
                        structured=query.get("mode", "binary").lower() == "structured", options=opts)


def check_url(url: str, **options: Any) -> None:
    """Raises what `from_url` would for this URL and these options, opening nothing (configuration checks)."""
    _parse(url, options)


def _parse(url: str, options: dict[str, Any]) -> tuple[list[str], str, dict[str, str], KafkaOptions]:
    parts = urlsplit(url)
    if parts.scheme.lower() != "kafka":
        raise ValueError(f"expected a kafka:// URL, got {url!r}")
    bootstrap = [_host_port(hp) for hp in parts.netloc.split(",") if hp]
    topic = parts.path.strip("/")
    if not bootstrap or not topic or "/" in topic:
        raise ValueError(f"expected kafka://HOST:PORT/TOPIC, got {url!r}")
    if len(topic) > 249 or not all(c.isascii() and (c.isalnum() or c in "._-") for c in topic):
        raise ValueError(f"invalid Kafka topic name {topic!r}: letters, digits, '.', '_', '-' (at most 249)")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    unknown_query = set(query) - {"group", "mode"}
    if unknown_query:
        raise ValueError(f"unknown kafka:// URL parameters {sorted(unknown_query)}; options go in the config")
    mode = query.get("mode", "binary").lower()
    if mode not in ("binary", "structured"):
        raise ValueError(f"mode must be binary or structured, got {mode!r}")
    unknown = set(options) - _OPTION_NAMES
    if unknown:
        raise TypeError(f"unknown Kafka adapter options {sorted(unknown)}; known: {sorted(_OPTION_NAMES)}")
    opts = KafkaOptions(**options)
    _check(opts)
    return bootstrap, topic, query, opts


def _check(opts: KafkaOptions) -> None:
    """Configuration errors surface when the adapter is opened, not as failures of the first publish."""
    if opts.acks not in (0, 1, -1, "all"):
        raise ValueError(f"acks must be 0, 1, -1 or 'all', got {opts.acks!r}")
    if opts.enable_idempotence and opts.acks not in (-1, "all"):
        raise ValueError("enable_idempotence needs acks='all'")
    if opts.compression_type not in (None, "gzip", "snappy", "lz4", "zstd"):
        raise ValueError(f"compression_type must be gzip, snappy, lz4, zstd or None, got {opts.compression_type!r}")
    if not (0 <= opts.linger_ms < opts.delivery_timeout_ms and 0 <= opts.busy_linger_ms < opts.delivery_timeout_ms):
        raise ValueError("linger_ms and busy_linger_ms must be at least 0 and below delivery_timeout_ms")
    if not opts.busy_events_per_s > 0:  # (also NaN)
        raise ValueError("busy_events_per_s must be positive")
    if opts.delivery_timeout_ms <= 0 or opts.request_timeout_ms <= 0 or opts.max_queued_messages <= 0:
        raise ValueError("delivery_timeout_ms, request_timeout_ms and max_queued_messages must be positive")
    if opts.security_protocol.upper() not in ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"):
        raise ValueError(f"security_protocol must be PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL, "
                         f"got {opts.security_protocol!r}")
    if opts.auto_offset_reset not in ("earliest", "latest", "none"):
        raise ValueError(f"auto_offset_reset must be earliest, latest or none, got {opts.auto_offset_reset!r}")
    if opts.isolation_level not in ("read_uncommitted", "read_committed"):
        raise ValueError(f"isolation_level must be read_uncommitted or read_committed, got {opts.isolation_level!r}")
    if opts.max_event_bytes <= 0 or opts.max_batch <= 0 or opts.max_batch_bytes <= 0:
        raise ValueError("max_event_bytes, max_batch and max_batch_bytes must be positive")


def _host_port(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:  # no port (or a bare IPv6 literal)
        return f"{text}:{DEFAULT_PORT}"
    if not port.isdigit():
        raise ValueError(f"invalid port in Kafka bootstrap address {text!r}")
    return f"{host}:{port}"


__all__ = ["KafkaAdapter", "KafkaDelivery", "KafkaOptions", "check_url", "classify", "from_url"]
