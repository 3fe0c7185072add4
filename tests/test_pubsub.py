"""The Pub/Sub mapping (`umcef.fabric.bindings.pubsub`) and what the adapter adds beyond the conformance suite.

1. The binding, pure: hypothesis round trips in both modes and through the auto-selecting pair,
   the structured-mode fallback exactly at Pub/Sub's attribute limits, mode detection, ordering keys,
   and the byte sizes checked against google-cloud-pubsub's own protobuf serialization.
2. The adapter without a broker: URLs and options, error classification, how publish splits batches,
   isolates a refused message and keeps a failed ordering key from being overtaken (fake GAPIC client).
3. The adapter on Google's emulator: lease extension for a slow handler, bounded in-flight, stop hands
   back what was not handled, an ordered nack hands back the messages behind it, attempts from memory
   and from a dead-letter policy, messages that are not CloudEvents, the structured fallback end to end.

Values compare in their canonical string form (`canonical`): Pub/Sub attributes are strings, which is
lossless within the CloudEvents type system (see docs/mapping-pubsub.md).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import string
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest
from google.api_core import exceptions as google_errors
from google.protobuf import duration_pb2
from google.pubsub_v1 import types as pubsub_types
from google.rpc import error_details_pb2
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tests.brokers import PubsubEmulator, unique_name
from tests.roundtrip import canonical
from umcef.adapters import open_adapter
from umcef.adapters import pubsub as adapter_mod
from umcef.adapters.contract import (
    Delivery,
    NotFound,
    Rejected,
    Throttled,
    Transient,
    Unauthorized,
)
from umcef.fabric.bindings import pubsub as binding
from umcef.fabric.errors import EventError, InvalidAttribute, UnsupportedMediaType
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.validation import validate_attributes

pure_twin = pytest.mark.pure_twin  # the binding tests run again on the pure-Python validator in CI


def base_attributes(**extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": "e-1", "source": "https://example.com/src", "type": "t", **extra}


# ==================================================================================================
# 1. the binding


_SAFE_TEXT = st.text(
    alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Co", "Cn")), min_size=0, max_size=30
)
_NAMES = st.text(alphabet=string.ascii_lowercase + string.digits, min_size=1, max_size=12).filter(
    lambda n: n not in ("id", "source", "type", "specversion", "time", "subject", "dataschema",
                        "datacontenttype", "data")
)
_EXTENSION_VALUES = st.one_of(
    _SAFE_TEXT, st.integers(-(2**31), 2**31 - 1), st.booleans(), st.binary(max_size=40)
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | _SAFE_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_SAFE_TEXT, inner, max_size=4),
    max_leaves=10,
)
# (datacontenttype, data): raw bytes only under a non-JSON type, where every mode carries them as-is
# (under a JSON type the JSON format would re-serialize JSON bytes, which is the format's business).
_CONTENT = st.one_of(
    st.tuples(st.none(), _JSON),
    st.tuples(st.just("application/json"), _JSON),
    st.tuples(st.just("application/octet-stream"), st.binary(max_size=200) | st.none()),
    st.tuples(st.just("text/plain; charset=utf-8"), _SAFE_TEXT),
    st.tuples(st.just("application/cloudevents+json"), st.just({"specversion": "1.0", "id": "inner"})),
)


@st.composite
def events(draw: st.DrawFn, max_extensions: int = 8) -> Event:
    attrs = base_attributes(id=draw(_SAFE_TEXT.filter(bool)), type=draw(_SAFE_TEXT.filter(bool)))
    if draw(st.booleans()):
        attrs["subject"] = draw(_SAFE_TEXT.filter(bool))
    if draw(st.booleans()):
        attrs["time"] = draw(st.sampled_from(["2026-11-21T10:00:00Z", "2026-11-21T12:00:00.123456789+02:00"]))
    if draw(st.booleans()):
        attrs["dataschema"] = "https://schemas.example/v1"
    if draw(st.booleans()):
        attrs["partitionkey"] = draw(_SAFE_TEXT.filter(bool))
    attrs.update(draw(st.dictionaries(_NAMES, _EXTENSION_VALUES, max_size=max_extensions)))
    content_type, data = draw(_CONTENT)
    if content_type is not None:
        attrs["datacontenttype"] = content_type
    try:
        validate_attributes(attrs)
    except EventError:
        assume(False)
    return Event(attrs, data)


@pure_twin
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_binary_round_trip(event: Event) -> None:
    message = binding.to_binary(event)
    assert all(isinstance(v, str) for v in message.attributes.values())
    assert canonical(binding.from_binary(message)) == canonical(event)
    assert canonical(binding.from_message(message)) == canonical(event)


@pure_twin
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events())
def test_structured_round_trip(event: Event) -> None:
    message = binding.to_structured(event)
    assert message.attributes == {"content-type": "application/cloudevents+json"}
    assert canonical(binding.from_structured(message)) == canonical(event)
    assert canonical(binding.from_message(message)) == canonical(event)


@pure_twin
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events(max_extensions=0), st.integers(0, 130), st.integers(0, 1100), st.integers(230, 270))
def test_auto_mode_round_trip_across_the_limits(event: Event, extensions: int, value_bytes: int,
                                                name_length: int) -> None:
    """Random events pushed across each limit: to_message/from_message is lossless whichever mode it picks,
    and picks binary mode exactly when the binary attributes fit."""
    attrs = dict(event.attributes)
    attrs.update({f"x{i}": f"v{i}" for i in range(extensions)})
    attrs["big"] = "é" * (value_bytes // 2) + "a" * (value_bytes % 2)
    attrs["n" * name_length] = "long name"
    event = Event(attrs, event.data)
    message = binding.to_message(event)
    fits = binding.attribute_limit_exceeded(binding.to_binary(event).attributes) is None
    assert (message == binding.to_binary(event)) is fits
    assert (message == binding.to_structured(event)) is not fits
    assert canonical(binding.from_message(message)) == canonical(event)


@pure_twin
def test_fallback_at_exactly_100_attributes() -> None:
    """`content-type` counts: it is one of the message's attributes."""
    attrs = base_attributes(datacontenttype="text/plain")
    attrs.update({f"x{i}": "v" for i in range(100 - len(attrs))})
    assert len(binding.to_binary(Event(attrs, "d")).attributes) == 100
    assert "ce-id" in binding.to_message(Event(attrs, "d")).attributes
    attrs["onemore"] = "v"
    message = binding.to_message(Event(attrs, "d"))
    assert message.attributes == {"content-type": "application/cloudevents+json"}
    assert canonical(binding.from_message(message)) == canonical(Event(attrs, "d"))


@pure_twin
def test_fallback_at_256_byte_keys() -> None:
    fits = base_attributes(**{"k" * 253: "v"})  # "ce-" + 253 = 256 bytes
    assert "ce-" + "k" * 253 in binding.to_message(Event(fits)).attributes
    over = base_attributes(**{"k" * 254: "v"})
    assert binding.to_message(Event(over)).attributes == {"content-type": "application/cloudevents+json"}


@pure_twin
@pytest.mark.parametrize(("value", "binary"), [
    ("a" * 1024, True),
    ("a" * 1025, False),
    ("a" * 1022 + "é", True),        # 1024 bytes in 1023 characters
    ("a" * 1023 + "é", False),       # 1025 bytes in 1024 characters: bytes count, not characters
    ("𝄞" * 256, True),               # 4-byte characters: 1024 bytes
])
def test_fallback_at_1024_byte_values(value: str, binary: bool) -> None:
    event = Event(base_attributes(subject=value))
    message = binding.to_message(event)
    assert ("ce-subject" in message.attributes) is binary
    assert canonical(binding.from_message(message)) == canonical(event)


@pure_twin
def test_binary_attribute_values_count_as_their_base64() -> None:
    fits = Event(base_attributes(blob=bytes(768)))      # base64: 1024 characters
    over = Event(base_attributes(blob=bytes(769)))      # base64: 1028 characters
    assert "ce-blob" in binding.to_message(fits).attributes
    assert "ce-blob" not in binding.to_message(over).attributes
    assert binding.from_message(binding.to_message(over)).attributes["blob"] == base64.b64encode(bytes(769)).decode()


@pure_twin
def test_binary_mode_wire_form() -> None:
    event = Event(base_attributes(datacontenttype="application/json", partitionkey="order-7", flag=True,
                                  n=-5, blob=b"\x00\xff", time="2026-11-21T10:00:00Z"), {"a": 1})
    message = binding.to_binary(event)
    assert message == binding.PubsubMessage(b'{"a":1}', {
        "ce-specversion": "1.0", "ce-id": "e-1", "ce-source": "https://example.com/src", "ce-type": "t",
        "content-type": "application/json", "ce-partitionkey": "order-7", "ce-flag": "true", "ce-n": "-5",
        "ce-blob": "AP8=", "ce-time": "2026-11-21T10:00:00Z"}, "order-7")


@pure_twin
def test_ordering_key() -> None:
    assert binding.ordering_key(Event(base_attributes())) == ""
    assert binding.ordering_key(Event(base_attributes(partitionkey="k-1"))) == "k-1"
    exact = "é" * 512  # 1024 bytes
    assert binding.ordering_key(Event(base_attributes(partitionkey=exact))) == exact
    long_key = "é" * 512 + "a"
    digest = binding.ordering_key(Event(base_attributes(partitionkey=long_key)))
    assert digest.startswith("sha256:") and len(digest) == 7 + 64
    assert digest == binding.ordering_key(Event(base_attributes(id="other", partitionkey=long_key)))
    assert digest != binding.ordering_key(Event(base_attributes(partitionkey=long_key + "b")))
    # Such an event is structured (its partitionkey value is over 1024 bytes too) and keeps the real key.
    message = binding.to_message(Event(base_attributes(partitionkey=long_key)))
    assert message.ordering_key == digest
    assert binding.from_message(message).attributes["partitionkey"] == long_key


@pure_twin
def test_event_whose_data_is_a_structured_event_stays_binary() -> None:
    inner = {"specversion": "1.0", "id": "inner", "source": "/s", "type": "t"}
    event = Event(base_attributes(datacontenttype="application/cloudevents+json"), inner)
    decoded = binding.from_message(binding.to_message(event))
    assert decoded.id == "e-1" and canonical(decoded) == canonical(event)


@pure_twin
def test_decoding_ignores_foreign_attributes_and_empty_data() -> None:
    message = binding.PubsubMessage(b"", {"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s",
                                          "ce-type": "t", "googclient_schemaencoding": "JSON", "Origin": "x"})
    event = binding.from_message(message)
    assert event.attributes == {"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}
    assert event.data is None


@pure_twin
@pytest.mark.parametrize(("attributes", "error"), [
    ({}, UnsupportedMediaType),
    ({"content-type": "application/json"}, UnsupportedMediaType),
    ({"content-type": "application/cloudevents-batch+json"}, UnsupportedMediaType),
    ({"content-type": "application/cloudevents+protobuf"}, UnsupportedMediaType),
    ({"ce-specversion": "1.0", "ce-source": "/s", "ce-type": "t"}, InvalidAttribute),             # no id
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-Bad": "x"}, InvalidAttribute),
    ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t",
      "content-type": "text/plain", "ce-datacontenttype": "text/plain"}, InvalidAttribute),
])
def test_messages_that_are_not_cloudevents(attributes: dict[str, str], error: type[EventError]) -> None:
    with pytest.raises(error):
        binding.from_message(binding.PubsubMessage(b"x", attributes))


@pure_twin
def test_structured_mode_with_parameters_and_bad_json() -> None:
    event = Event(base_attributes(), None)
    body = json_format.encode(event)
    with_parameters = {"content-type": "application/cloudevents+json; charset=utf-8"}
    decoded = binding.from_message(binding.PubsubMessage(body, with_parameters))
    assert canonical(decoded) == canonical(event)
    with pytest.raises(EventError):
        binding.from_message(binding.PubsubMessage(b"{nope", {"content-type": "application/cloudevents+json"}))


# -- sizes, against the protobuf google-cloud-pubsub serializes ------------------------------------

_ANY_TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=300)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=3000), st.dictionaries(_ANY_TEXT, _ANY_TEXT, max_size=6), _ANY_TEXT)
def test_message_size_is_the_protobuf_size(data: bytes, attributes: dict[str, str], key: str) -> None:
    message = binding.PubsubMessage(data, attributes, key)
    raw = pubsub_types.PubsubMessage.pb()(data=data, attributes=attributes, ordering_key=key)
    assert binding.message_size(message) == raw.ByteSize()


@settings(max_examples=100, deadline=None)
@given(st.lists(st.binary(max_size=20_000), min_size=1, max_size=5), st.text(max_size=300))
def test_request_size_is_the_protobuf_size(payloads: list[bytes], topic: str) -> None:
    messages = [binding.PubsubMessage(p, {"ce-id": "x"}) for p in payloads]
    raw = pubsub_types.PublishRequest.pb()(
        topic=topic, messages=[pubsub_types.PubsubMessage.pb()(data=m.data, attributes=m.attributes) for m in messages])
    assert binding.request_size(topic, [binding.message_size(m) for m in messages]) == raw.ByteSize()


@pytest.mark.parametrize("topic_length", [0, 1, 20, 127, 128, 300, 16_384])
def test_max_message_size_fills_one_request_exactly(topic_length: int) -> None:
    topic = "t" * topic_length
    largest = binding.max_message_size(topic)
    assert binding.request_size(topic, [largest]) == binding.MAX_REQUEST_BYTES
    assert binding.request_size(topic, [largest + 1]) > binding.MAX_REQUEST_BYTES


# ==================================================================================================
# 2. the adapter without a broker


def test_urls_and_options(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PUBSUB_EMULATOR_HOST", raising=False)
    sink = adapter_mod.from_url("pubsub://my-proj/orders")
    assert sink.location.topic_path == "projects/my-proj/topics/orders"
    assert sink.location.subscription_path is None and sink.location.emulator is None
    source = adapter_mod.from_url("pubsub://example.com:app/a%25b/sub+1?endpoint=europe-west1-pubsub.googleapis.com")
    assert source.location.topic_path == "projects/example.com:app/topics/a%b"
    assert source.location.subscription_path == "projects/example.com:app/subscriptions/sub+1"
    assert source.location.endpoint == "europe-west1-pubsub.googleapis.com"
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", "127.0.0.1:1")
    assert adapter_mod.from_url("pubsub://p/topic").location.emulator == "127.0.0.1:1"
    assert adapter_mod.from_url("pubsub://p/topic", emulator="127.0.0.1:2").location.emulator == "127.0.0.1:2"
    in_query = adapter_mod.from_url("pubsub://p/topic?emulator=127.0.0.1:3", emulator="x:2")
    assert in_query.location.emulator == "127.0.0.1:3"
    assert isinstance(open_adapter("pubsub://p/topic"), adapter_mod.PubsubAdapter)
    capabilities = sink.capabilities
    assert capabilities.max_event_bytes == binding.max_message_size("projects/my-proj/topics/orders")
    assert (capabilities.max_attributes, capabilities.max_batch, capabilities.ordering) == (100, 1000, True)
    assert adapter_mod.from_url("pubsub://p/topic", max_event_bytes=1000).capabilities.max_event_bytes == 1000


@pytest.mark.parametrize("url", [
    "pubsub://p", "pubsub://p/", "pubsub://p/t/s/x", "pubsub:///t", "pubsub://p//s", "kafka://p/t",
    "pubsub://user:secret@p/t", "pubsub://p/t?credentials=x",
])
def test_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        adapter_mod.from_url(url)


def test_bad_options() -> None:
    with pytest.raises(TypeError, match="lease_secs"):
        adapter_mod.from_url("pubsub://p/t", lease_secs=30)
    with pytest.raises(ValueError, match="lease_seconds"):
        adapter_mod.from_url("pubsub://p/t", lease_seconds=5)


def _retry_info(seconds: int) -> Any:
    return error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds))


@pytest.mark.parametrize(("error", "kind"), [
    (google_errors.NotFound("Topic not found"), NotFound),
    (google_errors.PermissionDenied("no"), Unauthorized),
    (google_errors.Unauthenticated("who"), Unauthorized),
    (google_errors.ResourceExhausted("slow down"), Throttled),
    (google_errors.ServiceUnavailable("down"), Transient),
    (google_errors.DeadlineExceeded("slow"), Transient),
    (google_errors.InternalServerError("oops"), Transient),
    (google_errors.Aborted("retry"), Transient),
    (google_errors.InvalidArgument("bad"), Rejected),
    (ConnectionResetError("reset"), Transient),
])
def test_classification(error: Exception, kind: type[Exception]) -> None:
    classified = adapter_mod.classify(error, "publish to x")
    assert type(classified) is kind
    assert "publish to x" in str(classified)


def test_throttled_takes_retry_info() -> None:
    throttled = adapter_mod.classify(google_errors.ResourceExhausted("quota", details=[_retry_info(7)]), "x")
    assert isinstance(throttled, Throttled) and throttled.retry_after == 7.0
    assert adapter_mod.classify(google_errors.ResourceExhausted("quota"), "x").retry_after == 1.0  # type: ignore[attr-defined]


class FakePublisher:
    """Stands in for PublisherAsyncClient: records each Publish request; `fail` decides its fate."""

    def __init__(self, fail: Callable[[list[Any]], Exception | None] | None = None) -> None:
        self.requests: list[list[Any]] = []
        self.fail = fail
        self.topic_error: Exception | None = None

    async def publish(self, request: Any, retry: Any, timeout: Any) -> Any:
        messages = list(pubsub_types.PublishRequest.pb(request).messages)
        assert pubsub_types.PublishRequest.pb(request).ByteSize() <= binding.MAX_REQUEST_BYTES
        assert len(messages) <= binding.MAX_REQUEST_MESSAGES
        assert retry is None  # retries belong to the delivery layer
        self.requests.append(messages)
        error = self.fail(messages) if self.fail else None
        if error is not None:
            raise error
        return pubsub_types.PublishResponse(message_ids=[str(i) for i in range(len(messages))])

    async def get_topic(self, topic: str, retry: Any, timeout: Any) -> Any:
        if self.topic_error is not None:
            raise self.topic_error
        return pubsub_types.Topic(name=topic)


def fake_adapter(fake: FakePublisher) -> adapter_mod.PubsubAdapter:
    adapter = adapter_mod.from_url("pubsub://p/topic?emulator=127.0.0.1:1")
    adapter._publisher = fake  # type: ignore[assignment]
    return adapter


def event_with(i: int, key: str | None = None, size: int = 0, **extra: Any) -> Event:
    attrs = base_attributes(id=f"e{i}", datacontenttype="application/octet-stream", **extra)
    if key is not None:
        attrs["partitionkey"] = key
    return Event(attrs, b"x" * size)


def ids_of(messages: list[Any]) -> list[str]:
    return [m.attributes["ce-id"] for m in messages]


async def test_publish_splits_by_count_and_bytes_in_order() -> None:
    fake = FakePublisher()
    adapter = fake_adapter(fake)
    outcomes = await adapter.publish([event_with(i) for i in range(2500)])
    assert all(o.ok for o in outcomes) and [o.event_id for o in outcomes] == [f"e{i}" for i in range(2500)]
    assert [len(r) for r in fake.requests] == [1000, 1000, 500]
    fake.requests.clear()
    big = [event_with(i, size=3_000_000) for i in range(7)]
    assert all(o.ok for o in await adapter.publish(big))
    assert [len(r) for r in fake.requests] == [3, 3, 1]
    assert [i for r in fake.requests for i in ids_of(r)] == [f"e{i}" for i in range(7)]


async def test_oversized_event_is_rejected_before_sending_with_the_limit() -> None:
    fake = FakePublisher()
    adapter = fake_adapter(fake)
    limit = adapter.capabilities.max_event_bytes
    fitting = event_with(0, size=100)
    for _ in range(3):  # the data's length prefix grows by a byte or so on the way
        fitting.data = b"x" * (len(fitting.data) + limit - adapter.encoded_size(fitting))
    assert adapter.encoded_size(fitting) == limit
    over = event_with(1, size=len(fitting.data) + 1)
    outcomes = await adapter.publish([fitting, over])
    assert outcomes[0].ok
    assert isinstance(outcomes[1].error, Rejected) and str(limit) in str(outcomes[1].error)
    assert [ids_of(r) for r in fake.requests] == [["e0"]]


async def test_a_refused_message_does_not_take_its_neighbours_down() -> None:
    fake = FakePublisher(lambda ms: google_errors.InvalidArgument("bad attribute")
                         if any("ce-bad" in m.attributes for m in ms) else None)
    outcomes = await fake_adapter(fake).publish([event_with(0), event_with(1, bad="x"), event_with(2)])
    assert [type(o.error) for o in outcomes] == [type(None), Rejected, type(None)]
    assert [ids_of(r) for r in fake.requests] == [["e0", "e1", "e2"], ["e0"], ["e1"], ["e2"]]


async def test_a_failed_ordering_key_is_not_overtaken() -> None:
    """Request 1 (e0 key a, e1 key b) fails for now; e2 (key a) must not go ahead of e0, e3 (key c) may."""
    calls = 0

    def first_fails(_: list[Any]) -> Exception | None:
        nonlocal calls
        calls += 1
        return google_errors.ServiceUnavailable("blip") if calls == 1 else None

    fake = FakePublisher(first_fails)
    batch = [event_with(0, "a", 4_000_000), event_with(1, "b", 4_000_000), event_with(2, "a", 4_000_000),
             event_with(3, "c", 4_000_000)]
    outcomes = await fake_adapter(fake).publish(batch)
    assert [type(o.error) for o in outcomes] == [Transient, Transient, Transient, type(None)]
    assert [ids_of(r) for r in fake.requests] == [["e0", "e1"], ["e3"]]
    assert [m.ordering_key for r in fake.requests for m in r] == ["a", "b", "c"]


async def test_a_missing_topic_fails_the_whole_call_once() -> None:
    fake = FakePublisher(lambda _: google_errors.NotFound("Topic not found"))
    outcomes = await fake_adapter(fake).publish([event_with(i, size=4_000_000) for i in range(5)])
    assert all(isinstance(o.error, NotFound) for o in outcomes)
    assert len(fake.requests) == 1


async def test_probe_counts_permission_denied_as_a_round_trip() -> None:
    fake = FakePublisher()
    adapter = fake_adapter(fake)
    fake.topic_error = google_errors.PermissionDenied("pubsub.topics.get denied")
    assert await adapter.probe() > 0
    fake.topic_error = google_errors.NotFound("Topic not found")
    with pytest.raises(NotFound):
        await adapter.probe()
    fake.topic_error = google_errors.Unauthenticated("bad token")
    with pytest.raises(Unauthorized):
        await adapter.probe()


async def test_closed_adapter_and_sink_urls_refuse_cleanly() -> None:
    adapter = adapter_mod.from_url("pubsub://p/topic?emulator=127.0.0.1:1")
    with pytest.raises(NotFound, match="no subscription"):
        await adapter.consume(lambda d: d.ack())
    await adapter.close()
    await adapter.close()  # idempotent
    (outcome,) = await adapter.publish([event_with(0)])
    assert isinstance(outcome.error, Transient)
    with pytest.raises(Transient):
        await adapter.probe()


# ==================================================================================================
# 3. the adapter on Google's emulator


class Entities:
    """Fresh topics and subscriptions on the emulator (admin through the synchronous clients)."""

    def __init__(self, emulator: PubsubEmulator) -> None:
        self.emulator = emulator
        self.publisher = emulator.publisher_client()
        self.subscriber = emulator.subscriber_client()

    async def make(self, *, dead_letter_after: int | None = None, ordered: bool = True) -> tuple[str, str, str]:
        """(sink URL, source URL, dead-letter subscription path or "")."""
        return await asyncio.to_thread(self._make, dead_letter_after, ordered)

    def _make(self, dead_letter_after: int | None, ordered: bool) -> tuple[str, str, str]:
        project, host = self.emulator.project, self.emulator.host
        topic, subscription = unique_name("pst"), unique_name("pst-sub")
        topic_path = self.publisher.topic_path(project, topic)
        self.publisher.create_topic(name=topic_path)
        request: dict[str, Any] = {"name": self.subscriber.subscription_path(project, subscription),
                                   "topic": topic_path, "ack_deadline_seconds": 10, "enable_message_ordering": ordered}
        dead_path = ""
        if dead_letter_after is not None:
            dead_topic = self.publisher.topic_path(project, unique_name("pst-dlq"))
            self.publisher.create_topic(name=dead_topic)
            dead_path = self.subscriber.subscription_path(project, unique_name("pst-dlq-sub"))
            self.subscriber.create_subscription(request={"name": dead_path, "topic": dead_topic})
            request["dead_letter_policy"] = {"dead_letter_topic": dead_topic,
                                             "max_delivery_attempts": dead_letter_after}
        self.subscriber.create_subscription(request=request)
        return (f"pubsub://{project}/{topic}?emulator={host}",
                f"pubsub://{project}/{topic}/{subscription}?emulator={host}", dead_path)

    def pull_raw(self, subscription_path: str) -> list[Any]:
        response = self.subscriber.pull(request={"subscription": subscription_path, "max_messages": 100},
                                        timeout=10)
        if response.received_messages:
            self.subscriber.acknowledge(subscription=subscription_path,
                                        ack_ids=[m.ack_id for m in response.received_messages])
        return list(response.received_messages)

    def close(self) -> None:
        for client in (self.publisher, self.subscriber):
            with contextlib.suppress(Exception):
                client.transport.close()


@pytest.fixture
def entities(pubsub_emulator: PubsubEmulator) -> Iterator[Entities]:
    made = Entities(pubsub_emulator)
    yield made
    made.close()


@contextlib.asynccontextmanager
async def opened(url: str, **options: Any) -> AsyncIterator[adapter_mod.PubsubAdapter]:
    adapter = adapter_mod.from_url(url, **options)
    try:
        yield adapter
    finally:
        await adapter.close()


class Consuming:
    """consume() in the background; `seen` lists (event id, attempt) in handling order."""

    def __init__(self, adapter: adapter_mod.PubsubAdapter, behaviour: Callable[[Delivery], Any] | None = None,
                 max_in_flight: int = 64) -> None:
        self.adapter = adapter
        self.behaviour = behaviour
        self.seen: list[tuple[str, int]] = []
        self.events: dict[str, Event] = {}
        self.task = asyncio.create_task(adapter.consume(self.handle, max_in_flight=max_in_flight))

    async def handle(self, delivery: Delivery) -> None:
        self.seen.append((delivery.event.id, delivery.attempt))
        self.events[delivery.event.id] = delivery.event
        if self.behaviour is not None:
            await self.behaviour(delivery)

    async def until(self, predicate: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not predicate():
            if self.task.done():
                self.task.result()
                raise AssertionError(f"consume ended before {what}")
            assert time.monotonic() < deadline, f"timed out waiting for {what}; seen {self.seen}"
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        await self.adapter.stop_consuming()
        await asyncio.wait_for(self.task, 30)


def keyed(run: str, n: int, key: str = "k") -> Event:
    return Event(base_attributes(id=f"{run}-{n}", partitionkey=key, n=n), None)


async def publish_ok(adapter: adapter_mod.PubsubAdapter, batch: list[Event]) -> None:
    outcomes = await adapter.publish(batch)
    assert all(o.ok for o in outcomes), outcomes


async def test_a_slow_handler_keeps_its_lease(entities: Entities) -> None:
    """13 s of handling against a 10 s ack deadline: the lease is extended, nothing comes back."""
    sink_url, source_url, _ = await entities.make()
    run = uuid.uuid4().hex[:8]

    async def slow(delivery: Delivery) -> None:
        if len(consuming.seen) == 1:
            await asyncio.sleep(13)

    async with opened(sink_url) as sink, opened(source_url) as source:
        await publish_ok(sink, [keyed(run, 0, key="")])
        consuming = Consuming(source, slow)
        await consuming.until(lambda: len(consuming.seen) == 1, 30, "the first delivery")
        await asyncio.sleep(14)  # past the 10 s ack deadline: the window for a redelivery that must not come
        await consuming.stop()
    assert consuming.seen == [(f"{run}-0", 1)]


async def test_in_flight_is_bounded(entities: Entities) -> None:
    sink_url, source_url, _ = await entities.make()
    run = uuid.uuid4().hex[:8]
    gate = asyncio.Event()

    async def held(delivery: Delivery) -> None:
        await gate.wait()

    async with opened(sink_url) as sink, opened(source_url) as source:
        await publish_ok(sink, [keyed(run, n, key=f"k{n}") for n in range(10)])
        consuming = Consuming(source, held, max_in_flight=3)
        await consuming.until(lambda: len(consuming.seen) == 3, 30, "three deliveries")
        await asyncio.sleep(0.5)  # a window for a fourth delivery that must not come
        assert len(consuming.seen) == 3
        gate.set()
        await consuming.until(lambda: len({i for i, _ in consuming.seen}) == 10, 30, "all ten")
        await consuming.stop()


async def test_stop_hands_back_what_was_not_handled(entities: Entities) -> None:
    """Five messages of one key: the first is being handled when stop comes. It is acked when its handler
    returns; the four waiting behind it are handed back at once (deadline 0), not acked and not held
    until their ack deadline, so a new consumer gets them well within the 10 s deadline."""
    sink_url, source_url, _ = await entities.make()
    run = uuid.uuid4().hex[:8]
    gate = asyncio.Event()

    async def first_waits(delivery: Delivery) -> None:
        if delivery.event.id == f"{run}-0":
            await gate.wait()

    async with opened(sink_url) as sink, opened(source_url) as source:
        await publish_ok(sink, [keyed(run, n) for n in range(5)])
        first = Consuming(source, first_waits)
        await first.until(lambda: len(first.seen) == 1, 30, "the first delivery")
        consumer = source._consumer
        assert consumer is not None
        await first.until(lambda: len(consumer.outstanding) == 5, 30, "the other four waiting behind the key")
        await source.stop_consuming()
        gate.set()
        await asyncio.wait_for(first.task, 30)
        assert first.seen == [(f"{run}-0", 1)]
    started = time.monotonic()
    async with opened(source_url) as source:
        second = Consuming(source)
        await second.until(lambda: len(second.seen) == 4, 30, "the four handed back")
        assert time.monotonic() - started < 5
        await second.stop()
    assert [i for i, _ in second.seen] == [f"{run}-{n}" for n in range(1, 5)]


async def test_ordered_nack_hands_back_the_messages_behind_it(entities: Entities) -> None:
    """Message 1 of a key is nacked once: 2..4, already pulled and waiting, go back with it and are
    handled after its redelivery, in order. Attempts are counted in memory (no dead-letter policy)."""
    sink_url, source_url, _ = await entities.make()
    run = uuid.uuid4().hex[:8]

    async def nack_1_once(delivery: Delivery) -> None:
        if delivery.event.id == f"{run}-1" and delivery.attempt == 1:
            await delivery.nack()

    async with opened(sink_url) as sink, opened(source_url) as source:
        await publish_ok(sink, [keyed(run, n) for n in range(5)])
        consuming = Consuming(source, nack_1_once)
        await consuming.until(lambda: len(consuming.seen) == 6, 30, "six deliveries")
        await consuming.stop()
    assert consuming.seen == [(f"{run}-0", 1), (f"{run}-1", 1), (f"{run}-1", 2),
                              (f"{run}-2", 1), (f"{run}-3", 1), (f"{run}-4", 1)]


async def test_attempt_comes_from_the_dead_letter_policy(entities: Entities) -> None:
    sink_url, source_url, _ = await entities.make(dead_letter_after=5)
    run = uuid.uuid4().hex[:8]

    async def fail_twice(delivery: Delivery) -> None:
        if delivery.attempt < 3:
            raise RuntimeError("on purpose")

    async with opened(sink_url) as sink, opened(source_url) as source:
        await publish_ok(sink, [keyed(run, 0, key="")])
        consuming = Consuming(source, fail_twice)
        await consuming.until(lambda: len(consuming.seen) == 3, 30, "three attempts")
        await consuming.stop()
    assert consuming.seen == [(f"{run}-0", 1), (f"{run}-0", 2), (f"{run}-0", 3)]


async def test_consuming_messages_that_are_not_cloudevents(entities: Entities,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    """Without a dead-letter policy: acknowledged, logged, never handed to the handler. With one: handed
    back until Pub/Sub moves it to the dead-letter topic. (Unordered: the emulator fails every Pull of an
    *ordered* subscription once it should dead-letter a message, "Application error processing RPC".)"""
    run = uuid.uuid4().hex[:8]
    caplog.set_level(logging.WARNING, logger="umcef.adapters.pubsub")
    for dead_letter_after in (None, 5):
        sink_url, source_url, dead_path = await entities.make(dead_letter_after=dead_letter_after, ordered=False)
        topic_path = adapter_mod.from_url(sink_url).location.topic_path
        await asyncio.to_thread(entities.publisher.publish(topic_path, b"not an event", origin="legacy").result)
        async with opened(sink_url) as sink, opened(source_url) as source:
            await publish_ok(sink, [keyed(run, 0, key="")])
            consuming = Consuming(source)
            await consuming.until(lambda c=consuming: len(c.seen) == 1, 30, "the real event")  # type: ignore[misc]
            if dead_path:
                dead: list[Any] = []
                deadline = time.monotonic() + 30
                while not dead and time.monotonic() < deadline:
                    dead = await asyncio.to_thread(entities.pull_raw, dead_path)
                assert [m.message.data for m in dead] == [b"not an event"]
            await consuming.stop()
        assert consuming.seen == [(f"{run}-0", 1)]
    assert "acknowledged and skipped" in caplog.text
    assert "nacked for the dead-letter topic" in caplog.text


async def test_structured_fallback_end_to_end(entities: Entities) -> None:
    """120 extensions: structured on the wire (checked with Google's own client), the same event back."""
    sink_url, source_url, _ = await entities.make()
    run = uuid.uuid4().hex[:8]
    wide = Event(base_attributes(id=f"{run}-wide", partitionkey="p", datacontenttype="text/plain",
                                 **{f"x{i}": i for i in range(120)}), "text")
    async with opened(sink_url) as sink, opened(source_url) as source:
        await publish_ok(sink, [wide])
        subscription_path = source.location.subscription_path
        raw = await asyncio.to_thread(entities.subscriber.pull,
                                      request={"subscription": subscription_path, "max_messages": 1}, timeout=10)
        (received,) = raw.received_messages
        assert dict(received.message.attributes) == {"content-type": "application/cloudevents+json"}
        assert received.message.ordering_key == "p"
        await asyncio.to_thread(entities.subscriber.modify_ack_deadline, subscription=subscription_path,
                                ack_ids=[received.ack_id], ack_deadline_seconds=0)
        consuming = Consuming(source)
        await consuming.until(lambda: len(consuming.seen) == 1, 30, "the wide event")
        await consuming.stop()
    assert canonical(consuming.events[f"{run}-wide"]) == canonical(wide)


async def test_probe_and_publish_are_bounded_when_the_broker_hangs(
        pubsub_emulator: PubsubEmulator, latency_proxy: Callable[..., Any]) -> None:
    """A blackhole (TCP accepted, nothing answered) rather than a closed port: only the call deadlines
    bound gRPC's wait for a connection that never completes its handshake."""
    proxy = latency_proxy("127.0.0.1", pubsub_emulator.port)
    proxy.set_blackhole(True)
    url = f"pubsub://{pubsub_emulator.project}/{unique_name('hang')}?emulator=127.0.0.1:{proxy.port}"
    async with opened(url, probe_timeout=1.0, publish_timeout=1.0) as adapter:
        started = time.monotonic()
        with pytest.raises(Transient):
            await adapter.probe()
        (outcome,) = await adapter.publish([event_with(0)])
        assert isinstance(outcome.error, Transient), outcome
        assert time.monotonic() - started < 5
