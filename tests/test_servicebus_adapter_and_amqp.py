"""The CloudEvents AMQP binding (`umcef.fabric.bindings.amqp`): the spec's mapping, native AMQP types,
validation, round trips, and interop with the official SDK's `cloudevents.core.bindings.amqp`, both ways.

The last section follows the binding's messages over the wire: through the real azure-servicebus SDK
and the Service Bus test double (`tests/servicebus_broker`), via the adapter (`umcef.adapters.servicebus`),
checking the AMQP types that actually travel, the size the broker counts, and the adapter behaviour the
shared conformance suite does not reach (dead-lettering, topics, sessions without a key, credentials).

The SDK comparison reuses `tests/test_interop_sdk.py`'s normalisation helper (`assert_same`) and its
generated events, so the AMQP binding is held to the standard of the HTTP one.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import amqp as sdk_amqp
from cloudevents.core.v1.event import CloudEvent as SdkEvent
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from proton import Data

from tests.brokers import eventually
from tests.roundtrip import canonical
from tests.roundtrip import spec_example as ev
from tests.servicebus_broker import ServiceBusTestBroker
from tests.test_interop_sdk import CASES, SDK_JSON, assert_same, events, to_sdk
from umcef.adapters.contract import Delivery, NotFound, Rejected, Transient, Unauthorized
from umcef.adapters.servicebus import (
    ServiceBusAdapter,
    connection_string_for,
    from_url,
    namespace_env_var,
)
from umcef.fabric.bindings import amqp
from umcef.fabric.bindings.amqp import AmqpMessage
from umcef.fabric.errors import InvalidAttribute, MalformedBody, UnsupportedMediaType
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.limits import Limits

pure_twin = pytest.mark.pure_twin  # codec-facing tests: CI runs them again on the pure-Python validator
MODES = ["binary", "structured"]


def encode(event: Event, mode: str) -> AmqpMessage:
    return amqp.to_binary(event) if mode == "binary" else amqp.to_structured(event)


# ---------------------------------------------------------------------------------------------------
# The spec's mapping, spelled out.


@pure_twin
def test_binary_mode_matches_the_spec_example() -> None:
    event = ev({"a": 1}, datacontenttype="application/json; charset=utf-8", partitionkey="order-7")
    msg = amqp.to_binary(event)
    assert msg.application_properties == {
        "cloudEvents_specversion": "1.0",
        "cloudEvents_id": "1234-1234-1234",
        "cloudEvents_source": "/mycontext/subcontext",
        "cloudEvents_type": "com.example.someevent",
        "cloudEvents_time": datetime(2018, 4, 5, 3, 56, 24, tzinfo=UTC),  # native AMQP timestamp: lossless here
        "cloudEvents_partitionkey": "order-7",  # the secondary mapping (SessionId) keeps the primary one
    }
    assert msg.content_type == "application/json; charset=utf-8"
    assert msg.body == b'{"a":1}'
    assert (msg.message_id, msg.session_id) == ("1234-1234-1234", "order-7")
    assert msg.properties == {}
    assert amqp.from_message(msg) == Event({**event.attributes}, b'{"a":1}')


@pure_twin
def test_native_types_and_binary_as_its_canonical_string() -> None:
    event = ev(b"\x00\xff", datacontenttype="application/octet-stream", flag=True, off=False, n=-(2**31),
               m=2**31 - 1, blob=b"\x00\x01\xfe\xff", empty=b"", text="ünï 😀", link="urn:x:y")
    props = amqp.to_binary(event).application_properties
    assert props["cloudEvents_flag"] is True and props["cloudEvents_off"] is False
    assert (props["cloudEvents_n"], props["cloudEvents_m"]) == (-(2**31), 2**31 - 1)
    # Binary goes as base64 (the spec's canonical string): azure-servicebus cannot carry non-UTF-8 bytes.
    assert (props["cloudEvents_blob"], props["cloudEvents_empty"]) == ("AAH+/w==", "")
    assert props["cloudEvents_text"] == "ünï 😀"
    decoded = amqp.from_message(amqp.to_binary(event))
    assert decoded.attributes["flag"] is True and decoded.attributes["n"] == -(2**31)
    assert decoded.attributes["blob"] == "AAH+/w=="  # the type is lost, the value is not
    assert canonical(decoded) == canonical(event)
    assert decoded.data == b"\x00\xff"


@pure_twin
def test_native_binary_option_sends_amqp_binary() -> None:
    event = ev(None, blob=b"\x00\x01\xfe\xff")
    msg = amqp.to_binary(event, native_binary=True)
    assert msg.application_properties["cloudEvents_blob"] == b"\x00\x01\xfe\xff"
    assert amqp.from_binary(msg) == event  # exact, types included


@pytest.mark.parametrize(("text", "native"), [
    ("2018-04-05T03:56:24Z", datetime(2018, 4, 5, 3, 56, 24, tzinfo=UTC)),
    ("2018-04-05T03:56:24.120Z", datetime(2018, 4, 5, 3, 56, 24, 120000, tzinfo=UTC)),
    ("0099-01-01T00:00:00Z", datetime(99, 1, 1, tzinfo=UTC)),
    ("2018-04-05T03:56:24.000Z", None),      # renders back without the fraction
    ("2018-04-05T03:56:24.12Z", None),       # renders back as .120
    ("2018-04-05T03:56:24.123456Z", None),   # microseconds: an AMQP timestamp holds milliseconds
    ("2018-04-05T03:56:24+02:00", None),     # the offset would be lost
    ("2018-04-05T03:56:24z", None),          # lower-case z renders back upper-case
    ("2018-04-05t03:56:24Z", None),
    ("2016-12-31T23:59:60Z", None),          # a leap second: no datetime holds it
])  # fmt: skip
@pure_twin
def test_time_is_a_native_timestamp_only_when_lossless(text: str, native: datetime | None) -> None:
    assert amqp.native_timestamp(text) == native
    msg = amqp.to_binary(ev(time=text))
    assert msg.application_properties["cloudEvents_time"] == (native or text)
    assert amqp.from_binary(msg).attributes["time"] == text
    assert amqp.to_binary(ev(time=text), native_time=False).application_properties["cloudEvents_time"] == text


@settings(max_examples=500, deadline=None)
@given(stamp=st.datetimes(min_value=datetime(1, 1, 1), max_value=datetime(9999, 12, 31, 23, 59, 59)))
@pure_twin
def test_timestamps_render_and_parse_back_exactly(stamp: datetime) -> None:
    stamp = stamp.replace(microsecond=stamp.microsecond // 1000 * 1000, tzinfo=UTC)
    text = amqp.render_timestamp(stamp)
    assert amqp.native_timestamp(text) == stamp
    millis = (stamp - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
    assert amqp.timestamp_from_millis(millis) == stamp


@pure_twin
def test_decoding_accepts_both_prefixes_and_native_values() -> None:
    props: dict[str, Any] = {
        "cloudEvents:specversion": "1.0", "cloudEvents:id": "1", "cloudEvents:source": "/s",
        "cloudEvents:type": "t",
        "cloudEvents:time": 1522900584000,  # an integer for time: AMQP timestamp milliseconds (the SDK's form)
        "cloudEvents_stamp": datetime(2020, 1, 1, 12, tzinfo=UTC),  # any timestamp: its RFC 3339 string
        "cloudEvents_ref": uuid.UUID(int=1),  # AMQP uuid has no CloudEvents type: its canonical string
        "cloudEvents_raw": bytearray(b"\x01"),
        "Diagnostic-Id": "00-abc", "x-custom": 7,  # the message's own properties are not attributes
    }  # fmt: skip
    event = amqp.from_message(AmqpMessage({}, props, b"", None))
    assert event.attributes == {
        "specversion": "1.0", "id": "1", "source": "/s", "type": "t", "time": "2018-04-05T03:56:24Z",
        "stamp": "2020-01-01T12:00:00Z", "ref": "00000000-0000-0000-0000-000000000001", "raw": b"\x01",
    }  # fmt: skip
    assert event.data is None  # an empty body is no data


@pytest.mark.parametrize(("props", "content_type", "attribute"), [
    ({"cloudEvents_id": "1", "cloudEvents:id": "2"}, None, "id"),              # the same attribute twice
    ({"cloudEvents_n": 1.5}, None, "n"),                                        # no CloudEvents type
    ({"cloudEvents_n": 2**40}, None, "n"),                                      # Integer is 32-bit
    ({"cloudEvents_time": 10**20}, None, "time"),                               # beyond any timestamp
    ({"cloudEvents_datacontenttype": "text/plain"}, "application/json", "datacontenttype"),
    ({"cloudEvents_Type": "t"}, None, "Type"),                                  # names are lower-case
    ({"cloudEvents_source": "not a uri"}, None, "source"),
])  # fmt: skip
@pure_twin
def test_invalid_binary_messages_name_the_attribute(props: dict[str, Any], content_type: str | None,
                                                    attribute: str) -> None:
    base = {"cloudEvents_specversion": "1.0", "cloudEvents_id": "1", "cloudEvents_source": "/s",
            "cloudEvents_type": "t"}  # fmt: skip
    with pytest.raises(InvalidAttribute) as caught:
        amqp.from_message(AmqpMessage({}, {**base, **props}, b"", content_type))
    assert caught.value.attribute == attribute


@pure_twin
def test_datacontenttype_property_that_agrees_is_accepted() -> None:
    props = {"cloudEvents_specversion": "1.0", "cloudEvents_id": "1", "cloudEvents_source": "/s",
             "cloudEvents_type": "t", "cloudEvents_datacontenttype": "text/plain"}  # fmt: skip
    assert amqp.from_binary(AmqpMessage({}, props, b"x", "text/plain")).datacontenttype == "text/plain"
    assert amqp.from_binary(AmqpMessage({}, props, b"x")).datacontenttype == "text/plain"
    # The official SDK's message shape: content-type among the AMQP properties.
    del props["cloudEvents_datacontenttype"]
    sdk_shaped = AmqpMessage({"content-type": "text/csv"}, props, b"x")
    assert amqp.from_binary(sdk_shaped).datacontenttype == "text/csv"


@pure_twin
def test_structured_mode_and_detection() -> None:
    event = ev({"k": "ü"}, datacontenttype="application/json", partitionkey="p", blob=b"\x01")
    msg = amqp.to_structured(event)
    assert msg.content_type == "application/cloudevents+json"
    assert msg.application_properties == {}
    assert (msg.message_id, msg.session_id) == ("1234-1234-1234", "p")
    assert json.loads(msg.body)["blob"] == "AQ=="
    assert canonical(amqp.from_message(msg), "structured") == canonical(event, "structured")
    for content_type in ("Application/CloudEvents+JSON", "application/cloudevents+json; charset=UTF-8"):
        same = AmqpMessage({}, {}, msg.body, content_type)
        assert amqp.is_structured(same)
        assert canonical(amqp.from_message(same), "structured") == canonical(event, "structured")
    with pytest.raises(UnsupportedMediaType, match="no batch mode"):
        amqp.from_message(AmqpMessage({}, {}, b"[]", "application/cloudevents-batch+json"))
    with pytest.raises(MalformedBody):
        amqp.from_message(AmqpMessage({}, {}, b"", "application/cloudevents+json"))
    with pytest.raises(MalformedBody):
        amqp.from_message(AmqpMessage({}, {}, b"{not json", "application/cloudevents+json"))


@pure_twin
def test_a_message_that_is_no_cloudevent_says_so() -> None:
    with pytest.raises(UnsupportedMediaType, match="not a CloudEvent"):
        amqp.from_message(AmqpMessage({}, {"Diagnostic-Id": "x"}, b"hello", "text/plain"))


@pure_twin
def test_message_and_session_ids_respect_service_bus_limits() -> None:
    long_id, long_key = "i" * 129, "k" * 200
    msg = amqp.to_binary(ev(id=long_id, partitionkey=long_key))
    assert msg.message_id is not None and msg.session_id is not None
    assert msg.message_id.startswith("sha256:") and len(msg.message_id) <= amqp.MAX_ID_LENGTH
    assert msg.session_id != msg.message_id and len(msg.session_id) <= amqp.MAX_ID_LENGTH
    assert amqp.to_binary(ev(id=long_id, partitionkey=long_key)).session_id == msg.session_id  # stable
    assert amqp.from_binary(msg).attributes["id"] == long_id  # the attribute itself is untouched
    assert amqp.to_binary(ev(id="i" * 128)).message_id == "i" * 128
    assert amqp.to_binary(ev(partitionkey=42)).session_id == "42"
    assert amqp.to_binary(ev()).session_id is None


@pure_twin
def test_limits_apply_on_decode() -> None:
    msg = amqp.to_binary(ev(a="1", b="2"))
    with pytest.raises(Exception, match="attributes"):
        amqp.from_message(msg, Limits(max_attributes=5))
    assert amqp.from_message(msg, Limits(max_attributes=7)).attributes["b"] == "2"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pure_twin
def test_spec_cases_round_trip(case: str, mode: str) -> None:
    event = CASES[case]
    assert canonical(amqp.from_message(encode(event, mode)), mode) == canonical(event, mode)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events(), mode=st.sampled_from(MODES))
@pure_twin
def test_generated_events_round_trip(event: Event, mode: str) -> None:
    decoded = amqp.from_message(encode(event, mode))
    assert canonical(decoded, mode) == canonical(event, mode)
    if mode == "binary":  # native types survive: everything but Binary, which travels as its string
        exact = amqp.from_message(amqp.to_binary(event, native_binary=True))
        assert exact.attributes == event.attributes


# ---------------------------------------------------------------------------------------------------
# Interop with the official SDK (cloudevents 2.2.0, `cloudevents.core.bindings.amqp`), both ways.


def ours_to_sdk_message(msg: AmqpMessage) -> sdk_amqp.AMQPMessage:
    """Our message as the SDK's dataclass: content-type among the properties; a timestamp as the SDK
    itself writes one (integer milliseconds since the epoch)."""
    properties = {"content-type": msg.content_type} if msg.content_type is not None else {}
    app: dict[str, Any] = {}
    for name, value in msg.application_properties.items():
        if isinstance(value, datetime):
            value = (value - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        app[name] = value
    return sdk_amqp.AMQPMessage(properties, app, msg.body)


def sdk_to_ours_message(msg: sdk_amqp.AMQPMessage) -> AmqpMessage:
    return AmqpMessage(dict(msg.properties), dict(msg.application_properties), msg.application_data)


def to_sdk_amqp(event: Event, mode: str) -> BaseCloudEvent:
    """The SDK event a user would build. The SDK's AMQP binary mode carries bool and bytes natively (its
    HTTP binary mode does not, hence `to_sdk`'s string forms there)."""
    if mode == "structured":
        return to_sdk(event, mode)
    attrs = {k: datetime.fromisoformat(v.upper()) if k == "time" else v for k, v in event.attributes.items()}
    return SdkEvent(attrs, event.data)


def sdk_amqp_round_trips(event: BaseCloudEvent, mode: str) -> bool:
    """Whether the SDK reads its own message back as its event. Its binary mode writes `time` as whole
    milliseconds (no microseconds, no UTC offset), so often it does not."""
    message = sdk_amqp.to_binary(event, SDK_JSON) if mode == "binary" else sdk_amqp.to_structured(event, SDK_JSON)
    again = sdk_amqp.from_amqp(message, SDK_JSON)
    try:
        assert_same_sdk(again, event, binary=mode == "binary")
    except AssertionError:
        return False
    return True


def assert_same_sdk(left: BaseCloudEvent, right: BaseCloudEvent, *, binary: bool) -> None:
    attrs = {k: v.isoformat() if isinstance(v, datetime) else v for k, v in left.get_attributes().items()}
    assert_same(Event(attrs, left.get_data()), right, binary=binary)


def sdk_reads(message: sdk_amqp.AMQPMessage) -> BaseCloudEvent:
    """The SDK's reading of a message, minus one float artefact: it turns integer milliseconds into a
    datetime through `ms / 1000.0`, which can land a microsecond off (…00.000999 for …00.001); the
    message said whole milliseconds, so its `time` is rounded back to them (see the quirk test)."""
    event = sdk_amqp.from_amqp(message, SDK_JSON)
    if not isinstance(message.application_properties.get("cloudEvents_time"), int):
        return event
    attrs = dict(event.get_attributes())
    stamp = attrs["time"]
    attrs["time"] = stamp.replace(microsecond=0) + timedelta(milliseconds=round(stamp.microsecond / 1000))
    return SdkEvent(attrs, event.get_data())


def check_both_ways(event: Event, mode: str) -> None:
    binary = mode == "binary"
    # ours → SDK
    assert_same(event, sdk_reads(ours_to_sdk_message(encode(event, mode))), binary=binary)
    # SDK → ours: we read the SDK's message as the SDK itself reads it
    original = to_sdk_amqp(event, mode)
    message = sdk_amqp.to_binary(original, SDK_JSON) if binary else sdk_amqp.to_structured(original, SDK_JSON)
    decoded = amqp.from_message(sdk_to_ours_message(message))
    assert_same(decoded, sdk_reads(message), binary=binary)
    if sdk_amqp_round_trips(original, mode):
        assert_same(decoded, original, binary=binary)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", list(CASES))
@pure_twin
def test_sdk_interop_spec_cases(case: str, mode: str) -> None:
    check_both_ways(CASES[case], mode)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(event=events(), mode=st.sampled_from(MODES))
@pure_twin
def test_sdk_interop_generated_events(event: Event, mode: str) -> None:
    check_both_ways(event, mode)


@pure_twin
def test_sdk_quirk_time_loses_microseconds_and_offset_in_binary_mode() -> None:
    """The SDK writes `time` as integer milliseconds: ours keeps "…53.589123+01:00" exactly (as a string)."""
    event = ev(time="2025-03-14T09:26:53.589123+01:00")
    assert amqp.from_message(amqp.to_binary(event)).attributes["time"] == event.attributes["time"]
    message = sdk_amqp.to_binary(to_sdk_amqp(event, "binary"), SDK_JSON)
    assert message.application_properties["cloudEvents_time"] == 1741940813589
    assert amqp.from_message(sdk_to_ours_message(message)).attributes["time"] == "2025-03-14T08:26:53.589Z"


@pure_twin
def test_sdk_quirk_integer_milliseconds_read_through_a_float() -> None:
    message = sdk_amqp.AMQPMessage({}, {"cloudEvents_specversion": "1.0", "cloudEvents_id": "1",
                                        "cloudEvents_source": "/s", "cloudEvents_type": "t",
                                        "cloudEvents_time": -8614944059999}, b"")  # fmt: skip
    assert sdk_amqp.from_amqp(message, SDK_JSON).get_attributes()["time"].microsecond == 999
    assert amqp.from_message(sdk_to_ours_message(message)).attributes["time"] == "1696-12-31T23:59:00.001Z"


@pure_twin
def test_sdk_reads_native_binary_and_we_read_its_bytes() -> None:
    event = ev(None, blob=b"\x00\xff")
    sdk_event = sdk_amqp.from_amqp(ours_to_sdk_message(amqp.to_binary(event, native_binary=True)), SDK_JSON)
    assert sdk_event.get_attributes()["blob"] == b"\x00\xff"
    message = sdk_amqp.to_binary(to_sdk_amqp(event, "binary"), SDK_JSON)
    assert amqp.from_message(sdk_to_ours_message(message)).attributes["blob"] == b"\x00\xff"


# ---------------------------------------------------------------------------------------------------
# On the wire: the adapter, the real azure-servicebus SDK and the Service Bus test double.


@pytest.fixture(scope="module")
def broker() -> Iterator[ServiceBusTestBroker]:
    sb = ServiceBusTestBroker().start()
    try:
        yield sb
    finally:
        sb.stop()


def queue(broker: ServiceBusTestBroker, **kwargs: Any) -> str:
    name = f"amqp-{uuid.uuid4().hex[:10]}"
    broker.create_queue(name, lock_duration=kwargs.pop("lock_duration", 2), **kwargs)
    return name


def adapter(broker: ServiceBusTestBroker, entity: str, **options: Any) -> ServiceBusAdapter:
    options.setdefault("connection_string", broker.connection_string)
    return from_url(f"servicebus://{broker.namespace}/{entity}", **options)


class Consumer:
    def __init__(self, source: ServiceBusAdapter, behaviour: Any = None) -> None:
        self.source = source
        self.got: list[Delivery] = []
        self.behaviour = behaviour
        self.task = asyncio.create_task(source.consume(self.handle, max_in_flight=8))

    async def handle(self, delivery: Delivery) -> None:
        self.got.append(delivery)
        if self.behaviour is not None:
            await self.behaviour(delivery)

    async def stop(self) -> None:
        await self.source.stop_consuming()
        await asyncio.wait_for(self.task, 20)


@pytest.fixture
async def closing() -> AsyncIterator[list[ServiceBusAdapter]]:
    opened: list[ServiceBusAdapter] = []
    yield opened
    await asyncio.gather(*(a.close() for a in opened))


def stored(broker: ServiceBusTestBroker, entity: str) -> list[Any]:
    """The double's parsed messages of a queue (read-only peek at its state: raw sections and sizes)."""
    store = broker._core.resolve_store(entity)
    assert store is not None
    return [m.parsed for _, m in sorted(store.messages.items())]


def wire_types(raw: bytes) -> dict[str, str]:
    """Application property name → AMQP type name, decoded from the section's bytes with proton."""
    data = Data()
    data.decode(raw)
    data.rewind()
    data.next()
    data.enter()  # described: descriptor, then the map
    data.next()
    data.next()
    data.enter()
    names = {getattr(Data, n): n for n in dir(Data) if n.isupper()}
    types: dict[str, str] = {}
    while data.next():
        key = data.get_string()
        data.next()
        types[key] = names[data.type()]
    return types


async def test_native_types_travel_through_the_sdk(broker: ServiceBusTestBroker,
                                                   closing: list[ServiceBusAdapter]) -> None:
    name = queue(broker)
    sink = adapter(broker, name)
    closing.append(sink)
    event = ev(b"\x00\x01", datacontenttype="application/octet-stream", flag=True, n=-5, big=2**31 - 1,
               blob=b"\xff\x00", note="ü", partitionkey="k1")
    micro = ev(None, id="2", time="2018-04-05T03:56:24.123456+02:00")
    assert all(o.ok for o in await sink.publish([event, micro]))
    first, second = stored(broker, name)
    assert first.application_properties_raw is not None
    assert wire_types(first.application_properties_raw) == {
        "cloudEvents_specversion": "STRING", "cloudEvents_id": "STRING", "cloudEvents_source": "STRING",
        "cloudEvents_type": "STRING", "cloudEvents_time": "TIMESTAMP", "cloudEvents_flag": "BOOL",
        "cloudEvents_n": "LONG", "cloudEvents_big": "LONG", "cloudEvents_blob": "STRING",
        "cloudEvents_note": "STRING", "cloudEvents_partitionkey": "STRING",
    }  # fmt: skip
    assert wire_types(second.application_properties_raw)["cloudEvents_time"] == "STRING"
    assert (first.message_id, first.session_id, first.content_type) == ("1234-1234-1234", "k1",
                                                                        "application/octet-stream")
    # The size the adapter checks against its limit is the size of the message the broker received.
    assert [p.encoded_size for p in (first, second)] == [sink.encoded_size(event), sink.encoded_size(micro)]
    source = adapter(broker, name)
    closing.append(source)
    consumer = Consumer(source)
    await eventually(lambda: len(consumer.got) == 2, 15)
    await consumer.stop()
    got = {d.event.id: d.event for d in consumer.got}
    assert got["1234-1234-1234"].attributes == {**event.attributes, "blob": "/wA="}  # types kept, bar Binary
    assert got["2"] == micro
    assert [d.attempt for d in consumer.got] == [1, 1]


async def test_events_from_the_official_sdk_are_consumed(broker: ServiceBusTestBroker,
                                                         closing: list[ServiceBusAdapter]) -> None:
    from azure.servicebus import ServiceBusMessage
    from azure.servicebus.aio import ServiceBusClient

    name = queue(broker)
    sdk_event = SdkEvent({"id": "sdk-1", "source": "/sdk", "type": "t", "flag": True, "n": 3,
                          "time": datetime(2024, 5, 6, 7, 8, 9, 123000, tzinfo=UTC)}, {"a": 1})  # fmt: skip
    message = sdk_amqp.to_binary(sdk_event, SDK_JSON)
    # The official SDK writes `time` as integer milliseconds, which azure-servicebus would send as a 32-bit
    # AMQP int -- it cannot (ValueError) -- so a user hands it over as the datetime it stands for, which
    # azure-servicebus sends as an AMQP timestamp and gives back to receivers as integer milliseconds.
    props = dict(message.application_properties)
    props["cloudEvents_time"] = amqp.timestamp_from_millis(props["cloudEvents_time"])
    async with ServiceBusClient.from_connection_string(broker.connection_string) as client, \
            client.get_queue_sender(name) as sender:
        await sender.send_messages(ServiceBusMessage(message.application_data, content_type="application/json",
                                                     application_properties=props))
        await sender.send_messages(ServiceBusMessage(sdk_amqp.to_structured(sdk_event, SDK_JSON).application_data,
                                                     content_type="application/cloudevents+json"))
    source = adapter(broker, name)
    closing.append(source)
    consumer = Consumer(source)
    await eventually(lambda: len(consumer.got) == 2, 15)
    await consumer.stop()
    binary, structured = (d.event for d in consumer.got)
    assert binary.attributes["time"] == "2024-05-06T07:08:09.123Z"  # the SDK's integer milliseconds
    assert (binary.attributes["flag"], binary.attributes["n"], binary.data) == (True, 3, b'{"a": 1}')
    assert structured.attributes["time"] == "2024-05-06T07:08:09.123000Z"
    assert structured.data == {"a": 1}


async def test_a_message_that_is_no_cloudevent_is_dead_lettered(broker: ServiceBusTestBroker,
                                                                closing: list[ServiceBusAdapter]) -> None:
    from azure.servicebus import ServiceBusMessage
    from azure.servicebus.aio import ServiceBusClient

    name = queue(broker)
    async with ServiceBusClient.from_connection_string(broker.connection_string) as client, \
            client.get_queue_sender(name) as sender:
        await sender.send_messages(ServiceBusMessage(b"hello", message_id="plain", content_type="text/plain"))
    source = adapter(broker, name)
    closing.append(source)
    assert all(o.ok for o in await source.publish([ev(None, id="after")]))
    consumer = Consumer(source)
    await eventually(lambda: len(consumer.got) == 1, 15)
    await eventually(lambda: len(broker.dead_letters(name)) == 1, 15)
    await consumer.stop()
    (dead,) = broker.dead_letters(name)
    assert (dead.message_id, dead.dead_letter_reason) == ("plain", "NotACloudEvent")
    assert "not a CloudEvent" in (dead.dead_letter_description or "")
    assert [d.event.id for d in consumer.got] == ["after"]


async def test_topic_subscription_and_probes(broker: ServiceBusTestBroker,
                                             closing: list[ServiceBusAdapter]) -> None:
    topic = f"amqp-t-{uuid.uuid4().hex[:8]}"
    broker.create_topic(topic)
    broker.create_subscription(topic, "audit", lock_duration=2)
    broker.create_subscription(topic, "keyed", requires_session=True, lock_duration=2)
    sink = adapter(broker, topic)
    audit = adapter(broker, f"{topic}/audit")
    keyed = adapter(broker, f"{topic}/keyed")
    closing.extend([sink, audit, keyed])
    for probed in (sink, audit, keyed):  # cancel-scheduled on the topic; a peek on each subscription
        assert 0 < await probed.probe() < 2.0
    assert all(o.ok for o in await sink.publish([ev(None, id=f"e{i}", partitionkey="p") for i in range(3)]))
    consumers = [Consumer(audit), Consumer(keyed)]
    for consumer in consumers:
        await eventually(lambda c=consumer: len(c.got) == 3, 15)  # type: ignore[misc]
        await consumer.stop()
        assert [d.event.id for d in consumer.got] == ["e0", "e1", "e2"]
    with pytest.raises(NotFound, match="could not be found"):  # a topic has no messages of its own
        await asyncio.wait_for(sink.consume(lambda d: d.ack()), 20)


async def test_events_without_partitionkey_on_a_session_queue(broker: ServiceBusTestBroker,
                                                              closing: list[ServiceBusAdapter]) -> None:
    name = queue(broker, requires_session=True)
    strict = adapter(broker, name)
    lenient = adapter(broker, name, default_session="unkeyed")
    closing.extend([strict, lenient])
    (outcome,) = await strict.publish([ev(None, id="nokey")])
    assert isinstance(outcome.error, Rejected) and "default_session" in str(outcome.error)
    outcomes = await lenient.publish([ev(None, id="nokey"), ev(None, id="keyed", partitionkey="k")])
    assert all(o.ok for o in outcomes)
    assert sorted(m.session_id for m in broker.messages(name)) == ["k", "unkeyed"]


async def test_a_nacked_message_goes_first_again_in_its_session(broker: ServiceBusTestBroker,
                                                                 closing: list[ServiceBusAdapter]) -> None:
    name = queue(broker, requires_session=True)
    source = adapter(broker, name)
    closing.append(source)
    events = [ev(None, id=f"s{i}", partitionkey="one-key") for i in range(6)]
    assert all(o.ok for o in await source.publish(events))

    async def fail_s1_twice(delivery: Delivery) -> None:
        if delivery.event.id == "s1" and delivery.attempt <= 2:
            raise RuntimeError("not yet")

    consumer = Consumer(source, fail_s1_twice)
    await eventually(lambda: len(consumer.got) == 8, 15)
    await consumer.stop()
    # s2..s5 were fetched with s1 and stayed locked, unhandled, until s1 was handled: order holds, and
    # their delivery counts did not grow (one poison message does not age the rest of its session).
    assert [(d.event.id, d.attempt) for d in consumer.got] == [
        ("s0", 1), ("s1", 1), ("s1", 2), ("s1", 3), ("s2", 1), ("s3", 1), ("s4", 1), ("s5", 1)]
    assert broker.messages(name) == []


async def test_structured_fallback_when_the_properties_are_too_large(broker: ServiceBusTestBroker,
                                                                    closing: list[ServiceBusAdapter]) -> None:
    name = queue(broker)
    sink = adapter(broker, name, max_header_bytes=1024)
    closing.append(sink)
    small, large = ev({"a": 1}, id="small"), ev({"a": 1}, id="large", note="n" * 2000)
    assert sink.encode(small).content_type is None and sink.encode(large).content_type == json_format.CONTENT_TYPE
    # Data that is itself a structured CloudEvent: binary mode would be read as structured (spec §3).
    nested = ev(b'{"specversion":"1.0"}', id="nested", datacontenttype="Application/CloudEvents+json")
    assert sink.encode(nested).content_type == json_format.CONTENT_TYPE
    assert canonical(amqp.from_message(sink.encode(nested)), "structured") == canonical(nested, "structured")
    assert all(o.ok for o in await sink.publish([small, large]))
    assert [m.content_type for m in broker.messages(name)] == [None, json_format.CONTENT_TYPE]
    consumer = Consumer(sink)
    await eventually(lambda: len(consumer.got) == 2, 15)
    await consumer.stop()
    assert [canonical(d.event, "structured") for d in consumer.got] == [canonical(small, "structured"),
                                                                         canonical(large, "structured")]


async def test_oversized_events_are_rejected_before_sending_and_batches_split(
        broker: ServiceBusTestBroker, closing: list[ServiceBusAdapter]) -> None:
    name = queue(broker)
    sink = adapter(broker, name, max_batch=3)
    closing.append(sink)
    events = [ev("x" * 100_000, id=f"big{i}", datacontenttype="text/plain") for i in range(5)]
    events.insert(2, ev("x" * 300_000, id="huge", datacontenttype="text/plain"))
    events += [ev(None, id=f"small{i}") for i in range(7)]
    outcomes = await sink.publish(events)
    assert [o.event_id for o in outcomes] == [e.id for e in events]
    assert isinstance(outcomes[2].error, Rejected) and str(2**18) in str(outcomes[2].error)
    assert [o.ok for o in outcomes] == [True, True, False] + [True] * 10
    assert [m.message_id for m in broker.messages(name)] == [e.id for e in events if e.id != "huge"]


async def test_nack_with_requeue_after_delays_the_redelivery(broker: ServiceBusTestBroker,
                                                             closing: list[ServiceBusAdapter]) -> None:
    name = queue(broker, lock_duration=1)
    source = adapter(broker, name)
    closing.append(source)
    assert (await source.publish([ev(None, id="later")]))[0].ok
    seen: list[float] = []

    async def nack_once(delivery: Delivery) -> None:
        seen.append(time.monotonic())
        if delivery.attempt == 1:
            await delivery.nack(requeue_after=2.5)  # longer than the lock: the renewal keeps it meanwhile

    consumer = Consumer(source, nack_once)
    await eventually(lambda: len(consumer.got) == 2, 15)
    await consumer.stop()
    assert [d.attempt for d in consumer.got] == [1, 2]
    assert seen[1] - seen[0] >= 2.5
    assert broker.messages(name) == []


async def test_credentials(broker: ServiceBusTestBroker, closing: list[ServiceBusAdapter],
                           monkeypatch: pytest.MonkeyPatch) -> None:
    name = queue(broker)
    url = f"servicebus://{broker.namespace}/{name}"
    monkeypatch.delenv("UMCEF_SERVICEBUS_CONNECTION_STRING", raising=False)
    monkeypatch.delenv(namespace_env_var(broker.namespace), raising=False)
    nothing = from_url(url)
    wrong = from_url(url, connection_string=broker.connection_string_for(key=base64.b64encode(b"x" * 32).decode()))
    closing.extend([nothing, wrong])
    for unauthorized in (nothing, wrong):
        started = time.monotonic()
        (outcome,) = await unauthorized.publish([ev()])
        assert isinstance(outcome.error, Unauthorized), outcome
        with pytest.raises(Unauthorized):
            await unauthorized.probe()
        with pytest.raises(Unauthorized):
            await asyncio.wait_for(unauthorized.consume(lambda d: d.ack()), 20)
        assert time.monotonic() - started < 15
    # The per-namespace variable, pointing elsewhere: the URL's namespace wins, the key is used.
    assert namespace_env_var("my-ns.example:5671") == "UMCEF_SERVICEBUS_CONNECTION_STRING__MY_NS_EXAMPLE_5671"
    monkeypatch.setenv(namespace_env_var(broker.namespace),
                       connection_string_for(broker.connection_string, "elsewhere.example") + ";EntityPath=x")
    from_env = from_url(url)
    closing.append(from_env)
    assert (await from_env.publish([ev()]))[0].ok
    assert 0 < await from_env.probe() < 2.0


def test_urls_and_connection_strings() -> None:
    sink = from_url("servicebus://myns/orders", connection_string="Endpoint=sb://x/;SharedAccessKeyName=k;"
                    "SharedAccessKey=s;EntityPath=orders")
    assert (sink.host, sink.entity, sink.subscription) == ("myns.servicebus.windows.net", "orders", None)
    source = from_url("servicebus://myns.servicebus.windows.net/orders/audit?max_sessions=2&sessions=true",
                      connection_string="x")
    assert (source.host, source.entity, source.subscription) == ("myns.servicebus.windows.net", "orders", "audit")
    assert (source._max_sessions, source._sessions) == (2, True)
    assert connection_string_for("Endpoint=sb://a/;SharedAccessKeyName=k;SharedAccessKey=s=;EntityPath=q",
                                 "127.0.0.1:5672") == "Endpoint=sb://127.0.0.1:5672/;SharedAccessKeyName=k;SharedAccessKey=s="
    for bad in ("servicebus://ns", "servicebus://ns/a/b/c", "servicebus://user:pw@ns/q", "kafka://ns/q"):
        with pytest.raises(ValueError):
            from_url(bad, connection_string="x")


async def test_unreachable_namespace_is_transient_and_fast(broker: ServiceBusTestBroker,
                                                           closing: list[ServiceBusAdapter]) -> None:
    from tests.brokers import free_port

    dead = from_url(f"servicebus://127.0.0.1:{free_port()}/q", connection_string=broker.connection_string)
    closing.append(dead)
    started = time.monotonic()
    with pytest.raises(Transient):
        await dead.probe()
    (outcome,) = await dead.publish([ev()])
    assert isinstance(outcome.error, Transient)
    assert time.monotonic() - started < 15
