"""Decoded events keep the JSON text they arrived in (`Event.raw`, `Event.raw_data`), and only while it
is a faithful encoding of them: `encode` and the bindings reuse it, a changed event never carries it.

The decoders keep raw text only with the compiled scanner (`json_format.KEEPS_RAW`); under
UMCEF_PURE=1 the fixture below plugs the pure twins in, so these tests cover both.
"""

from __future__ import annotations

import asyncio
import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from tests.gateway_process import GatewayProcess
from umcef.adapters.local import LocalStore
from umcef.fabric import sdk
from umcef.fabric.bindings import kafka as kafka_binding
from umcef.fabric.bindings.http import data_to_bytes, encode_binary
from umcef.fabric.deadletter import DeadLetterQueue
from umcef.fabric.delivery import spool_records
from umcef.fabric.event import Event, fill_defaults
from umcef.fabric.formats import json_format
from umcef.fabric.pipeline import dead_letter_copy

pytestmark = pytest.mark.pure_twin

ROOT = Path(__file__).resolve().parent.parent
BIG = 123456789012345678901234567890  # beyond 64 bits: orjson cannot hold it, the stdlib reads it exactly


@pytest.fixture(autouse=True)
def keeps_raw(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    if not json_format.KEEPS_RAW:  # pure Python: the reference twins keep raw text, exercise them here
        monkeypatch.setattr(json_format, "_decode_array", json_format._events_from_array)
        monkeypatch.setattr(json_format, "_decode_object", json_format._event_from_object)
    yield


def element(i: int, **extra: Any) -> dict[str, Any]:
    return {"specversion": "1.0", "id": f"e-{i}", "source": "https://example.com/x", "type": "t.raw",
            "partitionkey": f"k{i % 3}", "datacontenttype": "application/json", **extra}  # fmt: skip


# Element texts as odd writers spell them: spaces, escapes, `\/`, number spellings, a big integer,
# brackets and quotes inside strings, data first or last, nested data, no data, data_base64.
ODD = [
    b'{ "specversion" : "1.0", "id":"e-0","source":"https:\\/\\/example.com\\/x","type":"t.raw",'
    b'"data": {"a": [1, 2.50, 1E2, "]}\\"{["]} }',
    b'{"data":"caf\\u00e9 \\ud83d\\ude00","id":"e-1","specversion":"1.0","source":"/s","type":"t.raw",'
    b'"subject":"a,b:c"}',
    b'{"specversion":"1.0","id":"e-2","source":"/s","type":"t.raw","data":{"n":' + str(BIG).encode() + b',"m":-0}}',
    b'{"specversion":"1.0","id":"e-3","source":"/s","type":"t.raw"}',
    b'{"specversion":"1.0","id":"e-4","source":"/s","type":"t.raw","datacontenttype":"application/octet-stream",'
    b'"data_base64":"AAEC/w=="}',
    b'{"specversion":"1.0","id":"e-5","source":"/s","type":"t.raw","datacontenttype":"text/plain","data":"x \\"y\\""}',
]  # fmt: skip
ODD_BATCH = b"[\n  " + b" ,\n\t".join(ODD) + b"\r\n]\n"


def fresh(event: Event) -> bytes:
    """What `encode` writes for an event without raw text."""
    return json_format.dumps(json_format.event_to_dict(event))


def rebuilt(event: Event) -> Event:
    """An equal event that never had raw text."""
    return Event(copy.deepcopy(event.attributes), copy.deepcopy(event.data))


# --------------------------------------------------------------------------------------------------
# kept and reused


def test_batch_events_keep_their_exact_text_and_encode_reuses_it() -> None:
    events = json_format.decode_batch(ODD_BATCH)
    assert [e.raw for e in events] == ODD
    for event, text in zip(events, ODD, strict=True):
        assert json_format.encode(event) is event.raw
        assert json_format.decode(json_format.encode(event)) == event
        assert json.loads(text) == json.loads(fresh(event))  # the same JSON as a fresh encoding
    assert events[0].raw_data == b'{"a": [1, 2.50, 1E2, "]}\\"{["]}'
    assert events[1].raw_data == b'"caf\\u00e9 \\ud83d\\ude00"'
    assert events[3].raw_data is None and events[4].raw_data is None  # no data / data_base64: no data text


def test_single_event_keeps_its_text() -> None:
    for text in ODD:
        event = json_format.decode(b" \n" + text + b"\n ")
        assert event.raw == text and json_format.encode(event) == text
        assert json_format.decode(text.decode("utf-8")).raw == text  # a str body too


def test_bench_sample_round_trips_byte_for_byte() -> None:
    body = orjson.dumps([{**element(i), "data": {"orderId": i, "items": [{"sku": "S-1", "qty": 2}]}}
                         for i in range(100)])  # fmt: skip
    events = json_format.decode_batch(body)
    assert json_format.encode_batch(events) == body
    assert [json_format.encode(e) for e in events] == [fresh(e) for e in events]  # orjson wrote it: same bytes


def test_big_integers_and_base64_keep_working() -> None:
    events = json_format.decode_batch(ODD_BATCH)
    big, base64 = events[2], events[4]
    assert big.data == {"n": BIG, "m": 0}
    assert str(BIG).encode() in json_format.encode(big) and str(BIG).encode() in data_to_bytes(big)
    assert json_format.decode(json_format.encode(big)) == big
    assert base64.data == b"\x00\x01\x02\xff" and data_to_bytes(base64) == b"\x00\x01\x02\xff"
    assert json_format.decode(json_format.encode(base64)) == base64
    assert json_format.decode(fresh(big)) == big  # the fresh encoding (stdlib writer) too


def test_data_body_is_the_data_text_except_for_text_content() -> None:
    events = json_format.decode_batch(ODD_BATCH)
    assert data_to_bytes(events[0]) == events[0].raw_data
    assert data_to_bytes(events[1]) == b'"caf\\u00e9 \\ud83d\\ude00"'  # a JSON string: its JSON text
    assert orjson.loads(data_to_bytes(events[1])) == events[1].data
    assert data_to_bytes(events[5]) == b'x "y"'  # text/plain: the characters, not JSON
    assert encode_binary(events[5])[1] == b'x "y"'


def test_equality_ignores_raw_text() -> None:
    for event in json_format.decode_batch(ODD_BATCH):
        assert event.raw is not None
        assert event == rebuilt(event) and rebuilt(event).raw is None


def test_encode_batch_joins_raw_and_fresh_encodings() -> None:
    events = json_format.decode_batch(ODD_BATCH)
    mixed = [events[0], rebuilt(events[1]), events[2]]
    assert json_format.encode_batch(mixed) == b"[" + b",".join([ODD[0], fresh(mixed[1]), ODD[2]]) + b"]"
    assert json_format.decode_batch(json_format.encode_batch(mixed)) == mixed
    assert json_format.encode_batch([]) == b"[]"


# --------------------------------------------------------------------------------------------------
# not kept: the text would not be a faithful encoding


@pytest.mark.parametrize(
    "text",
    [
        b'{"specversion":"1.0",\n"id":"a","source":"/s","type":"t"}',  # several lines: one event per line
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t",\r"data":1}',
        b'{"specversion":"1.0","id":"x","id":"a","source":"/s","type":"t"}',  # a name twice
        b'{"specversion":"1.0","\\u0069d":"x","id":"a","source":"/s","type":"t"}',  # the same, escaped
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","subject":null}',  # null: dropped
        b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":1,"data":2}',
    ],
)
def test_unfaithful_text_is_not_kept(text: bytes) -> None:
    for event in (json_format.decode(text), json_format.decode_batch(b"[" + text + b"]")[0]):
        assert event.raw is None and event.raw_data is None
        assert json_format.encode(event) == fresh(event)
        assert b"\n" not in json_format.encode(event) and b"null" not in json_format.encode(event)


def test_not_an_array_element_count_mismatch_keeps_nothing() -> None:
    items = [element(0), element(1)]
    events = json_format._decode_array(items, orjson.dumps([element(0)]), 0, 0)
    assert [e.raw for e in events] == [None, None]


# --------------------------------------------------------------------------------------------------
# changed events: a new Event, encoded afresh


def test_changed_copies_are_fresh_encodings() -> None:
    event = json_format.decode_batch(ODD_BATCH)[0]
    changed = Event({**event.attributes, "subject": "new"}, event.data)
    assert changed.raw is None and b'"subject":"new"' in json_format.encode(changed)
    other_data = Event(event.attributes, {"b": 2})
    assert json_format.encode(other_data) == fresh(other_data) and data_to_bytes(other_data) == b'{"b":2}'


def test_defaults_filled_by_the_sdk_are_encoded() -> None:
    event = json_format.decode(b'{"specversion":"1.0","id":"a","source":"/s","type":"t","data":{"x":1}}')
    prepared = sdk.prepare(event)  # fills in `time`: a copy, the decoded event stays as it arrived
    assert prepared.raw is None and b'"time":' in json_format.encode(prepared)
    assert "time" not in event.attributes and json_format.encode(event) == event.raw
    attrs = fill_defaults({k: v for k, v in event.attributes.items() if k != "specversion"})
    assert json_format.encode(Event(attrs, event.data)) == fresh(Event(attrs, event.data))
    assert b'"time"' in json_format.encode(Event(attrs, event.data))


def test_dead_letter_copies_carry_their_stamps() -> None:
    event = json_format.decode_batch(ODD_BATCH)[0]
    copied = dead_letter_copy(event, "no route")
    assert copied.raw is None and b'"fabricreason":"no route"' in json_format.encode(copied)

    class Store:
        def __init__(self) -> None:
            self.payloads: list[bytes] = []

        async def append(self, records: list[Any]) -> list[int]:
            self.payloads += [r.payload for r in records]
            return [1]

    store = Store()
    asyncio.run(DeadLetterQueue(store, "_dl").put(event, "gone", destination="kafka", attempts=3))  # type: ignore[arg-type]
    stamped = orjson.loads(store.payloads[0])
    assert stamped["fabricdest"] == "kafka" and stamped["fabricattempts"] == 3 and stamped["id"] == "e-0"


def test_kafka_key_restored_on_consume_is_encoded() -> None:
    text = b'{"specversion":"1.0","id":"a","source":"/s","type":"t"}'
    msg = kafka_binding.KafkaMessage(kafka_binding._STRUCTURED_HEADERS, b"key-1", text)
    event = kafka_binding.from_structured(msg)
    assert event.attributes["partitionkey"] == "key-1" and b'"partitionkey":"key-1"' in json_format.encode(event)


def test_no_code_changes_a_decoded_event_in_place() -> None:
    """`encode` trusts `Event.raw`: the gateway never edits an event in place, it builds a new one."""
    in_place = re.compile(
        r"\.attributes(\[[^\]]*\])?\s*(=|\+=|\|=)(?!=)|\.attributes\.(setdefault|update|pop|popitem|clear)\("
        r"|del \w+\.attributes\[|\b(event|ev|e)\.data\s*=(?!=)|fill_defaults\(\w+\.attributes"
    )
    # (the constructors: `Event.unread` fills a new instance)
    allowed = {"fabric/event.py": {"self.attributes = attributes", "event.attributes = attributes"}}
    offenders = []
    for top in ("fabric", "adapters", "router"):
        for path in sorted((ROOT / top).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for number, line in enumerate(path.read_text().splitlines(), 1):
                if in_place.search(line) and line.strip() not in allowed.get(rel, set()):
                    offenders.append(f"{rel}:{number}: {line.strip()}")
    assert not offenders, "events changed in place (build a new Event instead):\n" + "\n".join(offenders)


# --------------------------------------------------------------------------------------------------
# the hot path: spool payloads, Kafka records


def test_spool_payloads_are_the_arrived_text_and_decode_equal_after_a_restart(tmp_path: Path) -> None:
    events = json_format.decode_batch(ODD_BATCH)
    records = spool_records(events, [("kafka",)] * len(events), {"kafka": "_spool.kafka"})
    assert [r.payload for r in records] == ODD
    with LocalStore(tmp_path / "store") as store:
        store.append_sync(records)
    with LocalStore(tmp_path / "store") as reopened:
        stored = reopened.read("_spool.kafka", 0, 100)
    assert [s.payload for s in stored] == ODD
    assert [json_format.decode(s.payload) for s in stored] == events


def test_kafka_records_are_unchanged_on_the_wire() -> None:
    body = orjson.dumps([{**element(i), "flag": True, "n": 7, "data": {"i": i, "s": "ü[]"}} for i in range(5)])
    for event in json_format.decode_batch(body):
        assert event.raw is not None
        assert kafka_binding.binary_record(event) == kafka_binding.binary_record(rebuilt(event))
        assert kafka_binding.to_binary(event) == kafka_binding.to_binary(rebuilt(event))
        assert kafka_binding.to_structured(event) == kafka_binding.to_structured(rebuilt(event))


def test_kafka_value_of_an_oddly_written_event_is_its_data_text() -> None:
    event = json_format.decode_batch(ODD_BATCH)[0]
    headers, key, value, bound = kafka_binding.binary_record(event)
    plain = kafka_binding.binary_record(rebuilt(event))
    assert value == event.raw_data and orjson.loads(value) == orjson.loads(plain[2])  # type: ignore[arg-type]
    assert (headers, key) == (plain[0], plain[1])
    assert bound - len(value) == plain[3] - len(plain[2])  # type: ignore[arg-type]
    assert kafka_binding.encoded_size(kafka_binding.KafkaMessage(tuple(headers), key, value)) <= bound


def test_gateway_stores_the_request_text(tmp_path: Path) -> None:
    """End to end: what the gateway stores for an accepted batch is the request's own element text."""
    gateway = GatewayProcess(tmp_path / "data")
    try:
        response = httpx.post(f"{gateway.url}/v1/events", content=ODD_BATCH,
                              headers={"content-type": "application/cloudevents-batch+json"}, timeout=10)
        assert response.status_code == 202, response.text
    finally:
        gateway.stop()
    with LocalStore(tmp_path / "data") as store:
        stored = {json_format.decode(s.payload).id: s.payload for s in store.read("default", 0, 100)}
    events = {e.id: e for e in json_format.decode_batch(ODD_BATCH)}
    assert {i: json_format.decode(p) for i, p in stored.items()} == events
    if json_format.KEEPS_RAW:  # (the gateway process decides for itself: not under UMCEF_PURE=1)
        assert sorted(stored.values()) == sorted(ODD)
