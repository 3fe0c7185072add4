"""The `kafka://HOST:PORT[,HOST:PORT...]/TOPIC?group=G&mode=binary|structured` adapter, on aiokafka.

Wire mapping: `umcef.fabric.bindings.kafka` (the CloudEvents Kafka binding; binary mode by default).
What this module adds is the I/O and the delivery semantics of the contract (`docs/adapters.md`):

- publish: every event is encoded and size-checked first (`Rejected` before anything is sent), then
  all of a chunk are handed to the producer without awaiting each (aiokafka batches them per
  partition), then the acknowledgements are gathered: one outcome per event. The topic must exist:
  it is looked up with a metadata request that forbids auto-creation (`NotFound` otherwise).
- consume: a consumer group with manual commits. Deliveries run concurrently across keys and in
  order within a key (records with the same Kafka key, i.e. the same `partitionkey`, never overlap).
  Only the contiguous prefix of acknowledged offsets of a partition is committed. A nack pauses the
  partition until `requeue_after`, then seeks back to the nacked offset: Kafka has no per-message
  redelivery, so the broker sends that record again (and what follows it; acknowledged records and
  ones still being handled are skipped when they come round again). Attempts are counted in memory.
- probe: one ApiVersions round trip on an already open connection, bounded by `probe_timeout`.

Options (keyword arguments of `from_url`), with why the defaults are what they are:

- `acks="all"`: an event counts as published only when all in-sync replicas have it.
- `enable_idempotence=False`: production Kafka wants True (no duplicates from producer retries), but
  Tansu, the broker the tests run on, fails aiokafka's InitProducerId; set it True on real Kafka.
- `linger_ms=0`, `compression_type=None`, `max_batch_bytes=512 KiB` (aiokafka's per-partition batch),
  `request_timeout_ms=30000`.
- `max_event_bytes=1 MiB`: checked against `encoded_size`, the record batch the broker measures against
  `message.max.bytes` (default 1048588, i.e. 1 MiB + 12).
- `max_batch=10000` events per native batch (publish splits longer batches).
- `key_mapper`: event -> Kafka key; default the spec's `partitionkey` mapper.
- consumer: `auto_offset_reset="earliest"` (a new group must not skip events published before it
  joined: at-least-once), `session_timeout_ms`, `heartbeat_interval_ms`, `max_poll_interval_ms`,
  `rebalance_timeout_ms`, `fetch_max_wait_ms`, `isolation_level`, `group_instance_id`,
  `commit_interval` (seconds between commits of the acknowledged prefix), `close_grace` (seconds
  `close()` lets running handlers finish before it abandons them like a crash).
- bounds: `connect_timeout=10` s (aiokafka's bootstrap can otherwise hang on an unreachable address),
  `metadata_timeout=10` s, `probe_timeout=5` s; `topic_cache_seconds=60` (how long a found topic is
  not looked up again).
- connection/credentials (never from the URL): `security_protocol`, `ssl_context`, `sasl_mechanism`,
  `sasl_plain_username`, `sasl_plain_password`, `sasl_oauth_token_provider`, `client_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aiokafka.codec as kafka_codec  # type: ignore[import-untyped]
import aiokafka.errors as kafka_errors  # type: ignore[import-untyped]
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.abc import ConsumerRebalanceListener  # type: ignore[import-untyped]
from aiokafka.client import AIOKafkaClient  # type: ignore[import-untyped]
from aiokafka.protocol.admin import ApiVersionRequest  # type: ignore[import-untyped]
from aiokafka.protocol.metadata import MetadataRequest  # type: ignore[import-untyped]

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

DEFAULT_PORT = 9092
DEFAULT_MAX_EVENT_BYTES = 1024 * 1024
DEFAULT_GROUP = "umcef"
UNKNOWN_TOPIC_OR_PARTITION = 3
TOPIC_AUTHORIZATION_FAILED = 29
_POLL_MS = 100  # longest a stop or a due redelivery waits for the consume loop to notice it


@dataclass(frozen=True)
class KafkaOptions:
    """Everything `from_url` accepts besides the URL; unknown options are a TypeError (a typo in a
    destination's config must not be silently ignored)."""

    acks: int | str = "all"
    enable_idempotence: bool = False
    linger_ms: int = 0
    compression_type: str | None = None
    max_batch_bytes: int = 512 * 1024
    request_timeout_ms: int = 30_000
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
    ssl_context: Any = None
    sasl_mechanism: str = "PLAIN"
    sasl_plain_username: str | None = None
    sasl_plain_password: str | None = field(default=None, repr=False)
    sasl_oauth_token_provider: Any = None

    def connection(self) -> dict[str, Any]:
        """What every aiokafka client (producer, consumer, metadata client) gets."""
        return {
            "client_id": self.client_id,
            "request_timeout_ms": self.request_timeout_ms,
            "security_protocol": self.security_protocol,
            "ssl_context": self.ssl_context,
            "sasl_mechanism": self.sasl_mechanism,
            "sasl_plain_username": self.sasl_plain_username,
            "sasl_plain_password": self.sasl_plain_password,
            "sasl_oauth_token_provider": self.sasl_oauth_token_provider,
        }


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


def classify(exc: BaseException, what: str) -> AdapterError:
    """A client-library failure as one of the contract's typed errors.

    Anything not known to be about the event itself (size, corruption) or about permissions or a
    missing topic is `Transient`: a broker-level error the next attempt may not meet again must never
    send an event to the dead-letter queue.
    """
    if isinstance(exc, AdapterError):
        return exc
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
                                         native_dedup=False, max_batch=options.max_batch, dead_letter=False)
        self._producer: Any = None
        self._client: Any = None
        self._lock = asyncio.Lock()
        self._topic_seen = -1e18  # monotonic time the topic was last found
        self._stop = asyncio.Event()
        self._consuming: asyncio.Event | None = None  # set when the running consume() has returned
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- encoding

    def _encode(self, event: Event) -> binding.KafkaMessage:
        encode = binding.to_structured if self.structured else binding.to_binary
        return encode(event, self.options.key_mapper)

    def encoded_size(self, event: Event) -> int:
        return binding.encoded_size(self._encode(event))

    # -- publishing

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        outcomes: list[PublishOutcome | None] = [None] * len(batch)
        ready: list[tuple[int, binding.KafkaMessage]] = []
        limit = self.options.max_event_bytes
        for index, event in enumerate(batch):
            try:
                message = self._encode(event)
            except (TypeError, ValueError) as exc:  # data the encoder cannot serialize
                outcomes[index] = PublishOutcome(event.id, Rejected(f"cannot encode the event for Kafka: {exc}"))
                continue
            size = binding.encoded_size(message)
            if size > limit:
                outcomes[index] = PublishOutcome(event.id, Rejected(
                    f"event of {size} bytes (Kafka record batch) exceeds the limit of {limit} bytes"))
                continue
            ready.append((index, message))
        step = max(1, self.options.max_batch)
        for start in range(0, len(ready), step):
            chunk = ready[start:start + step]
            for (index, _), error in zip(chunk, await self._send_chunk([m for _, m in chunk]), strict=True):
                outcomes[index] = PublishOutcome(batch[index].id, error)
        return [o or PublishOutcome(batch[i].id, Transient("not sent")) for i, o in enumerate(outcomes)]

    async def _send_chunk(self, messages: list[binding.KafkaMessage]) -> list[AdapterError | None]:
        """Hand every record to the producer, then wait for all acknowledgements."""
        try:
            producer = await self._ensure_producer()
            await self._ensure_topic()
        except AdapterError as exc:
            return [exc] * len(messages)
        errors: list[AdapterError | None] = [None] * len(messages)
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        for index, message in enumerate(messages):
            value = message.value
            if value is None and message.key is None:
                value = b""  # aiokafka refuses a record with neither; an empty value decodes as "no data" too
            try:
                future = await producer.send(self.topic, value, message.key, headers=list(message.headers))
            except Exception as exc:  # e.g. the buffer stayed full for request_timeout_ms
                errors[index] = self._failed(exc)
            else:
                pending.append((index, future))
        results = await asyncio.gather(*(f for _, f in pending), return_exceptions=True)
        for (index, _), result in zip(pending, results, strict=True):
            if isinstance(result, BaseException):
                errors[index] = self._failed(result)
        return errors

    def _failed(self, exc: BaseException) -> AdapterError:
        error = classify(exc, f"publishing to {self.topic}")
        if isinstance(error, NotFound):
            self._topic_seen = -1e18  # look again next time (the topic may have been deleted)
        if isinstance(exc, kafka_errors.ProducerClosed):
            self._producer = None  # start a fresh one next time
        return error

    async def _ensure_producer(self) -> Any:
        if self._producer is not None:
            return self._producer
        if self._closed:
            raise Transient(f"the Kafka adapter for {self.url} is closed")
        async with self._lock:
            if self._producer is None:
                try:
                    producer = self._new_producer()
                except (ValueError, TypeError, RuntimeError) as exc:  # aiokafka's own configuration checks
                    raise Transient(f"cannot create the Kafka producer: {exc}") from None
                await self._start(producer, "producer")
                self._producer = producer
        return self._producer

    def _new_producer(self) -> Any:
        opts = self.options
        return AIOKafkaProducer(
            bootstrap_servers=self.bootstrap,
            acks=opts.acks,
            enable_idempotence=opts.enable_idempotence,
            linger_ms=opts.linger_ms,
            compression_type=opts.compression_type,
            max_batch_size=opts.max_batch_bytes,
            # aiokafka checks each record against this with an upper-bound estimate (~20 bytes over
            # `encoded_size`): leave room so that our own, exact check is the one that decides.
            max_request_size=max(1024 * 1024, opts.max_event_bytes + 1024),
            **opts.connection(),
        )

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
        producer, self._producer = self._producer, None
        client, self._client = self._client, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), self.options.request_timeout_ms / 1000)
        if client is not None:
            with contextlib.suppress(Exception):
                await client.close()


# --------------------------------------------------------------------------------------------------
# opening


_OPTION_NAMES = frozenset(f.name for f in fields(KafkaOptions))


def from_url(url: str, **options: Any) -> KafkaAdapter:
    """`kafka://HOST:PORT[,HOST:PORT...]/TOPIC?group=G&mode=binary|structured` plus keyword options."""
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
    return KafkaAdapter(url, bootstrap, topic, group=query.get("group", DEFAULT_GROUP),
                        structured=mode == "structured", options=opts)


def _check(opts: KafkaOptions) -> None:
    """Configuration errors surface when the adapter is opened, not as failures of the first publish."""
    if opts.acks not in (0, 1, -1, "all"):
        raise ValueError(f"acks must be 0, 1, -1 or 'all', got {opts.acks!r}")
    if opts.enable_idempotence and opts.acks not in (-1, "all"):
        raise ValueError("enable_idempotence needs acks='all'")
    if opts.compression_type not in (None, "gzip", "snappy", "lz4", "zstd"):
        raise ValueError(f"compression_type must be gzip, snappy, lz4, zstd or None, got {opts.compression_type!r}")
    if opts.compression_type is not None and not getattr(kafka_codec, f"has_{opts.compression_type}")():
        raise ValueError(f"compression_type {opts.compression_type!r} needs its Python package (aiokafka's "
                         f"'{opts.compression_type}' extra), which is not installed")
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


__all__ = ["KafkaAdapter", "KafkaDelivery", "KafkaOptions", "classify", "from_url"]
