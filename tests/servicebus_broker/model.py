"""Entity and message state of the Service Bus test double (no I/O; the broker holds the lock)."""

from __future__ import annotations

import heapq
import time
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import TYPE_CHECKING, Any

from .codec import ParsedMessage, plain, to_timestamp

if TYPE_CHECKING:
    from .broker import _LinkState

STANDARD_MAX_MESSAGE_SIZE = 256 * 1024

# Header delivery-count and the dead-letter application properties Service Bus uses.
DEAD_LETTER_REASON = "DeadLetterReason"
DEAD_LETTER_DESCRIPTION = "DeadLetterErrorDescription"
MAX_DELIVERY_COUNT_EXCEEDED = "MaxDeliveryCountExceeded"


class State(Enum):
    AVAILABLE = 0
    LOCKED = 1
    DEFERRED = 2
    SCHEDULED = 3


# x-opt-message-state values the SDK maps to ServiceBusMessageState.
_WIRE_STATE = {State.AVAILABLE: 0, State.LOCKED: 0, State.DEFERRED: 1, State.SCHEDULED: 2}


@dataclass(eq=False)
class StoredMessage:
    sequence_number: int
    enqueued_time: float
    parsed: ParsedMessage
    session_key: str | None
    state: State = State.AVAILABLE
    delivery_count: int = 0
    lock_token: uuid.UUID | None = None
    locked_until: float = 0.0
    link: _LinkState | None = None
    delivery: Any = None  # proton Delivery while the message is out on a receive link
    scheduled_at: float | None = None
    extra_annotations: dict[str, Any] = field(default_factory=dict)
    extra_application_properties: dict[str, Any] = field(default_factory=dict)

    def encode(self, *, include_lock: bool) -> bytes:
        annotations: dict[str, Any] = {
            "x-opt-sequence-number": int(self.sequence_number),
            "x-opt-enqueued-time": to_timestamp(self.enqueued_time),
            "x-opt-message-state": _WIRE_STATE[self.state],
        }
        if include_lock and self.state is State.LOCKED:
            annotations["x-opt-locked-until"] = to_timestamp(self.locked_until)
        if self.scheduled_at is not None:
            annotations["x-opt-scheduled-enqueue-time"] = to_timestamp(self.scheduled_at)
        annotations.update(self.extra_annotations)
        return self.parsed.encode(
            delivery_count=self.delivery_count,
            extra_annotations=annotations,
            extra_application_properties=self.extra_application_properties or None,
        )


@dataclass(frozen=True)
class BrokerMessage:
    """Read-only snapshot of a stored message, for test assertions."""

    sequence_number: int
    message_id: Any
    session_id: str | None
    content_type: str | None
    correlation_id: Any
    subject: str | None
    application_properties: dict[str, Any]
    body: bytes | Any
    body_sections: list[Any]
    delivery_count: int
    state: str
    dead_letter_reason: str | None
    dead_letter_description: str | None
    enqueued_time: float

    @classmethod
    def snapshot(cls, msg: StoredMessage) -> BrokerMessage:
        parsed = msg.parsed
        app = plain(parsed.application_properties)
        app.update(plain(msg.extra_application_properties))
        sections = [plain(s) for s in parsed.body]
        if sections and all(isinstance(s, bytes) for s in sections):
            body: Any = b"".join(sections)
        else:
            body = sections[0] if len(sections) == 1 else sections
        return cls(
            sequence_number=msg.sequence_number,
            message_id=plain(parsed.message_id),
            session_id=parsed.session_id,
            content_type=parsed.content_type,
            correlation_id=plain(parsed.correlation_id),
            subject=parsed.subject,
            application_properties=app,
            body=body,
            body_sections=sections,
            delivery_count=msg.delivery_count,
            state=msg.state.name.lower(),
            dead_letter_reason=app.get(DEAD_LETTER_REASON),
            dead_letter_description=app.get(DEAD_LETTER_DESCRIPTION),
            enqueued_time=msg.enqueued_time,
        )


class MessageStore:
    """A receivable entity: a queue, a subscription, or the dead-letter sub-queue of either."""

    def __init__(
        self,
        path: str,
        *,
        requires_session: bool = False,
        max_delivery_count: int = 10,
        lock_duration: float = 30.0,
        max_message_size: int = STANDARD_MAX_MESSAGE_SIZE,
        is_dead_letter: bool = False,
    ) -> None:
        self.path = path
        self.requires_session = requires_session
        self.max_delivery_count = max_delivery_count
        self.lock_duration = lock_duration
        self.max_message_size = max_message_size
        self.is_dead_letter = is_dead_letter
        self.dead_letter: MessageStore | None = None
        if not is_dead_letter:
            self.dead_letter = MessageStore(
                f"{path}/$deadletterqueue",
                lock_duration=lock_duration,
                max_delivery_count=max_delivery_count,
                max_message_size=max_message_size,
                is_dead_letter=True,
            )
        self.next_sequence = 1
        self.messages: dict[int, StoredMessage] = {}
        self.available: dict[str | None, list[int]] = {}
        self.locks: dict[uuid.UUID, StoredMessage] = {}
        self.lock_heap: list[tuple[float, int, uuid.UUID]] = []
        self.scheduled_heap: list[tuple[float, int]] = []
        self.receivers: list[_LinkState] = []
        self.pending_session_links: list[_LinkState] = []
        self.session_owners: dict[str, _LinkState] = {}
        self.session_locked_until: dict[str, float] = {}
        self.session_states: dict[str, bytes | None] = {}
        self.rr_offset = 0

    # -- enqueue ---------------------------------------------------------------------------------

    def enqueue(
        self,
        parsed: ParsedMessage,
        *,
        now: float,
        scheduled_at: float | None = None,
        extra_application_properties: dict[str, Any] | None = None,
        extra_annotations: dict[str, Any] | None = None,
    ) -> StoredMessage:
        key = parsed.session_id if self.requires_session else None
        msg = StoredMessage(self.next_sequence, now, parsed, key)
        self.next_sequence += 1
        if extra_application_properties:
            msg.extra_application_properties.update(extra_application_properties)
        if extra_annotations:
            msg.extra_annotations.update(extra_annotations)
        self.messages[msg.sequence_number] = msg
        if scheduled_at is not None and scheduled_at > now:
            msg.state = State.SCHEDULED
            msg.scheduled_at = scheduled_at
            heapq.heappush(self.scheduled_heap, (scheduled_at, msg.sequence_number))
        else:
            self.make_available(msg)
        return msg

    def make_available(self, msg: StoredMessage) -> None:
        self._drop_lock(msg)
        msg.state = State.AVAILABLE
        heapq.heappush(self.available.setdefault(msg.session_key, []), msg.sequence_number)

    # -- taking messages -------------------------------------------------------------------------

    def peek_available(self, key: str | None) -> StoredMessage | None:
        heap = self.available.get(key)
        while heap:
            msg = self.messages.get(heap[0])
            if msg is not None and msg.state is State.AVAILABLE:
                return msg
            heapq.heappop(heap)  # stale entry (message moved on)
        return None

    def take(self, key: str | None) -> StoredMessage | None:
        msg = self.peek_available(key)
        if msg is not None:
            heapq.heappop(self.available[msg.session_key])
        return msg

    def lock(self, msg: StoredMessage, link: _LinkState | None, now: float, token: uuid.UUID) -> None:
        msg.state = State.LOCKED
        msg.lock_token = token
        msg.link = link
        if self.requires_session and msg.session_key is not None:
            msg.locked_until = self.session_locked_until.get(msg.session_key, now + self.lock_duration)
        else:
            msg.locked_until = now + self.lock_duration
            heapq.heappush(self.lock_heap, (msg.locked_until, msg.sequence_number, token))
        self.locks[token] = msg

    def renew(self, msg: StoredMessage, now: float) -> float:
        assert msg.lock_token is not None
        msg.locked_until = now + self.lock_duration
        heapq.heappush(self.lock_heap, (msg.locked_until, msg.sequence_number, msg.lock_token))
        return msg.locked_until

    def _drop_lock(self, msg: StoredMessage) -> None:
        if msg.lock_token is not None:
            self.locks.pop(msg.lock_token, None)
        msg.lock_token = None
        msg.link = None
        msg.delivery = None

    def remove(self, msg: StoredMessage) -> None:
        self._drop_lock(msg)
        self.messages.pop(msg.sequence_number, None)

    def defer(self, msg: StoredMessage) -> None:
        self._drop_lock(msg)
        msg.state = State.DEFERRED

    def sessions_with_messages(self) -> list[str]:
        result: list[tuple[int, str]] = []
        for key in self.available:
            if key is None:
                continue
            head = self.peek_available(key)
            if head is not None:
                result.append((head.sequence_number, key))
        return [key for _, key in sorted(result)]

    def due_scheduled(self, now: float) -> list[StoredMessage]:
        due: list[StoredMessage] = []
        while self.scheduled_heap and self.scheduled_heap[0][0] <= now:
            _, seq = heapq.heappop(self.scheduled_heap)
            msg = self.messages.get(seq)
            if msg is not None and msg.state is State.SCHEDULED:
                due.append(msg)
        return due

    def expired_locks(self, now: float) -> list[StoredMessage]:
        expired: list[StoredMessage] = []
        while self.lock_heap and self.lock_heap[0][0] <= now:
            _, seq, token = heapq.heappop(self.lock_heap)
            msg = self.messages.get(seq)
            if msg is None or msg.state is not State.LOCKED or msg.lock_token != token:
                continue
            if msg.locked_until > now:  # renewed; a newer heap entry exists
                continue
            expired.append(msg)
        return expired

    def snapshot(self) -> list[BrokerMessage]:
        return [BrokerMessage.snapshot(m) for _, m in sorted(self.messages.items())]


class Topic:
    def __init__(self, name: str) -> None:
        self.name = name
        self.subscriptions: dict[str, MessageStore] = {}


def now() -> float:
    return time.time()
