"""The `sqs://QUEUE` adapter: Amazon SQS (standard and FIFO queues) on aiobotocore.

URL: `sqs://QUEUE?region=R&endpoint=URL&owner=ACCOUNT` — all query parameters optional; the tunables
below may be given in the query too (for one entity) and then win over the options. Credentials never
come from the URL: pass `aws_access_key_id` / `aws_secret_access_key` / `aws_session_token` as options
(tests do), otherwise botocore's default chain (environment, shared config, instance role...) applies;
`region_name` / `endpoint_url` options and `AWS_REGION` / `AWS_ENDPOINT_URL_SQS` work as usual.

Other options: `max_event_bytes` (262,144: SQS's classic limit; queues configured for up to 1 MiB may
raise it), `visibility_timeout` (seconds; default: the queue's own setting), `wait_seconds` (long-poll
length, default 5), `receivers` (concurrent receive loops of a standard queue, default 2; FIFO: 1),
`send_concurrency` (concurrent SendMessageBatch calls of one publish to a standard queue, default 4),
`connect_timeout` / `read_timeout`, `undecodable_requeue_seconds`.

The event ⇄ message mapping is `umcef.fabric.bindings.sqs` (docs/mapping-sqs.md). Here:

- publish: `SendMessageBatch` of at most 10 entries and 256 KiB, as SQS counts size (body + attribute
  names, types and values); per-entry failures become per-event outcomes; an oversize event is
  `Rejected` before anything is sent. FIFO batches go out one after another (order); standard ones
  concurrently.
- consume: long-polling `ReceiveMessage` (10 at a time, never more than the free in-flight slots),
  ack = `DeleteMessageBatch`, nack = `ChangeMessageVisibility(requeue_after)`, `attempt` =
  `ApproximateReceiveCount`. A heartbeat extends the visibility of deliveries still being handled, so
  a short visibility timeout gives fast crash recovery without duplicating slow handlers' work.
  FIFO: one handler at a time per message group, in order; when one is nacked, the rest of its group
  from the same receive goes back unhandled so SQS redelivers them after it, still in order.
- botocore's own retries are off: classified errors reach the delivery layer, which owns retry,
  backoff and failover (retrying in two layers multiplies the wait on a dead region).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Final
from urllib.parse import parse_qs, urlsplit

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
from umcef.fabric.bindings.sqs import (
    MAX_ATTRIBUTES,
    SqsMessage,
    from_message,
    is_fifo_queue,
    message_from_wire,
    to_message,
)
from umcef.fabric.errors import EventError
from umcef.fabric.event import Event

log = logging.getLogger(__name__)

DEFAULT_MAX_EVENT_BYTES: Final = 262_144   # 256 KiB, per message and per batch request
MAX_BATCH: Final = 10                      # entries per SendMessageBatch / DeleteMessageBatch / ...
MAX_WAIT_SECONDS: Final = 20               # SQS's longest long poll
MAX_VISIBILITY_SECONDS: Final = 43_200     # 12 hours
DEFAULT_WAIT_SECONDS: Final = 5            # long poll; also how long stop_consuming may take when idle
SEND_CONCURRENCY: Final = 4                # default concurrent SendMessageBatch calls, standard queues
_QUEUE_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}\Z")

# Error codes, as SQS's JSON protocol reports them (`Code`) and their query-protocol aliases
# (`QueryErrorCode`): both are checked.
_THROTTLED = frozenset({"ThrottlingException", "RequestThrottled", "KmsThrottled", "KMS.ThrottlingException",
                        "Throttling", "RequestLimitExceeded", "SlowDown", "OverLimit"})
_NOT_FOUND = frozenset({"QueueDoesNotExist", "AWS.SimpleQueueService.NonExistentQueue", "NonExistentQueue",
                        "AWS.SimpleQueueService.QueueDeletedRecently", "QueueDeletedRecently"})
_UNAUTHORIZED = frozenset({"AccessDenied", "AccessDeniedException", "InvalidClientTokenId",
                           "UnrecognizedClientException", "SignatureDoesNotMatch", "IncompleteSignature",
                           "MissingAuthenticationToken", "InvalidSecurity", "ExpiredToken", "ExpiredTokenException",
                           "InvalidAccessKeyId", "AuthFailure", "OptInRequired", "KmsAccessDenied", "KmsDisabled",
                           "KmsNotFound", "KmsInvalidState", "KmsInvalidKeyUsage", "KMS.AccessDeniedException",
                           "KmsOptInRequired", "RequestExpired"})
_TRANSIENT = frozenset({"InternalError", "InternalFailure", "ServiceUnavailable", "RequestTimeout",
                        "AWS.SimpleQueueService.InternalError"})


# ---------------------------------------------------------------------------------------------------
# error classification


def classify(exc: BaseException, what: str) -> AdapterError:
    """Any failure of a botocore call as one of the contract's typed errors."""
    if isinstance(exc, AdapterError):
        return exc
    from botocore.exceptions import (  # type: ignore[import-untyped]
        BotoCoreError,
        ClientError,
        NoCredentialsError,
        NoRegionError,
        PartialCredentialsError,
    )

    if isinstance(exc, ClientError):
        response = exc.response or {}
        error = response.get("Error") or {}
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        sender = {"Sender": True, "Receiver": False}.get(error.get("Type", ""))
        codes = {error.get("Code") or "", error.get("QueryErrorCode") or ""} - {""}
        return classify_code(codes, f"{what}: {error.get('Message') or exc}", status, sender)
    if isinstance(exc, NoCredentialsError | PartialCredentialsError | NoRegionError):
        # Configuration: retrying will not help until it changes, which is what Unauthorized says.
        return Unauthorized(f"{what}: {exc}")
    if isinstance(exc, BotoCoreError | OSError | TimeoutError):  # connection refused/reset, timeouts, DNS
        return Transient(f"{what}: {type(exc).__name__}: {exc}")
    import aiohttp

    if isinstance(exc, aiohttp.ClientError):
        return Transient(f"{what}: {type(exc).__name__}: {exc}")
    # Unknown: better retried than dead-lettered, and it must not escape the adapter.
    return Transient(f"{what}: unexpected {type(exc).__name__}: {exc}")


def classify_code(codes: set[str], reason: str, status: int | None = None,
                  sender_fault: bool | None = None) -> AdapterError:
    """An SQS error code (whole request, or one entry of a batch) as a typed error."""
    if codes & _THROTTLED:
        return Throttled(reason, retry_after=1.0)
    if codes & _NOT_FOUND:
        return NotFound(reason)
    if codes & _UNAUTHORIZED or status in (401, 403):
        return Unauthorized(reason)
    if codes & _TRANSIENT or (status is not None and status >= 500) or sender_fault is False:
        return Transient(reason)
    # The request itself is wrong (InvalidMessageContents, InvalidParameterValue...): sending it again
    # cannot help, so it goes to the dead-letter queue.
    return Rejected(reason)


# ---------------------------------------------------------------------------------------------------
# the adapter


_SESSION: Any = None


def _session() -> Any:
    """One aiobotocore session per process: it caches the loaded service models (~50 ms per client
    otherwise). Credentials are resolved per client, so adapters with different ones can share it."""
    global _SESSION
    if _SESSION is None:
        from aiobotocore.session import get_session  # type: ignore[import-untyped]

        _SESSION = get_session()
    return _SESSION


class SqsAdapter:
    def __init__(self, url: str, queue: str, *, region: str | None = None, endpoint: str | None = None,
                 owner: str | None = None, credentials: dict[str, str] | None = None,
                 max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES, visibility_timeout: int | None = None,
                 wait_seconds: int = DEFAULT_WAIT_SECONDS, connect_timeout: float = 5.0,
                 read_timeout: float = 30.0, undecodable_requeue_seconds: int = 300, receivers: int = 2,
                 send_concurrency: int = SEND_CONCURRENCY) -> None:
        self.url = url
        self.queue = queue
        self.fifo = is_fifo_queue(queue)
        self.capabilities = Capabilities(max_event_bytes=max_event_bytes, max_attributes=MAX_ATTRIBUTES,
                                         ordering=self.fifo, native_dedup=self.fifo, max_batch=MAX_BATCH,
                                         dead_letter=True)
        # The per-request total is SQS's API limit, at least the classic 256 KiB (1 MiB where the
        # per-message limit is raised to it: both moved together).
        self.batch_bytes = max(max_event_bytes, DEFAULT_MAX_EVENT_BYTES)
        self.visibility_timeout = visibility_timeout
        self.wait_seconds = max(0, min(MAX_WAIT_SECONDS, wait_seconds))
        self.undecodable_requeue_seconds = undecodable_requeue_seconds
        self.receivers = max(1, receivers)
        self.send_concurrency = max(1, send_concurrency)
        self._owner = owner
        self._client_args: dict[str, Any] = dict(credentials or {})
        if region:
            self._client_args["region_name"] = region
        if endpoint:
            self._client_args["endpoint_url"] = endpoint
        self._connect_timeout = connect_timeout
        self._read_timeout = max(read_timeout, self.wait_seconds + 10.0)  # a long poll must not time out
        self._stack = contextlib.AsyncExitStack()
        self._client: Any = None
        self._probe_client: Any = None
        self._lock = asyncio.Lock()
        self._queue_url: str | None = None
        self._consumer: _Consumer | None = None
        self._closed = False

    # -- clients ---------------------------------------------------------------------------------

    async def _new_client(self, connect_timeout: float, read_timeout: float) -> Any:
        from aiobotocore.config import AioConfig  # type: ignore[import-untyped]

        config = AioConfig(connect_timeout=connect_timeout, read_timeout=read_timeout,
                           retries={"mode": "standard", "total_max_attempts": 1},
                           max_pool_connections=32)
        try:
            return await self._stack.enter_async_context(
                _session().create_client("sqs", config=config, **self._client_args))
        except Exception as exc:
            raise classify(exc, "creating the SQS client") from None

    async def _sqs(self) -> Any:
        if self._closed:
            raise Transient(f"{self.url}: adapter is closed")
        if self._client is None:
            async with self._lock:
                if self._client is None:
                    self._client = await self._new_client(self._connect_timeout, self._read_timeout)
        return self._client

    async def _queue(self) -> str:
        """The queue URL, looked up once (GetQueueUrl) and again after the queue was reported missing."""
        if self._queue_url is None:
            client = await self._sqs()
            self._queue_url = await self._get_queue_url(client)
        return self._queue_url

    async def _get_queue_url(self, client: Any) -> str:
        kwargs = {"QueueName": self.queue}
        if self._owner:
            kwargs["QueueOwnerAWSAccountId"] = self._owner
        try:
            response = await client.get_queue_url(**kwargs)
        except Exception as exc:
            raise classify(exc, f"queue {self.queue!r}") from None
        return str(response["QueueUrl"])

    async def call(self, operation: str, **kwargs: Any) -> Any:
        """One SQS call on the queue, errors classified; a vanished queue is looked up again next time."""
        client = await self._sqs()
        url = await self._queue()
        try:
            return await getattr(client, operation)(QueueUrl=url, **kwargs)
        except Exception as exc:
            error = classify(exc, f"{operation} on {self.queue!r}")
            if isinstance(error, NotFound):
                self._queue_url = None
            raise error from None

    # -- publish ---------------------------------------------------------------------------------

    def encoded_size(self, event: Event) -> int:
        return to_message(event, fifo=self.fifo).size()

    async def publish(self, batch: Sequence[Event]) -> list[PublishOutcome]:
        errors: list[AdapterError | None] = [None] * len(batch)
        ready: list[tuple[int, SqsMessage, int]] = []
        limit = self.capabilities.max_event_bytes
        for index, event in enumerate(batch):
            try:
                message = to_message(event, fifo=self.fifo)
            except EventError as exc:
                errors[index] = Rejected(f"cannot map the event to an SQS message: {exc}")
                continue
            size = message.size()
            if size > limit:
                errors[index] = Rejected(f"event of {size} bytes exceeds SQS's limit of {limit} bytes "
                                         "(body plus message attribute names, types and values)")
                continue
            ready.append((index, message, size))
        if ready:
            chunks = self._chunks(ready)
            if self.fifo:
                # One after another: SQS keeps a group's order only across requests that do not overlap.
                for chunk in chunks:
                    for index, error in await self._send(chunk):
                        errors[index] = error
            else:
                slots = asyncio.Semaphore(self.send_concurrency)

                async def send(chunk: list[tuple[int, SqsMessage, int]]) -> list[tuple[int, AdapterError | None]]:
                    async with slots:
                        return await self._send(chunk)

                for results in await asyncio.gather(*(send(chunk) for chunk in chunks)):
                    for index, error in results:
                        errors[index] = error
        return [PublishOutcome(str(event.attributes.get("id", "")), error) for event, error in zip(batch, errors,
                                                                                                     strict=True)]

    def _chunks(self, ready: list[tuple[int, SqsMessage, int]]) -> list[list[tuple[int, SqsMessage, int]]]:
        """Consecutive runs of at most 10 messages and `batch_bytes` in total (order kept for FIFO)."""
        chunks: list[list[tuple[int, SqsMessage, int]]] = []
        current: list[tuple[int, SqsMessage, int]] = []
        total = 0
        for item in ready:
            if current and (len(current) == MAX_BATCH or total + item[2] > self.batch_bytes):
                chunks.append(current)
                current, total = [], 0
            current.append(item)
            total += item[2]
        if current:
            chunks.append(current)
        return chunks

    async def _send(self, chunk: list[tuple[int, SqsMessage, int]]) -> list[tuple[int, AdapterError | None]]:
        entries = []
        for position, (_, message, _) in enumerate(chunk):
            entry: dict[str, Any] = {"Id": str(position), "MessageBody": message.body}
            if message.attributes:
                entry["MessageAttributes"] = message.wire_attributes()
            if message.group_id is not None:
                entry["MessageGroupId"] = message.group_id
            if message.dedup_id is not None:
                entry["MessageDeduplicationId"] = message.dedup_id
            entries.append(entry)
        try:
            response = await self.call("send_message_batch", Entries=entries)
        except Rejected as error:
            if len(chunk) > 1:
                # A whole-request rejection (e.g. one bad entry, or our size count disagreeing with
                # SQS's) must not dead-letter nine good events with it: halve until it is isolated.
                half = len(chunk) // 2
                return await self._send(chunk[:half]) + await self._send(chunk[half:])
            return [(chunk[0][0], error)]
        except AdapterError as error:
            return [(index, error) for index, _, _ in chunk]
        failed = {str(f.get("Id")): f for f in response.get("Failed") or ()}
        succeeded = {str(s.get("Id")) for s in response.get("Successful") or ()}
        results: list[tuple[int, AdapterError | None]] = []
        for position, (index, _, _) in enumerate(chunk):
            key = str(position)
            if key in failed:
                results.append((index, _entry_error(failed[key], "SendMessageBatch")))
            elif key in succeeded:
                results.append((index, None))
            else:
                results.append((index, Transient("SendMessageBatch: SQS answered nothing for this entry")))
        return results

    # -- consume ---------------------------------------------------------------------------------

    async def consume(self, handler: Handler, *, max_in_flight: int = 64) -> None:
        if self._consumer is not None and not self._consumer.finished:
            raise RuntimeError(f"{self.url}: consume() is already running")
        visibility = self.visibility_timeout
        if visibility is None:
            attributes = await self.call("get_queue_attributes", AttributeNames=["VisibilityTimeout"])
            visibility = int((attributes.get("Attributes") or {}).get("VisibilityTimeout", 30))
        else:
            await self._queue()  # NotFound / Unauthorized now, not on the first receive
        consumer = _Consumer(self, handler, max(1, max_in_flight), max(1, visibility))
        self._consumer = consumer
        await consumer.run()

    async def stop_consuming(self) -> None:
        if self._consumer is not None:
            self._consumer.stop.set()

    # -- probe / close ---------------------------------------------------------------------------

    async def probe(self) -> float:
        """One GetQueueUrl round trip on a client with short timeouts and no retries."""
        if self._closed:
            raise Transient(f"{self.url}: adapter is closed")
        if self._probe_client is None:
            async with self._lock:
                if self._probe_client is None:
                    self._probe_client = await self._new_client(2.0, 3.0)
        started = time.perf_counter()
        try:
            # A hard deadline on top of the client's timeouts: DNS or a stuck TLS handshake must not hang us.
            await asyncio.wait_for(self._get_queue_url(self._probe_client), 5.0)
        except TimeoutError:
            raise Transient(f"probe of {self.queue!r}: no answer within 5 s") from None
        return max(time.perf_counter() - started, 1e-9)

    async def close(self) -> None:
        if self._closed:
            return
        consumer = self._consumer
        if consumer is not None and not consumer.finished:
            consumer.stop.set()
            # Let a graceful stop finish its receive and acks before the client goes away.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(consumer.done.wait(), self.wait_seconds + 2.0)
        self._closed = True
        with contextlib.suppress(Exception):
            await self._stack.aclose()
        self._client = self._probe_client = None


def _entry_error(failure: dict[str, Any], what: str) -> AdapterError:
    code = str(failure.get("Code") or "")
    sender = failure.get("SenderFault")
    return classify_code({code}, f"{what}: {code}: {failure.get('Message') or ''}".rstrip(": "),
                         None, bool(sender) if sender is not None else None)


# ---------------------------------------------------------------------------------------------------
# consuming


class SqsDelivery:
    __slots__ = ("_consumer", "attempt", "event", "group", "nacked", "receipt", "settled", "visible_until")

    def __init__(self, consumer: _Consumer, event: Event, attempt: int, receipt: str, group: str | None,
                 visible_until: float) -> None:
        self._consumer = consumer
        self.event = event
        self.attempt = attempt
        self.receipt = receipt
        self.group = group
        self.settled = False
        self.nacked = False
        self.visible_until = visible_until  # our lease, as far as we know for sure (see `_Consumer.lease_ok`)

    async def ack(self) -> None:
        if not self.settled:
            self.settled = True
            await self._consumer.settle(self, self._consumer.deletes, {"ReceiptHandle": self.receipt})

    async def nack(self, *, requeue_after: float | None = None) -> None:
        if not self.settled:
            self.settled = True
            self.nacked = True
            seconds = min(MAX_VISIBILITY_SECONDS, max(0, math.ceil(requeue_after or 0)))
            await self._consumer.settle(self, self._consumer.visibility_changes,
                                        {"ReceiptHandle": self.receipt, "VisibilityTimeout": seconds})


class _Batcher:
    """Coalesces DeleteMessage / ChangeMessageVisibility calls made in the same moment into batch calls.

    `submit` waits for its own entry's result. Settlements of concurrent handlers land together, so the
    first one waits one event-loop turn for the others and they share one request (moto and SQS alike
    are per-request bound)."""

    def __init__(self, adapter: SqsAdapter, operation: str) -> None:
        self._adapter = adapter
        self._operation = operation
        self._pending: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None

    async def submit(self, entry: dict[str, Any]) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending.append((entry, future))
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.create_task(self._flush())
        await asyncio.shield(future)  # a cancelled submitter must not cancel its neighbours' request

    async def drain(self) -> None:
        if self._flusher is not None:
            with contextlib.suppress(Exception):
                await self._flusher

    async def _flush(self) -> None:
        await asyncio.sleep(0)
        while self._pending:
            chunk, self._pending = self._pending[:MAX_BATCH], self._pending[MAX_BATCH:]
            await self._send(chunk)

    async def _send(self, chunk: list[tuple[dict[str, Any], asyncio.Future[None]]]) -> None:
        entries = [{**entry, "Id": str(position)} for position, (entry, _) in enumerate(chunk)]
        response: Any = None
        for attempt in range(3):
            try:
                response = await self._adapter.call(self._operation, Entries=entries)
                break
            except AdapterError as error:
                # A lost delete means a duplicate later; a few quick retries are cheap insurance.
                if not error.retryable or attempt == 2:
                    for _, future in chunk:
                        if not future.done():
                            future.set_exception(error)
                            future.exception()  # retrieved: a settler that was cancelled must not warn
                    return
                await asyncio.sleep(0.1 * 2**attempt)
        failed = {str(f.get("Id")): f for f in response.get("Failed") or ()}
        for position, (_, future) in enumerate(chunk):
            if future.done():
                continue
            failure = failed.get(str(position))
            if failure is None:
                future.set_result(None)
            else:
                future.set_exception(_entry_error(failure, self._operation))
                future.exception()


class _Consumer:
    """One `consume()` run: receive loop, dispatch, in-flight accounting, heartbeat, settlement."""

    def __init__(self, adapter: SqsAdapter, handler: Handler, max_in_flight: int, visibility: int) -> None:
        self.adapter = adapter
        self.handler = handler
        self.max_in_flight = max_in_flight
        self.visibility = visibility
        self.stop = asyncio.Event()
        self.done = asyncio.Event()
        self.finished = False
        self.deletes = _Batcher(adapter, "delete_message_batch")
        self.visibility_changes = _Batcher(adapter, "change_message_visibility_batch")
        self.in_flight = 0
        self.reserved = 0  # slots promised to receives under way
        self.receivers = 1 if adapter.fifo else adapter.receivers
        self.slot_freed = asyncio.Event()
        self.unsettled: dict[str, SqsDelivery] = {}  # receipt handle -> delivery: what the heartbeat extends
        self.tasks: set[asyncio.Task[None]] = set()

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        crashed = False
        try:
            await self._receive()
            if self.tasks:  # graceful stop: in-flight handlers finish and settle
                await asyncio.gather(*self.tasks, return_exceptions=True)
        except asyncio.CancelledError:
            # A crash: nothing more is settled. Unsettled messages stay invisible until their visibility
            # timeout runs out (the heartbeat dies with us) and SQS then delivers them again.
            crashed = True
            for task in self.tasks:
                task.cancel()
            raise
        finally:
            heartbeat.cancel()
            if not crashed:
                await self.deletes.drain()
                await self.visibility_changes.drain()
            self.finished = True
            self.done.set()

    async def _receive(self) -> None:
        """`receivers` concurrent receive loops; the first to fail for good (NotFound, Unauthorized) ends all."""
        loops = [asyncio.create_task(self._receive_loop()) for _ in range(self.receivers)]
        try:
            done, _ = await asyncio.wait(loops, return_when=asyncio.FIRST_EXCEPTION)
            for task in done:
                task.result()
            await asyncio.gather(*loops)
        finally:
            for task in loops:
                task.cancel()

    async def _receive_loop(self) -> None:
        adapter = self.adapter
        backoff = 0.2
        while not self.stop.is_set():
            free = self.max_in_flight - self.in_flight - self.reserved
            if free <= 0:
                self.slot_freed.clear()
                await _first(self.slot_freed.wait(), self.stop.wait())
                continue
            # Slots are reserved for the whole receive so that concurrent loops never together ask for
            # more messages than max_in_flight allows.
            wanted = min(MAX_BATCH, free)
            self.reserved += wanted
            asked_at = time.monotonic()  # SQS starts the visibility clock at some point after this
            try:
                response = await adapter.call(
                    "receive_message", MaxNumberOfMessages=wanted, WaitTimeSeconds=adapter.wait_seconds,
                    VisibilityTimeout=self.visibility, MessageAttributeNames=["All"],
                    MessageSystemAttributeNames=["ApproximateReceiveCount", "MessageGroupId"])
            except (Transient, Throttled) as error:
                # The broker is away for a moment: keep consuming once it is back. NotFound and
                # Unauthorized end consume() (the queue is gone or we may not read it).
                log.warning("%s: receive failed, retrying in %.1fs: %s", adapter.url, backoff, error)
                await _first(self.stop.wait(), asyncio.sleep(backoff))
                backoff = min(backoff * 2, 5.0)
                continue
            finally:
                self.reserved -= wanted
                self.slot_freed.set()
            backoff = 0.2
            raw_messages = response.get("Messages") or []
            self.in_flight += len(raw_messages)
            # The lease counts from when we asked, not from when the answer arrived: under load the answer
            # can take a good part of a short visibility timeout.
            lease = asked_at + self.visibility
            deliveries = [d for d in (self._delivery(raw, lease) for raw in raw_messages) if d is not None]
            if self.stop.is_set():
                # Received after stop_consuming: never handled, so handed straight back.
                for delivery in deliveries:
                    self._spawn(self.release(delivery, 0))
                break
            if self.adapter.fifo:
                chains: dict[str | None, list[SqsDelivery]] = {}
                for delivery in deliveries:
                    chains.setdefault(delivery.group, []).append(delivery)
                for chain in chains.values():
                    self._spawn(self._handle_chain(chain))
            else:
                for delivery in deliveries:
                    self._spawn(self._handle(delivery))
            if not raw_messages and adapter.wait_seconds == 0:
                await _first(self.stop.wait(), asyncio.sleep(0.2))  # no long poll to pace us

    def _delivery(self, raw: dict[str, Any], lease: float) -> SqsDelivery | None:
        receipt = str(raw.get("ReceiptHandle", ""))
        system = raw.get("Attributes") or {}
        try:
            attempt = max(1, int(system.get("ApproximateReceiveCount", 1)))
        except ValueError:
            attempt = 1
        try:
            event = from_message(message_from_wire(raw))
        except EventError as exc:
            # Not one of our events (or corrupted). Deleting would drop it silently; keeping it visible
            # would spin on it. It goes back with a long delay, so the queue's redrive policy
            # (maxReceiveCount) moves it to the queue's dead-letter queue.
            log.warning("%s: message %s is not a CloudEvent (%s); returned for the queue's redrive policy",
                        self.adapter.url, raw.get("MessageId"), exc)
            placeholder = SqsDelivery(self, Event({}, None), attempt, receipt, None, lease)
            self.unsettled[receipt] = placeholder
            self._spawn(self.release(placeholder, self.adapter.undecodable_requeue_seconds))
            return None
        delivery = SqsDelivery(self, event, attempt, receipt, system.get("MessageGroupId"), lease)
        self.unsettled[receipt] = delivery
        return delivery

    def _spawn(self, work: Awaitable[None]) -> None:
        task = asyncio.ensure_future(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _handle(self, delivery: SqsDelivery) -> None:
        try:
            await self.handler(delivery)
        except Exception as exc:
            log.debug("%s: handler failed for %s: %r", self.adapter.url, delivery.event.id, exc)
            settle: Callable[[], Awaitable[None]] = delivery.nack
        else:
            settle = delivery.ack
        try:
            await settle()
        except AdapterError as error:  # the message comes back after its visibility timeout: at-least-once
            log.warning("%s: settling %s failed: %s", self.adapter.url, delivery.event.id, error)

    async def _handle_chain(self, chain: list[SqsDelivery]) -> None:
        """One FIFO message group's share of a receive: strictly one after another."""
        for position, delivery in enumerate(chain):
            if self.stop.is_set():
                rest = chain[position:]  # stop: what was not started is not handled
            elif position and chain[position - 1].nacked:
                rest = chain[position:]  # after a nack, the rest must come again after the nacked one
            elif not self.lease_ok(delivery):
                # Our hold on the group may have lapsed (the heartbeat could not extend it in time), so SQS
                # may already be handing these messages to another consumer: handling them here too
                # could interleave the group. Give them back; SQS redelivers the group in order.
                log.warning("%s: lease on message group %s lapsed; returning %d messages unhandled",
                            self.adapter.url, delivery.group, len(chain) - position)
                rest = chain[position:]
            else:
                await self._handle(delivery)
                continue
            await asyncio.gather(*(self.release(d, 0) for d in rest))
            return

    def lease_ok(self, delivery: SqsDelivery) -> bool:
        """True while the message surely stays invisible to others for a while yet (a tenth of the timeout)."""
        return delivery.visible_until - time.monotonic() > self.visibility / 10

    async def settle(self, delivery: SqsDelivery, batcher: _Batcher, entry: dict[str, Any]) -> None:
        try:
            await batcher.submit(entry)
        finally:
            self._forget(delivery)

    async def release(self, delivery: SqsDelivery, seconds: int) -> None:
        """Hand a message back unhandled (visible again after `seconds`)."""
        delivery.settled = True
        try:
            await self.visibility_changes.submit({"ReceiptHandle": delivery.receipt, "VisibilityTimeout": seconds})
        except AdapterError as error:
            log.warning("%s: returning a message failed (it comes back after its visibility timeout): %s",
                        self.adapter.url, error)
        finally:
            self._forget(delivery)

    def _forget(self, delivery: SqsDelivery) -> None:
        if self.unsettled.pop(delivery.receipt, None) is not None:
            self.in_flight -= 1
            self.slot_freed.set()

    async def _heartbeat(self) -> None:
        """Keep received-but-unsettled messages invisible: extend each when a third of its time is gone.

        Early rather than at the last moment: the extension is a round trip too, and a late one lets the
        message reappear (a duplicate; on a FIFO queue the group could be handed to someone else)."""
        interval = max(0.2, self.visibility / 6)
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            due = [d for d in self.unsettled.values()
                   if not d.settled and d.visible_until - now < self.visibility * 2 / 3]
            for start in range(0, len(due), MAX_BATCH):
                chunk = due[start:start + MAX_BATCH]
                entries = [{"Id": str(i), "ReceiptHandle": d.receipt, "VisibilityTimeout": self.visibility}
                           for i, d in enumerate(chunk)]
                try:
                    await self.adapter.call("change_message_visibility_batch", Entries=entries)
                except AdapterError as error:
                    log.warning("%s: extending visibility failed: %s", self.adapter.url, error)
                    continue
                for delivery in chunk:
                    delivery.visible_until = now + self.visibility


async def _first(*waits: Awaitable[Any]) -> None:
    """Wait until the first of `waits` completes; cancel the others."""
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()


# ---------------------------------------------------------------------------------------------------
# opening


def from_url(url: str, **options: Any) -> SqsAdapter:
    """`sqs://QUEUE?region=R&endpoint=URL&owner=ACCOUNT`; see the module docstring for options."""
    queue, settings = _parse(url, options)
    return SqsAdapter(url, queue, **settings)


def check_url(url: str, **options: Any) -> None:
    """Raises what `from_url` would for this URL and these options, opening nothing (configuration checks)."""
    _parse(url, options)


def _parse(url: str, options: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    parts = urlsplit(url)
    queue = (parts.netloc + parts.path).strip("/")
    name = queue[:-5] if queue.endswith(".fifo") else queue
    if parts.scheme.lower() != "sqs" or not _QUEUE_NAME.match(name) or len(queue) > 80:
        raise ValueError(f"expected sqs://QUEUE (1-80 letters, digits, '-', '_', optional .fifo), got {url!r}")
    if parts.username or parts.password:
        raise ValueError("credentials never go in the URL: pass them as options or use the environment")
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    credentials = {key: str(options[key]) for key in ("aws_access_key_id", "aws_secret_access_key",
                                                       "aws_session_token") if options.get(key)}

    def tunable(key: str, default: Any, kind: type[int] | type[float] = int) -> Any:
        value = query.get(key, options.get(key, default))  # the URL's query (one entity) wins over options
        try:
            return None if value is None else kind(value)
        except (TypeError, ValueError):
            raise ValueError(f"{key} must be {'an integer' if kind is int else 'a number'}, got {value!r}") from None

    return queue, {
        "region": query.get("region") or options.get("region_name"),
        "endpoint": query.get("endpoint") or options.get("endpoint_url"),
        "owner": query.get("owner"),
        "credentials": credentials,
        "max_event_bytes": tunable("max_event_bytes", DEFAULT_MAX_EVENT_BYTES),
        "visibility_timeout": tunable("visibility_timeout", None),
        "wait_seconds": tunable("wait_seconds", DEFAULT_WAIT_SECONDS),
        "connect_timeout": tunable("connect_timeout", 5.0, float),
        "read_timeout": tunable("read_timeout", 30.0, float),
        "undecodable_requeue_seconds": tunable("undecodable_requeue_seconds", 300),
        "receivers": tunable("receivers", 2),
        "send_concurrency": tunable("send_concurrency", SEND_CONCURRENCY),
    }
