"""The Service Bus test double (tests/servicebus_broker) driven by the REAL azure-servicebus SDK, sync and aio.

The double is not an emulator: these tests pin down that it answers the parts of the Service Bus AMQP
protocol the SDK uses, so that adapter tests built on it exercise real client code paths.
"""

from __future__ import annotations

import datetime
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

# No importorskip: a missing python-qpid-proton / azure-servicebus must fail loudly, not skip.
import pytest
from azure.servicebus import (
    NEXT_AVAILABLE_SESSION,
    ServiceBusClient,
    ServiceBusMessage,
    ServiceBusReceiveMode,
    ServiceBusSubQueue,
)
from azure.servicebus.aio import ServiceBusClient as AsyncServiceBusClient
from azure.servicebus.amqp import AmqpAnnotatedMessage, AmqpMessageBodyType
from azure.servicebus.exceptions import (
    MessageLockLostError,
    MessageSizeExceededError,
    MessagingEntityNotFoundError,
    ServiceBusAuthenticationError,
    ServiceBusError,
    SessionCannotBeLockedError,
)

from tests.servicebus_broker import ServiceBusTestBroker
from tests.servicebus_broker.broker import entity_path
from tests.servicebus_broker.codec import MalformedMessage, split_batch, split_sections

T = TypeVar("T")

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def broker() -> Iterator[ServiceBusTestBroker]:
    sb = ServiceBusTestBroker().start()
    try:
        yield sb
    finally:
        sb.stop()


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


_CLIENT_OPTIONS: dict[str, Any] = {"retry_total": 0}
# SDK quirk: every handler runs a keep-alive thread (coroutine in aio) that sleeps in 1 s steps, and
# close() joins it, which rounds each handler's lifetime up to a whole second. ``keep_alive=0`` turns it
# off; it is a per-handler option (the client does not pass it on), and receivers without prefetch
# always run it (every 5 s), so only senders get it here.
_NO_KEEP_ALIVE: dict[str, Any] = {"keep_alive": 0}


def _client(broker: ServiceBusTestBroker, **kwargs: Any) -> ServiceBusClient:
    return ServiceBusClient.from_connection_string(broker.connection_string, **{**_CLIENT_OPTIONS, **kwargs})


def _aclient(broker: ServiceBusTestBroker, **kwargs: Any) -> AsyncServiceBusClient:
    return AsyncServiceBusClient.from_connection_string(broker.connection_string, **{**_CLIENT_OPTIONS, **kwargs})


def _poll(predicate: Callable[[], T], timeout: float = 10.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.01)


def _body(msg: Any) -> bytes:
    return b"".join(msg.body)


def _receive_all(receiver: Any, count: int, timeout: float = 10.0) -> list[Any]:
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        received += receiver.receive_messages(max_message_count=count - len(received), max_wait_time=2)
    return received


async def _areceive_all(receiver: Any, count: int, timeout: float = 10.0) -> list[Any]:
    received: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(received) < count and time.monotonic() < deadline:
        received += await receiver.receive_messages(max_message_count=count - len(received), max_wait_time=2)
    return received


# -- pure helpers ---------------------------------------------------------------------------------


def test_entity_path_parsing() -> None:
    assert entity_path("amqps://127.0.0.1:5671/q1") == "q1"
    assert entity_path("q1/$management") == "q1/$management"
    assert entity_path("amqp://h/t/Subscriptions/s/$deadletterqueue") == "t/Subscriptions/s/$deadletterqueue"
    assert entity_path(None) == ""


def test_batch_detection_is_structural() -> None:
    from proton import Data, Described, ulong

    def section(code: int, value: Any) -> bytes:
        data = Data()
        data.put_object(Described(ulong(code), value))
        return bytes(data.encode())

    inner = [section(0x73, ["id-1"]) + section(0x75, b"one"), section(0x75, b"two")]
    envelope = split_sections(b"".join(section(0x75, m) for m in inner))
    batch = split_batch(envelope)
    assert batch is not None and [m.body for m in batch] == [[b"one"], [b"two"]]
    assert batch[0].message_id == "id-1"
    # Ordinary payloads (JSON, protobuf, random bytes) are not mistaken for a batch.
    for body in (b'{"specversion": "1.0"}', b"\x0a\x03abc", b"\x00", b"\x00Sw"):
        assert split_batch(split_sections(section(0x75, body))) is None
    with pytest.raises(MalformedMessage):
        split_sections(section(0x75, b"x") + section(0x73, ["late properties"]))


def test_connection_string_shape(broker: ServiceBusTestBroker) -> None:
    cs = broker.connection_string
    assert cs.startswith(f"Endpoint=sb://127.0.0.1:{broker.port}/;")
    assert "UseDevelopmentEmulator=true" in cs
    assert f"SharedAccessKey={broker.key}" in cs


# -- queues, sync -------------------------------------------------------------------------------


def test_send_receive_complete_sync(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue, lock_duration=5)
    before = datetime.datetime.now(datetime.UTC) - datetime.timedelta(seconds=1)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(
                ServiceBusMessage(
                    b'{"hello": "world"}',
                    message_id="m-1",
                    content_type="application/cloudevents+json",
                    correlation_id="c-1",
                    subject="greeting",
                    application_properties={"ce_type": "com.example.hello"},
                )
            )
        stored = broker.messages(queue)
        assert [m.message_id for m in stored] == ["m-1"]
        assert stored[0].body == b'{"hello": "world"}'
        assert stored[0].state == "available"
        with client.get_queue_receiver(queue) as receiver:
            (msg,) = _receive_all(receiver, 1)
            assert _body(msg) == b'{"hello": "world"}'
            assert msg.message_id == "m-1"
            assert msg.content_type == "application/cloudevents+json"
            assert msg.correlation_id == "c-1"
            assert msg.subject == "greeting"
            assert msg.application_properties == {b"ce_type": b"com.example.hello"}
            assert msg.sequence_number == 1
            assert msg.delivery_count == 0
            assert isinstance(msg.lock_token, uuid.UUID | str)
            assert msg.enqueued_time_utc is not None and msg.enqueued_time_utc >= before
            assert msg.locked_until_utc is not None and msg.locked_until_utc > msg.enqueued_time_utc
            assert broker.messages(queue)[0].state == "locked"
            receiver.complete_message(msg)
    assert _poll(lambda: broker.messages(queue) == [])


def test_batch_send_sync(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client, client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
        batch = sender.create_message_batch()
        for i in range(20):
            batch.add_message(ServiceBusMessage(f"batch-{i}".encode(), message_id=f"b{i}"))
        sender.send_messages(batch)
        sender.send_messages([ServiceBusMessage(f"list-{i}".encode(), message_id=f"l{i}") for i in range(10)])
    stored = broker.messages(queue)
    assert [m.message_id for m in stored] == [f"b{i}" for i in range(20)] + [f"l{i}" for i in range(10)]
    assert [m.body for m in stored][:2] == [b"batch-0", b"batch-1"]
    assert [m.sequence_number for m in stored] == list(range(1, 31))
    with _client(broker) as client, client.get_queue_receiver(queue) as receiver:
        got = _receive_all(receiver, 30)
        assert [_body(m) for m in got] == [m.body for m in stored]
        for msg in got:
            receiver.complete_message(msg)
    assert _poll(lambda: broker.messages(queue) == [])


def test_application_property_types_round_trip(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    props: dict[str | bytes, Any] = {
        "s": "text",
        "i": 42,
        "neg": -7,
        "max": 2**31 - 1,
        "t": True,
        "f": False,
        "raw": b"bytes-value",
        "fl": 1.5,
    }
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"\x00binary\xffbody", application_properties=props))
            # SDK quirk (uamqp parity): bytes property values are decoded as UTF-8 and sent as AMQP
            # strings, so non-UTF-8 bytes cannot be sent at all.
            with pytest.raises(UnicodeDecodeError):
                sender.send_messages(ServiceBusMessage(b"x", application_properties={"bad": b"\xff"}))
            # SDK quirk: a Python int is always encoded as a 32-bit AMQP int; larger values fail (the
            # ValueError surfaces wrapped in a ServiceBusError).
            with pytest.raises(ServiceBusError, match="int invalid"):
                sender.send_messages(ServiceBusMessage(b"x", application_properties={"big": 2**40}))
        stored = broker.messages(queue)[0]
        assert stored.application_properties == {**props, "raw": "bytes-value"}
        assert stored.body == b"\x00binary\xffbody"
        with client.get_queue_receiver(queue) as receiver:
            (msg,) = _receive_all(receiver, 1)
            got = msg.application_properties
            assert got[b"s"] == b"text"  # pyamqp hands strings (and keys) back as bytes
            assert got[b"raw"] == b"bytes-value"
            assert got[b"i"] == 42 and got[b"neg"] == -7 and got[b"max"] == 2**31 - 1
            assert got[b"t"] is True and got[b"f"] is False
            assert got[b"fl"] == 1.5
            assert _body(msg) == b"\x00binary\xffbody"
            receiver.complete_message(msg)


def test_body_sections_are_preserved(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(AmqpAnnotatedMessage(data_body=[b"part-1", b"part-2"]))
            sender.send_messages(AmqpAnnotatedMessage(value_body={"k": "v"}))
            # A batch whose single message has two data sections: the envelope is split, the inner
            # message keeps both sections.
            sender.send_messages([AmqpAnnotatedMessage(data_body=[b"in-batch-1", b"in-batch-2"])])
        stored = broker.messages(queue)
        assert stored[0].body_sections == [b"part-1", b"part-2"]
        assert stored[1].body == {"k": "v"}
        assert stored[2].body_sections == [b"in-batch-1", b"in-batch-2"]
        with client.get_queue_receiver(queue) as receiver:
            got = _receive_all(receiver, 3)
            assert list(got[0].body) == [b"part-1", b"part-2"]
            assert got[0].body_type == AmqpMessageBodyType.DATA
            assert got[1].body_type == AmqpMessageBodyType.VALUE
            assert got[1].body == {b"k": b"v"}
            assert list(got[2].body) == [b"in-batch-1", b"in-batch-2"]
            for msg in got:
                receiver.complete_message(msg)


def test_abandon_redelivers_with_incremented_delivery_count(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"again", message_id="a-1"))
        with client.get_queue_receiver(queue) as receiver:
            (first,) = _receive_all(receiver, 1)
            assert first.delivery_count == 0
            receiver.abandon_message(first)
            (second,) = _receive_all(receiver, 1)
            assert second.message_id == "a-1"
            assert second.delivery_count == 1
            assert second.sequence_number == first.sequence_number
            assert second.lock_token != first.lock_token
            receiver.complete_message(second)
    assert _poll(lambda: broker.messages(queue) == [])


def test_dead_letter_with_reason_then_read_from_dlq(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"poison", message_id="p-1", application_properties={"k": "v"}))
        with client.get_queue_receiver(queue) as receiver:
            (msg,) = _receive_all(receiver, 1)
            receiver.dead_letter_message(msg, reason="BadSchema", error_description="field x missing")
        assert _poll(lambda: len(broker.dead_letters(queue)) == 1)
        assert broker.messages(queue) == []
        dead = broker.dead_letters(queue)[0]
        assert (dead.dead_letter_reason, dead.dead_letter_description) == ("BadSchema", "field x missing")
        with client.get_queue_receiver(queue, sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            (dlm,) = _receive_all(dlq, 1)
            assert _body(dlm) == b"poison"
            assert dlm.message_id == "p-1"
            assert dlm.dead_letter_reason == "BadSchema"
            assert dlm.dead_letter_error_description == "field x missing"
            assert dlm.application_properties[b"k"] == b"v"
            dlq.complete_message(dlm)
    assert _poll(lambda: broker.dead_letters(queue) == [])


def test_max_delivery_count_dead_letters_automatically(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue, max_delivery_count=2)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"flaky"))
        with client.get_queue_receiver(queue) as receiver:
            for expected_count in (0, 1):
                (msg,) = _receive_all(receiver, 1)
                assert msg.delivery_count == expected_count
                receiver.abandon_message(msg)
        assert broker.messages(queue) == []
        dead = broker.dead_letters(queue)
        assert len(dead) == 1 and dead[0].dead_letter_reason == "MaxDeliveryCountExceeded"
        assert dead[0].delivery_count == 2


def test_lock_expiry_redelivers_and_late_settle_is_lock_lost(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue, lock_duration=0.5)  # the double takes sub-second locks; Azure's minimum is 5 s
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"slow consumer", message_id="e-1"))
        with client.get_queue_receiver(queue) as receiver:
            (first,) = _receive_all(receiver, 1)
            assert first.delivery_count == 0
            # No sleep: the next receive waits until the broker's lock expires and redelivers.
            (second,) = _receive_all(receiver, 1, timeout=5)
            assert second.message_id == "e-1"
            assert second.delivery_count == 1
            with pytest.raises(MessageLockLostError):
                receiver.complete_message(first)
            receiver.complete_message(second)
    assert _poll(lambda: broker.messages(queue) == [])


def test_renew_lock_keeps_the_message_locked(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue, lock_duration=0.5)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"long job"))
        with client.get_queue_receiver(queue) as receiver:
            (msg,) = _receive_all(receiver, 1)
            first_lock = msg.locked_until_utc
            assert first_lock is not None
            original_expiry = first_lock.timestamp()
            while time.time() < original_expiry + 0.3:  # keep renewing past the original expiry
                renewed = receiver.renew_message_lock(msg)
                assert renewed >= first_lock
                assert broker.messages(queue)[0].state == "locked"
                time.sleep(0.1)
            assert msg.locked_until_utc is not None and msg.locked_until_utc > first_lock
            receiver.complete_message(msg)
    assert _poll(lambda: broker.messages(queue) == [])


def test_peek_does_not_lock(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages([ServiceBusMessage(f"peek-{i}".encode(), message_id=f"pk{i}") for i in range(3)])
        with client.get_queue_receiver(queue) as receiver:
            peeked = receiver.peek_messages(max_message_count=5)
            assert [m.message_id for m in peeked] == ["pk0", "pk1", "pk2"]
            assert [m.sequence_number for m in peeked] == [1, 2, 3]
            assert [_body(m) for m in peeked] == [b"peek-0", b"peek-1", b"peek-2"]
            assert receiver.peek_messages(max_message_count=5, sequence_number=3)[0].message_id == "pk2"
            assert receiver.peek_messages(max_message_count=5, sequence_number=10) == []
            assert {m.state for m in broker.messages(queue)} == {"available"}
            got = _receive_all(receiver, 3)
            assert [m.message_id for m in got] == ["pk0", "pk1", "pk2"]
            for msg in got:
                receiver.complete_message(msg)


def test_receive_and_delete_mode(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages([ServiceBusMessage(b"x"), ServiceBusMessage(b"y")])
        with client.get_queue_receiver(queue, receive_mode=ServiceBusReceiveMode.RECEIVE_AND_DELETE) as receiver:
            got = _receive_all(receiver, 2)
            assert [_body(m) for m in got] == [b"x", b"y"]
    assert broker.messages(queue) == []


def test_defer_and_receive_deferred(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"later"))
        with client.get_queue_receiver(queue) as receiver:
            (msg,) = _receive_all(receiver, 1)
            receiver.defer_message(msg)
            assert _poll(lambda: broker.messages(queue)[0].state == "deferred")
            (deferred,) = receiver.receive_deferred_messages([msg.sequence_number])
            assert _body(deferred) == b"later"
            receiver.complete_message(deferred)
    assert _poll(lambda: broker.messages(queue) == [])


def test_scheduled_message_appears_at_its_time(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            at = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=0.5)
            (seq,) = sender.schedule_messages(ServiceBusMessage(b"tick"), at)
            assert broker.messages(queue)[0].state == "scheduled"
            cancelled = sender.schedule_messages(ServiceBusMessage(b"never"), at)
            sender.cancel_scheduled_messages(cancelled)
        with client.get_queue_receiver(queue) as receiver:
            (msg,) = _receive_all(receiver, 1, timeout=5)
            assert msg.sequence_number == seq and _body(msg) == b"tick"
            assert time.time() >= at.timestamp() - 0.05
            receiver.complete_message(msg)


# -- topics -------------------------------------------------------------------------------------


def test_topic_fans_out_to_every_subscription(broker: ServiceBusTestBroker) -> None:
    topic = _name("t")
    broker.create_topic(topic)
    broker.create_subscription(topic, "audit")
    broker.create_subscription(topic, "billing")
    with _client(broker) as client:
        with client.get_topic_sender(topic, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"one", message_id="1"))
            sender.send_messages(
                [ServiceBusMessage(b"two", message_id="2"), ServiceBusMessage(b"three", message_id="3")]
            )
        for sub in ("audit", "billing"):
            assert [m.message_id for m in broker.messages(f"{topic}/subscriptions/{sub}")] == ["1", "2", "3"]
            with client.get_subscription_receiver(topic, sub) as receiver:
                got = _receive_all(receiver, 3)
                assert [_body(m) for m in got] == [b"one", b"two", b"three"]
                for msg in got:
                    receiver.complete_message(msg)
    assert broker.messages(f"{topic}/subscriptions/audit") == []
    assert broker.messages(f"{topic}/subscriptions/billing") == []


# -- sessions -----------------------------------------------------------------------------------


def test_sessions_keep_per_session_order(broker: ServiceBusTestBroker) -> None:
    queue = _name("qs")
    broker.create_queue(queue, requires_session=True)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages([ServiceBusMessage(f"a{i}".encode(), session_id="A") for i in range(3)])
            for i in range(3):
                sender.send_messages(ServiceBusMessage(f"b{i}".encode(), session_id="B"))
                sender.send_messages(ServiceBusMessage(f"a{i + 3}".encode(), session_id="A"))
        with client.get_queue_receiver(queue, session_id="B") as receiver:
            assert receiver.session.session_id == "B"
            got = _receive_all(receiver, 3)
            assert [_body(m) for m in got] == [b"b0", b"b1", b"b2"]
            assert {m.session_id for m in got} == {"B"}
            other = client.get_queue_receiver(queue, session_id="B")
            # max_wait_time also bounds the link open (~0.5 s: the SDK polls one frame per 50 ms while
            # opening), so it must not be short here or the open times out before the refusal arrives.
            with pytest.raises(SessionCannotBeLockedError):
                other.receive_messages(max_message_count=1, max_wait_time=5)
            other.close()
            for msg in got:
                receiver.complete_message(msg)
        with client.get_queue_receiver(queue, session_id=NEXT_AVAILABLE_SESSION, max_wait_time=5) as receiver:
            assert receiver.session.session_id == "A"
            got = _receive_all(receiver, 6)
            assert [_body(m) for m in got] == [f"a{i}".encode() for i in range(6)]
            for msg in got:
                receiver.complete_message(msg)
    assert broker.messages(queue) == []


def test_session_state_and_lock_renewal(broker: ServiceBusTestBroker) -> None:
    queue = _name("qs")
    broker.create_queue(queue, requires_session=True, lock_duration=5)
    with _client(broker) as client:
        with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            sender.send_messages(ServiceBusMessage(b"s", session_id="S"))
        with client.get_queue_receiver(queue, session_id="S") as receiver:
            session = receiver.session
            assert session.get_state() is None
            session.set_state(b"checkpoint-1")
            assert session.get_state() == b"checkpoint-1"
            before = session.locked_until_utc
            assert before is not None
            assert session.renew_lock() >= before
            (msg,) = _receive_all(receiver, 1)
            receiver.complete_message(msg)


# -- errors -------------------------------------------------------------------------------------


def test_wrong_key_is_an_authentication_error(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    bad = broker.connection_string_for(key="not-the-key")
    with ServiceBusClient.from_connection_string(bad, retry_total=0) as client:
        sender = client.get_queue_sender(queue, **_NO_KEEP_ALIVE)
        with pytest.raises(ServiceBusAuthenticationError, match="client-error"):
            sender.send_messages(ServiceBusMessage(b"x"))
        sender.close()
    assert broker.messages(queue) == []


def test_unknown_queue_is_entity_not_found(broker: ServiceBusTestBroker) -> None:
    with _client(broker) as client:
        sender = client.get_queue_sender("no-such-queue", **_NO_KEEP_ALIVE)
        with pytest.raises(MessagingEntityNotFoundError, match="could not be found"):
            sender.send_messages(ServiceBusMessage(b"x"))
        sender.close()
        receiver = client.get_queue_receiver("no-such-queue")
        with pytest.raises(MessagingEntityNotFoundError):
            receiver.receive_messages(max_message_count=1, max_wait_time=5)
        receiver.close()
        with pytest.raises(MessagingEntityNotFoundError):  # a subscription of a missing topic
            receiver = client.get_subscription_receiver("no-topic", "no-sub")
            receiver.peek_messages()


def test_oversized_message_is_rejected(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    with _client(broker) as client, client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
        sender.send_messages(ServiceBusMessage(b"a" * (200 * 1024)))
        with pytest.raises(MessageSizeExceededError):
            sender.send_messages(ServiceBusMessage(b"b" * (300 * 1024)))
        with pytest.raises(MessageSizeExceededError):  # the SDK itself refuses an over-full batch
            sender.send_messages([ServiceBusMessage(b"c" * (100 * 1024)) for _ in range(3)])
        sender.send_messages(ServiceBusMessage(b"still usable"))
    assert [len(m.body) for m in broker.messages(queue)] == [200 * 1024, len(b"still usable")]


# -- aio ----------------------------------------------------------------------------------------


async def test_send_receive_complete_aio(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    async with _aclient(broker) as client:
        async with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            await sender.send_messages(
                ServiceBusMessage(
                    b"async",
                    message_id="x-1",
                    content_type="text/plain",
                    application_properties={"n": 1, "ok": True, "b": b"\x01", "s": "v"},
                )
            )
            batch = await sender.create_message_batch()
            for i in range(5):
                batch.add_message(ServiceBusMessage(f"ab{i}".encode()))
            await sender.send_messages(batch)
        async with client.get_queue_receiver(queue) as receiver:
            got = await _areceive_all(receiver, 6)
            assert got[0].message_id == "x-1" and got[0].content_type == "text/plain"
            assert got[0].application_properties == {b"n": 1, b"ok": True, b"b": b"\x01", b"s": b"v"}
            assert [_body(m) for m in got] == [b"async"] + [f"ab{i}".encode() for i in range(5)]
            await receiver.abandon_message(got[1])
            (again,) = await _areceive_all(receiver, 1)
            assert _body(again) == b"ab0" and again.delivery_count == 1
            for msg in [got[0], *got[2:], again]:
                await receiver.complete_message(msg)
    assert _poll(lambda: broker.messages(queue) == [])


async def test_topic_fan_out_and_dead_letter_aio(broker: ServiceBusTestBroker) -> None:
    topic = _name("t")
    broker.create_topic(topic)
    broker.create_subscription(topic, "one")
    broker.create_subscription(topic, "two")
    async with _aclient(broker) as client:
        async with client.get_topic_sender(topic, **_NO_KEEP_ALIVE) as sender:
            await sender.send_messages([ServiceBusMessage(b"e1"), ServiceBusMessage(b"e2")])
        async with client.get_subscription_receiver(topic, "one") as receiver:
            got = await _areceive_all(receiver, 2)
            assert [_body(m) for m in got] == [b"e1", b"e2"]
            await receiver.complete_message(got[0])
            await receiver.dead_letter_message(got[1], reason="why", error_description="because")
        async with client.get_subscription_receiver(topic, "two") as receiver:
            peeked = await receiver.peek_messages(max_message_count=10)
            assert [_body(m) for m in peeked] == [b"e1", b"e2"]
            got = await _areceive_all(receiver, 2)
            for msg in got:
                await receiver.renew_message_lock(msg)
                await receiver.complete_message(msg)
        async with client.get_subscription_receiver(topic, "one", sub_queue=ServiceBusSubQueue.DEAD_LETTER) as dlq:
            (dead,) = await _areceive_all(dlq, 1)
            assert dead.dead_letter_reason == "why" and _body(dead) == b"e2"
            await dlq.complete_message(dead)


async def test_sessions_aio(broker: ServiceBusTestBroker) -> None:
    queue = _name("qs")
    broker.create_queue(queue, requires_session=True)
    async with _aclient(broker) as client:
        async with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            for i in range(4):
                await sender.send_messages(ServiceBusMessage(f"{i}".encode(), session_id=f"s{i % 2}"))
        for session in ("s1", "s0"):
            async with client.get_queue_receiver(queue, session_id=session) as receiver:
                got = await _areceive_all(receiver, 2)
                assert [m.session_id for m in got] == [session, session]
                assert [m.sequence_number for m in got] == sorted(m.sequence_number for m in got)
                for msg in got:
                    await receiver.complete_message(msg)
    assert broker.messages(queue) == []


async def test_errors_aio(broker: ServiceBusTestBroker) -> None:
    queue = _name("q")
    broker.create_queue(queue)
    bad = broker.connection_string_for(key="wrong")
    async with AsyncServiceBusClient.from_connection_string(bad, retry_total=0) as client:
        sender = client.get_queue_sender(queue, **_NO_KEEP_ALIVE)
        with pytest.raises(ServiceBusAuthenticationError):
            await sender.send_messages(ServiceBusMessage(b"x"))
        await sender.close()
    async with _aclient(broker) as client:
        missing = client.get_queue_sender("missing", **_NO_KEEP_ALIVE)
        with pytest.raises(MessagingEntityNotFoundError):
            await missing.send_messages(ServiceBusMessage(b"x"))
        await missing.close()
        async with client.get_queue_sender(queue, **_NO_KEEP_ALIVE) as sender:
            with pytest.raises(MessageSizeExceededError):
                await sender.send_messages(ServiceBusMessage(b"z" * (257 * 1024)))
