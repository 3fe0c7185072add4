"""The SQS mapping (`umcef.fabric.bindings.sqs`) and the parts of the SQS adapter the conformance suite
does not reach (batch sizing, error classification, FIFO nack/stop semantics, the visibility heartbeat,
messages that are not CloudEvents).

Binding: generated events round-trip exactly in binary mode and as the JSON format does in structured
mode; whatever `to_message` produces is a message SQS accepts (attribute count, names, types, XML-safe
text, non-empty values and body); the fallback to structured mode happens exactly at its boundaries.
Adapter tests run against moto (`sqs_server`), each on its own queue.
"""

from __future__ import annotations

import asyncio
import base64
import re
import string
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.brokers import SqsServer, unique_name
from umcef.adapters.contract import Delivery, NotFound, Rejected, Throttled, Transient, Unauthorized
from umcef.adapters.sqs import SqsAdapter, classify, classify_code, from_url
from umcef.fabric.bindings import sqs
from umcef.fabric.bindings.sqs import SqsAttribute, SqsMessage
from umcef.fabric.errors import InvalidAttribute, InvalidData, LimitExceeded, UnsupportedMediaType
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

# The mapping validates through `accel`: CI runs the mapping tests again on the pure-Python twin (not the
# moto-backed adapter tests below, which do not depend on it).
pure_twin = pytest.mark.pure_twin

BASE = {"specversion": "1.0", "id": "e-1", "source": "https://src.example/a", "type": "com.example.t"}


def ev(data: Any = None, **attrs: Any) -> Event:
    return Event({**BASE, **attrs}, data)


def round_trip(event: Event, fifo: bool = False) -> tuple[SqsMessage, Event]:
    message = sqs.to_message(event, fifo=fifo)
    return message, sqs.from_message(message)


def is_structured(message: SqsMessage) -> bool:
    return "ce-specversion" not in message.attributes


# ---------------------------------------------------------------------------------------------------
# Mapping: binary mode


@pure_twin
def test_binary_mode_attribute_types_and_names() -> None:
    event = ev("hello", datacontenttype="text/plain", n=-(2**31), flag=False, blob=b"\x00\xff", key="k")
    message, back = round_trip(event)
    assert message.attributes == {
        "ce-specversion": SqsAttribute("String", "1.0"),
        "ce-id": SqsAttribute("String", "e-1"),
        "ce-source": SqsAttribute("String", "https://src.example/a"),
        "ce-type": SqsAttribute("String", "com.example.t"),
        "content-type": SqsAttribute("String", "text/plain"),
        "ce-n": SqsAttribute("Number", "-2147483648"),
        "ce-flag": SqsAttribute("String.boolean", "false"),
        "ce-blob": SqsAttribute("Binary", b"\x00\xff"),
        "ce-key": SqsAttribute("String", "k"),
    }
    assert message.body == "hello" and message.group_id is None and message.dedup_id is None
    assert back == event
    assert [type(back.attributes[k]) for k in ("n", "flag", "blob")] == [int, bool, bytes]


@pure_twin
@pytest.mark.parametrize(("data", "content_type", "body", "encoding"), [
    (None, None, "-", "none"),
    ({"a": [1, 2.5, None]}, "application/json", '{"a":[1,2.5,null]}', None),
    ({"a": 1}, None, '{"a":1}', None),                          # no datacontenttype: JSON is the default
    ("text", "application/json", '"text"', None),               # a JSON string value
    ("line\nzwei ✓", "text/plain; charset=utf-8", "line\nzwei ✓", None),
    ({"a": 1}, "text/plain", '{"a":1}', "json"),                # a JSON value under a non-JSON type
    (b'{"raw": true}', "application/json", '{"raw": true}', "utf-8"),  # opaque bytes stay bytes, unparsed
    (b"\xff\x00\x01", "application/octet-stream", "/wAB", "base64"),
    (b"a\x00b", "application/octet-stream", "YQBi", "base64"),  # UTF-8, but NUL is not XML-safe
    (0, "application/json", "0", None),
    (False, None, "false", None),
    ("", "application/json", '""', None),                       # empty JSON string: '""' is a body
    ("ok \ufffe", "application/json", '"ok \\ufffe"', None),    # JSON escapes what XML cannot carry
])  # fmt: skip
def test_binary_mode_data(data: Any, content_type: str | None, body: str, encoding: str | None) -> None:
    event = ev(data) if content_type is None else ev(data, datacontenttype=content_type)
    message, back = round_trip(event)
    assert not is_structured(message)
    assert message.body == body
    got = message.attributes.get("data-encoding")
    assert (got.value if got else None) == encoding
    assert back == event and type(back.data) is type(event.data)


@pure_twin
def test_binary_detection_wins_over_a_cloudevents_datacontenttype() -> None:
    """An event whose data is itself a structured CloudEvent must not be read as structured mode."""
    inner = json_format.encode(ev({"x": 1})).decode()
    event = ev(inner.encode(), datacontenttype="application/cloudevents+json")
    message, back = round_trip(event)
    assert message.attributes["content-type"].value == "application/cloudevents+json"
    assert not is_structured(message) and back == event


# ---------------------------------------------------------------------------------------------------
# Mapping: the fallback to structured mode, at its boundaries


def extensions(count: int) -> dict[str, Any]:
    return {f"x{i}": f"v{i}" for i in range(count)}


@pure_twin
def test_ten_attributes_fit_eleven_fall_back() -> None:
    ten = ev("t", datacontenttype="text/plain", **extensions(5))  # 4 required + content-type + 5
    eleven = ev("t", datacontenttype="text/plain", **extensions(6))
    assert len(sqs.to_message(ten).attributes) == 10 and not is_structured(sqs.to_message(ten))
    message, back = round_trip(eleven)
    assert is_structured(message) and back == eleven
    assert message.attributes == {"content-type": SqsAttribute("String", "application/cloudevents+json")}
    with pytest.raises(LimitExceeded):
        sqs.to_binary(eleven)


@pure_twin
def test_the_data_encoding_attribute_counts_towards_the_ten() -> None:
    nine_plus_marker = ev(None, **extensions(5))  # 9 attributes + data-encoding=none
    ten_plus_marker = ev(None, **extensions(6))
    assert not is_structured(sqs.to_message(nine_plus_marker))
    assert len(sqs.to_message(nine_plus_marker).attributes) == 10
    assert is_structured(sqs.to_message(ten_plus_marker))
    assert round_trip(ten_plus_marker)[1] == ten_plus_marker


@pure_twin
@pytest.mark.parametrize(("event", "error"), [
    (ev("t", datacontenttype="text/plain", empty=""), InvalidAttribute),       # SQS: values are non-empty
    (ev("t", datacontenttype="text/plain", empty=b""), InvalidAttribute),
    (ev("", datacontenttype="text/plain"), InvalidData),                       # SQS: bodies are non-empty
    (ev(b""), InvalidData),
    (ev("nul \x00 here", datacontenttype="text/plain"), InvalidData),          # text SQS would refuse
    (ev("bom \ufffe", datacontenttype="text/plain"), InvalidData),
    (ev("t", datacontenttype="text/plain", **{"n" * 254: "v"}), InvalidAttribute),  # name > 256 with ce-
])  # fmt: skip
def test_what_binary_mode_cannot_carry_goes_structured(event: Event, error: type[Exception]) -> None:
    with pytest.raises(error):
        sqs.to_binary(event)
    message, back = round_trip(event)
    assert is_structured(message)
    assert _sendable(message) == []
    assert back == json_format.decode(json_format.encode(event))


@pure_twin
def test_longest_name_that_fits() -> None:
    event = ev("t", datacontenttype="text/plain", **{"n" * 253: "v"})
    assert not is_structured(sqs.to_message(event))


@pure_twin
def test_structured_body_escapes_what_sqs_refuses() -> None:
    event = ev("a\ufffeb\uffffc\x00", datacontenttype="text/plain", **extensions(8))
    message, back = round_trip(event)
    assert is_structured(message) and "\\ufffe" in message.body and "\\uffff" in message.body
    assert _sendable(message) == [] and back == event


@pure_twin
def test_invalid_events_raise() -> None:
    with pytest.raises(InvalidAttribute):
        sqs.to_message(Event({"specversion": "1.0", "id": "1", "type": "t"}))  # no source
    with pytest.raises(InvalidData):
        sqs.to_message(ev({1, 2}))  # a set is no JSON value


# ---------------------------------------------------------------------------------------------------
# Mapping: FIFO ids and size


@pure_twin
def test_fifo_group_and_dedup_ids() -> None:
    keyed = ev("t", datacontenttype="text/plain", partitionkey="customer-42")
    message = sqs.to_message(keyed, fifo=True)
    assert message.group_id == "customer-42"
    assert message.dedup_id == __import__("hashlib").sha256(b"https://src.example/a\ne-1").hexdigest()
    assert sqs.to_message(ev("t", datacontenttype="text/plain"), fifo=True).group_id == "e-1"  # unkeyed: own group
    odd = ev(None, partitionkey="Kunde Müller")  # space and non-ASCII: not a valid MessageGroupId
    group = sqs.to_message(odd, fifo=True).group_id
    assert group is not None and re.fullmatch(r"sha256-[0-9a-f]{64}", group)
    assert sqs.to_message(ev({"other": 1}, partitionkey="Kunde Müller"), fifo=True).group_id == group  # stable
    assert sqs.message_group_id(ev(None, partitionkey="k" * 129)).startswith("sha256-")
    assert sqs.message_group_id(ev(None, partitionkey="k" * 128)) == "k" * 128
    structured = sqs.to_message(ev(None, partitionkey="p", **extensions(8)), fifo=True)
    assert is_structured(structured) and structured.group_id == "p"


@pure_twin
def test_size_counts_body_names_types_and_values() -> None:
    message = SqsMessage("ü" * 3, {"ce-a": SqsAttribute("String", "xy"), "b": SqsAttribute("Binary", b"\x00" * 5)})
    assert message.size() == 6 + (4 + 6 + 2) + (1 + 6 + 5)


# ---------------------------------------------------------------------------------------------------
# Mapping: decoding what others wrote


@pure_twin
def test_from_message_tolerates_and_rejects() -> None:
    base = {f"ce-{k}": SqsAttribute("String", v) for k, v in BASE.items()}
    foreign = SqsMessage("{not json", {**base, "ce-ratio": SqsAttribute("Number", "1.5"),
                                       "ce-big": SqsAttribute("Number", "99999999999"),
                                       "traceid": SqsAttribute("String", "abc")})
    event = sqs.from_message(foreign)
    assert event.attributes["ratio"] == "1.5" and event.attributes["big"] == "99999999999"  # no CE Integer
    assert "traceid" not in event.attributes
    assert event.data == b"{not json"  # JSON by default type, but not JSON: kept opaque
    with pytest.raises(UnsupportedMediaType):
        sqs.from_message(SqsMessage("hello", {}))
    with pytest.raises(InvalidAttribute):
        sqs.from_message(SqsMessage("-", {**base, "ce-flag": SqsAttribute("String.boolean", "yes")}))
    with pytest.raises(InvalidData):
        sqs.from_message(SqsMessage("x", {**base, "data-encoding": SqsAttribute("String", "rot13")}))
    with pytest.raises(InvalidData):
        sqs.from_message(SqsMessage("not base64!", {**base, "data-encoding": SqsAttribute("String", "base64")}))
    with pytest.raises(InvalidAttribute):
        sqs.from_message(SqsMessage("x", {**base, "ce-id": SqsAttribute("String", "")}))


@pure_twin
def test_wire_shapes() -> None:
    raw = {"Body": "b", "MessageAttributes": {"ce-x": {"DataType": "Binary", "BinaryValue": b"\x01"},
                                              "ce-y": {"DataType": "Binary", "BinaryValue": "AQ=="}},
           "Attributes": {"MessageGroupId": "g", "MessageDeduplicationId": "d"}}
    message = sqs.message_from_wire(raw)
    assert message.attributes["ce-x"] == message.attributes["ce-y"] == SqsAttribute("Binary", b"\x01")
    assert (message.group_id, message.dedup_id) == ("g", "d")
    assert SqsAttribute("Number", "5").to_wire() == {"DataType": "Number", "StringValue": "5"}


# ---------------------------------------------------------------------------------------------------
# Mapping: generated events

any_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=40)  # controls, U+FFFE...
valid_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs", "Cn"]), max_size=24)
nonempty_text = valid_text.filter(bool)
uri_ref = st.text(st.sampled_from(string.ascii_letters + string.digits + "-._~:/?#[]@!$&'()*+,;="), min_size=1,
                  max_size=30)  # fmt: skip
CORE = {"id", "source", "type", "specversion", "time", "datacontenttype", "dataschema", "subject", "data"}
ext_names = st.text(st.sampled_from(string.ascii_lowercase + string.digits), min_size=1, max_size=12).filter(
    lambda n: n not in CORE)
ext_values = st.one_of(valid_text, st.integers(-(2**31), 2**31 - 1), st.booleans(), st.binary(max_size=24), uri_ref)
json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), any_text),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(any_text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def events(draw: st.DrawFn) -> Event:
    attrs: dict[str, Any] = {"specversion": "1.0", "id": draw(nonempty_text), "source": draw(uri_ref),
                             "type": draw(nonempty_text)}
    if draw(st.booleans()):
        attrs["time"] = "2026-11-21T10:00:00.5+01:00"
    if draw(st.booleans()):
        attrs["subject"] = draw(nonempty_text)
    if draw(st.booleans()):
        attrs["partitionkey"] = draw(nonempty_text)
    attrs.update(draw(st.dictionaries(ext_names, ext_values, max_size=9)))
    content_type = draw(st.sampled_from([None, "application/json", "application/vnd.x+json",
                                         "text/plain; charset=utf-8", "application/octet-stream"]))
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    data = draw(st.one_of(st.none(), st.binary(max_size=40), any_text, json_values))
    return Event(attrs, data)


def _sendable(message: SqsMessage) -> list[str]:
    """What SQS would refuse in this message (empty when it would take it)."""
    problems = []
    xml_bad = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
    if not message.body or xml_bad.search(message.body):
        problems.append("body")
    if len(message.attributes) > 10:
        problems.append("too many attributes")
    for name, attribute in message.attributes.items():
        if (not re.fullmatch(r"[A-Za-z0-9_.-]{1,256}", name) or name.lower().startswith(("aws.", "amazon."))
                or name.startswith(".") or name.endswith(".") or ".." in name):
            problems.append(f"name {name!r}")
        if not re.match(r"(String|Number|Binary)(\.|\Z)", attribute.data_type):
            problems.append(f"type of {name}")
        if not attribute.value:
            problems.append(f"empty {name}")
        if isinstance(attribute.value, str) and xml_bad.search(attribute.value):
            problems.append(f"characters in {name}")
        if attribute.data_type.startswith("Number") and not re.fullmatch(r"-?[0-9]+", str(attribute.value)):
            problems.append(f"number {name}")
    for value in (message.group_id, message.dedup_id):
        if value is not None and not re.fullmatch(r"[!-~]{1,128}", value):
            problems.append(f"fifo id {value!r}")
    return problems


@pure_twin
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(), st.booleans())
@example(ev(None, **extensions(6)), False)
@example(ev("x\x00", datacontenttype="text/plain"), True)
def test_generated_events_round_trip_and_are_sendable(event: Event, fifo: bool) -> None:
    message = sqs.to_message(event, fifo=fifo)
    assert _sendable(message) == []
    assert (message.group_id is not None) is fifo
    back = sqs.from_message(message)
    if is_structured(message):  # exactly what the JSON format itself keeps
        assert back == json_format.decode(json_format.encode(event))
    else:  # lossless, Python types included
        assert back == event
        assert type(back.data) is type(event.data)
        assert {k: type(v) for k, v in back.attributes.items()} == {k: type(v) for k, v in event.attributes.items()}
    assert message.size() == sqs.to_message(event, fifo=fifo).size()  # deterministic


# ---------------------------------------------------------------------------------------------------
# Adapter: pure parts


def test_from_url() -> None:
    adapter = from_url("sqs://orders.fifo?region=eu-west-1&endpoint=http%3A%2F%2Fh%3A1&owner=123&wait_seconds=0",
                       aws_access_key_id="a", aws_secret_access_key="s", wait_seconds=7, store=object())
    assert adapter.fifo and adapter.capabilities.ordering and adapter.capabilities.native_dedup
    assert adapter.capabilities.max_attributes == 10 and adapter.capabilities.max_batch == 10
    assert adapter.wait_seconds == 0  # the URL wins over the options
    standard = from_url("sqs://orders")
    assert not standard.fifo and not standard.capabilities.ordering
    assert standard.capabilities.max_event_bytes == 262_144
    for bad in ("sqs://", "sqs://a/b", "sqs://bad name", "sqs://" + "q" * 81, "sqs://key:secret@queue"):
        with pytest.raises(ValueError):
            from_url(bad)


def test_chunks_respect_count_and_bytes() -> None:
    adapter = SqsAdapter("sqs://q", "q")
    sizes = [100_000, 100_000, 62_144, 1, *[10] * 12]
    ready = [(i, SqsMessage("x"), size) for i, size in enumerate(sizes)]
    chunks = adapter._chunks(ready)
    assert [[i for i, _, _ in chunk] for chunk in chunks] == [[0, 1, 2], [3, *range(4, 13)], [13, 14, 15]]
    assert all(sum(s for _, _, s in chunk) <= 262_144 and len(chunk) <= 10 for chunk in chunks)


def test_error_classification() -> None:
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    def client_error(code: str, status: int, query_code: str = "") -> ClientError:
        error = {"Code": code, "Message": "m", **({"QueryErrorCode": query_code} if query_code else {})}
        return ClientError({"Error": error, "ResponseMetadata": {"HTTPStatusCode": status}}, "SendMessageBatch")

    assert isinstance(classify(client_error("ThrottlingException", 400), "x"), Throttled)
    assert isinstance(classify(client_error("RequestThrottled", 403), "x"), Throttled)
    assert isinstance(classify(client_error("KmsThrottled", 400), "x"), Throttled)
    assert isinstance(classify(client_error("AWS.SimpleQueueService.NonExistentQueue", 400, "QueueDoesNotExist"),
                               "x"), NotFound)
    assert isinstance(classify(client_error("QueueDoesNotExist", 400), "x"), NotFound)
    assert isinstance(classify(client_error("InvalidClientTokenId", 403), "x"), Unauthorized)
    assert isinstance(classify(client_error("SomethingNew", 403), "x"), Unauthorized)
    assert isinstance(classify(client_error("InternalError", 500), "x"), Transient)
    assert isinstance(classify(client_error("Whatever", 503), "x"), Transient)
    assert isinstance(classify(client_error("InvalidMessageContents", 400), "x"), Rejected)
    assert isinstance(classify(EndpointConnectionError(endpoint_url="http://h"), "x"), Transient)
    assert isinstance(classify(NoCredentialsError(), "x"), Unauthorized)
    assert isinstance(classify(TimeoutError(), "x"), Transient)
    assert isinstance(classify(RuntimeError("?"), "x"), Transient)
    # Per-entry failures of a batch carry SenderFault instead of a status.
    assert isinstance(classify_code({"InternalError"}, "r", None, False), Transient)
    assert isinstance(classify_code({"InvalidParameterValue"}, "r", None, True), Rejected)
    assert isinstance(classify_code({"Unknown"}, "r", None, False), Transient)


# ---------------------------------------------------------------------------------------------------
# Adapter: against moto


@pytest.fixture
def sqs_options(sqs_server: SqsServer) -> dict[str, Any]:
    return {"aws_access_key_id": sqs_server.access_key, "aws_secret_access_key": sqs_server.secret_key,
            "region_name": sqs_server.region, "endpoint_url": sqs_server.endpoint_url, "wait_seconds": 1}


@pytest.fixture
def make_queue(sqs_server: SqsServer) -> Any:
    import boto3

    admin = boto3.client("sqs", **sqs_server.client_kwargs())

    def make(fifo: bool = False) -> tuple[str, str, Any]:
        name = unique_name("bind") + (".fifo" if fifo else "")
        url = admin.create_queue(QueueName=name, Attributes={"FifoQueue": "true"} if fifo else {})["QueueUrl"]
        return f"sqs://{name}", url, admin

    return make


@pytest.fixture
async def adapters(sqs_options: dict[str, Any]) -> AsyncIterator[Any]:
    opened: list[SqsAdapter] = []

    def open_(url: str, **extra: Any) -> SqsAdapter:
        adapter = from_url(url, **{**sqs_options, **extra})
        opened.append(adapter)
        return adapter

    yield open_
    for adapter in opened:
        await adapter.close()


def numbered(run: str, count: int, key: str | None = None) -> list[Event]:
    extra = {"partitionkey": key} if key else {}
    return [ev(f"payload {n}", id=f"{run}-{n}", datacontenttype="text/plain", n=n, **extra) for n in range(count)]


async def consume_until(adapter: SqsAdapter, handler: Any, done: Any, timeout: float = 30, **kw: Any) -> None:
    task = asyncio.create_task(adapter.consume(handler, **kw))
    deadline = time.monotonic() + timeout
    while not done():
        if task.done():
            task.result()
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)
    await adapter.stop_consuming()
    await asyncio.wait_for(task, 10)


async def test_publish_splits_by_bytes_and_rejects_oversize_first(make_queue: Any, adapters: Any) -> None:
    url, _, _ = make_queue()
    adapter: SqsAdapter = adapters(url)
    run = uuid.uuid4().hex[:8]
    big = [ev("x" * 100_000, id=f"{run}-{i}", datacontenttype="text/plain") for i in range(5)]
    too_big = ev("x" * 262_144, id=f"{run}-huge", datacontenttype="text/plain")
    invalid = Event({"specversion": "1.0", "id": f"{run}-bad", "type": "t"})  # no source
    calls: list[int] = []
    real_call = adapter.call

    async def counting(operation: str, **kwargs: Any) -> Any:
        if operation == "send_message_batch":
            calls.append(len(kwargs["Entries"]))
        return await real_call(operation, **kwargs)

    adapter.call = counting  # type: ignore[method-assign]
    outcomes = await adapter.publish([*big, too_big, invalid])
    assert [o.ok for o in outcomes] == [True] * 5 + [False, False]
    assert isinstance(outcomes[5].error, Rejected) and "262144" in str(outcomes[5].error)
    assert isinstance(outcomes[6].error, Rejected) and "source" in str(outcomes[6].error)
    assert sorted(calls) == [1, 2, 2]  # 2 x 100 kB per request fit 256 KiB, 3 do not
    seen: set[str] = set()

    async def handler(delivery: Delivery) -> None:
        seen.add(delivery.event.id)

    await consume_until(adapter, handler, lambda: len(seen) == 5)
    assert seen == {e.id for e in big}


async def test_missing_queue_is_not_found_everywhere(adapters: Any) -> None:
    adapter: SqsAdapter = adapters(f"sqs://{unique_name('absent')}")
    (outcome,) = await adapter.publish([ev("x", datacontenttype="text/plain")])
    assert isinstance(outcome.error, NotFound)
    with pytest.raises(NotFound):
        await adapter.probe()
    with pytest.raises(NotFound):
        await asyncio.wait_for(adapter.consume(lambda d: d.ack()), 10)
    await adapter.close()
    await adapter.close()  # idempotent
    (outcome,) = await adapter.publish([ev("x", datacontenttype="text/plain")])
    assert isinstance(outcome.error, Transient)


async def test_fifo_nack_keeps_group_order_and_counts_attempts(make_queue: Any, adapters: Any) -> None:
    url, _, _ = make_queue(fifo=True)
    adapter: SqsAdapter = adapters(url, visibility_timeout=5)
    run = uuid.uuid4().hex[:8]
    assert all(o.ok for o in await adapter.publish(numbered(run, 5, key="k")))
    handled: list[tuple[int, int]] = []  # (n, attempt)

    async def handler(delivery: Delivery) -> None:
        n = delivery.event.attributes["n"]
        handled.append((n, delivery.attempt))
        if n == 1 and delivery.attempt == 1:
            await delivery.nack(requeue_after=0)

    await consume_until(adapter, handler, lambda: len({n for n, _ in handled}) == 5 and handled[-1][0] == 4)
    first_done = [n for n, attempt in handled if not (n == 1 and attempt == 1)]
    assert first_done == [0, 1, 2, 3, 4], handled  # 2..4 were not handled before 1 came back
    assert (1, 1) in handled and any(n == 1 and attempt >= 2 for n, attempt in handled)


async def test_stop_hands_back_unhandled_fifo_messages(make_queue: Any, adapters: Any) -> None:
    url, _, _ = make_queue(fifo=True)
    adapter: SqsAdapter = adapters(url, visibility_timeout=30)
    run = uuid.uuid4().hex[:8]
    assert all(o.ok for o in await adapter.publish(numbered(run, 4, key="k")))
    handled: list[int] = []

    async def handler(delivery: Delivery) -> None:
        handled.append(delivery.event.attributes["n"])
        await adapter.stop_consuming()  # stop while the rest of the group waits in this consumer

    started = time.monotonic()
    await asyncio.wait_for(adapter.consume(handler), 15)
    assert time.monotonic() - started < 10
    assert handled == [0]
    # Not deleted and not left invisible for the 30 s visibility timeout: the rest comes straight back.
    second: SqsAdapter = adapters(url, visibility_timeout=30)
    again: list[tuple[int, int]] = []

    async def record(delivery: Delivery) -> None:
        again.append((delivery.event.attributes["n"], delivery.attempt))

    await consume_until(second, record, lambda: len(again) == 3, timeout=10)
    assert [n for n, _ in again] == [1, 2, 3] and all(attempt == 2 for _, attempt in again)


async def test_heartbeat_keeps_a_slow_handler_s_message_invisible(make_queue: Any, adapters: Any) -> None:
    url, _, _ = make_queue()
    adapter: SqsAdapter = adapters(url, visibility_timeout=1)
    run = uuid.uuid4().hex[:8]
    assert all(o.ok for o in await adapter.publish(numbered(run, 2)))
    deliveries: list[tuple[str, int]] = []
    finished: list[str] = []

    async def slow(delivery: Delivery) -> None:
        deliveries.append((delivery.event.id, delivery.attempt))
        await asyncio.sleep(3.5)  # three and a half visibility timeouts, while the consumer keeps receiving
        finished.append(delivery.event.id)

    await consume_until(adapter, slow, lambda: len(finished) >= 2, timeout=20)
    assert sorted(deliveries) == sorted((e.id, 1) for e in numbered(run, 2)), deliveries  # no duplicate


async def test_a_message_that_is_no_cloudevent_is_left_for_the_redrive_policy(make_queue: Any,
                                                                              adapters: Any) -> None:
    url, queue_url, admin = make_queue()
    admin.send_message(QueueUrl=queue_url, MessageBody="not an event")
    adapter: SqsAdapter = adapters(url, visibility_timeout=5, undecodable_requeue_seconds=1)
    run = uuid.uuid4().hex[:8]
    assert all(o.ok for o in await adapter.publish(numbered(run, 1)))
    got: list[str] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.event.id)

    await consume_until(adapter, handler, lambda: bool(got))
    assert got == [f"{run}-0"]
    deadline = time.monotonic() + 10
    while True:  # returned, not deleted: it comes back once its short requeue delay is over
        response = admin.receive_message(QueueUrl=queue_url, WaitTimeSeconds=1,
                                         MessageSystemAttributeNames=["ApproximateReceiveCount"])
        messages = response.get("Messages", [])
        if messages:
            break
        assert time.monotonic() < deadline, "the foreign message vanished"
    assert messages[0]["Body"] == "not an event"
    assert int(messages[0]["Attributes"]["ApproximateReceiveCount"]) >= 2


async def test_binary_attribute_and_bytes_survive_moto(make_queue: Any, adapters: Any) -> None:
    url, _, _ = make_queue()
    adapter: SqsAdapter = adapters(url)
    event = ev(bytes(range(256)), id=uuid.uuid4().hex, datacontenttype="application/octet-stream",
               blob=b"\x00\x01", flag=True, n=7)
    assert (await adapter.publish([event]))[0].ok
    got: list[Event] = []

    async def handler(delivery: Delivery) -> None:
        got.append(delivery.event)

    await consume_until(adapter, handler, lambda: bool(got))
    assert got == [event]
    assert base64.b64encode(bytes(range(256))).decode() == sqs.to_message(event).body
