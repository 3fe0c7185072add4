"""Events decoded with the compiled parser keep `data` as its JSON text until something reads it
(`Event.unread`), and are otherwise exactly what the full decoding path (orjson) gives.

Compiled only: the pure twins always take the full path (see json_format's "unread data").
"""

from __future__ import annotations

import copy
import pickle
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests import json_text
from umcef.fabric.bindings import kafka as kafka_binding
from umcef.fabric.bindings.http import data_to_bytes
from umcef.fabric.delivery import spool_records
from umcef.fabric.errors import EventError, MalformedBody
from umcef.fabric.event import _UNREAD, Event
from umcef.fabric.formats import json_format
from umcef.router.cost import event_size

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
from _sample import ATTRIBUTES, ORDER


def batch_body(n: int = 5) -> bytes:
    return orjson.dumps([{**ATTRIBUTES, "id": f"e-{i}", "data": ORDER} for i in range(n)])


def full_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(json_format, "_parse_events", None)


def outcome(decode: Any, body: bytes) -> Any:
    """What a decoder gives for `body`: every event's attributes (in order), data and raw text, or the
    error's type and text. `raw_data`, where set, must be the data's JSON text (the full path's scanner
    misses a `data` member whose name is written with escapes, the parser does not)."""
    try:
        events = decode(body)
    except EventError as exc:
        return type(exc).__name__, str(exc)
    if isinstance(events, Event):
        events = [events]
    for e in events:
        assert e.raw_data is None or (e.data is not None and json_format.loads(e.raw_data) == e.data)
    return [(list(e.attributes.items()), e.data, e.raw) for e in events]


def test_the_compiled_parser_is_in_use() -> None:
    # The rest of this file would prove nothing on the full path: fail loudly rather than pass.
    assert json_format.UNREAD_DATA


def test_batch_events_leave_data_unread_and_forward_its_text() -> None:
    body = batch_body()
    events = json_format.decode_batch(body)
    assert all(e._data is _UNREAD for e in events)
    value = kafka_binding.binary_record(events[0])[2]
    assert value == events[0].raw_data == orjson.dumps(ORDER)
    assert [r.payload for r in spool_records(events, [("k",)] * len(events), {"k": "_spool.k"})] == \
        [e.raw for e in events]
    assert event_size(events[0]) > len(value)
    assert all(e._data is _UNREAD for e in events)  # none of that parsed the data
    assert events[0].data == ORDER  # reading it does, once
    assert events[0]._data is events[0].data


def test_single_event_and_spooled_payload_leave_data_unread() -> None:
    text = orjson.dumps({**ATTRIBUTES, "data": ORDER})
    event = json_format.decode(text)
    assert event._data is _UNREAD and event.raw is text  # a body that is just the event is not copied
    assert event.data == ORDER


@pytest.mark.parametrize("n", [-9_300_000_000_000_000_000, -(2**63) - 1, 2**64, 123456789012345678901234567890])
def test_integers_beyond_64_bits_stay_exact(n: int) -> None:
    # orjson reads these as floats; 19 digits are enough below -2**63.
    body = b'[{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"n":%d}}]' % n
    assert json_format.decode_batch(body)[0].data == {"n": n}
    assert type(json_format.loads(b"%d" % n)) is int


def test_unread_events_compare_pickle_and_copy_by_value_and_keep_their_text() -> None:
    event = json_format.decode_batch(batch_body(1))[0]
    plain = Event(dict(event.attributes), ORDER)
    for twin in (pickle.loads(pickle.dumps(event)), copy.copy(event), copy.deepcopy(event)):
        assert twin._data is _UNREAD and (twin.raw, twin.raw_data) == (event.raw, event.raw_data)
        assert twin == plain
    assert event == plain  # (reads the data)
    for twin in (pickle.loads(pickle.dumps(event)), copy.copy(event)):
        assert twin._data == ORDER and (twin.raw, twin.raw_data) == (event.raw, event.raw_data)


def test_a_text_body_with_a_lone_surrogate_is_malformed() -> None:
    # A str body (the SQS binding's) cannot always be encoded to bytes: orjson says what is wrong with it.
    body = '{"specversion":"1.0","id":"1","source":"/s","type":"t","data":"\ud800"}'
    with pytest.raises(MalformedBody):
        json_format.decode(body)
    with pytest.raises(MalformedBody):
        json_format.decode_batch("[" + body + "]")


def test_a_json_string_is_text_under_a_text_content_type() -> None:
    body = orjson.dumps([{**ATTRIBUTES, "datacontenttype": "text/plain", "data": "caf\u00e9"},
                         {**ATTRIBUTES, "id": "x2", "data": "caf\u00e9"}])
    text_event, json_event = json_format.decode_batch(body)
    assert data_to_bytes(text_event) == "caf\u00e9".encode()
    assert data_to_bytes(json_event) == '"caf\u00e9"'.encode()  # the JSON text, as it came


@pytest.mark.parametrize("body", [
    b"not json", b"{}", b'{"a": 1}', b"[1, 2]", b'[{"specversion": "1.0"}]', b"[]", b"[null]",
    orjson.dumps([{**ATTRIBUTES, "data": None}]),
    orjson.dumps([{**ATTRIBUTES, "data_base64": "aGk="}]),
    orjson.dumps([{**ATTRIBUTES, "data": 1, "data_base64": "aGk="}]),
    orjson.dumps([{**ATTRIBUTES, "subject": None, "data": ORDER}]),
    b'[{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"n":123456789012345678901234567890}}]',
    b'[{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"n":-9300000000000000000}}]',
    b'[{"specversion":"1.0","id":"1","source":"/s","type":"t","id":"2","data":{"a":1}}]',
    b'[{"specversion":"1.0","id":"1","source":"/s","type":"t",\n"data":{"a":1}}]',
    b'[{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"a":1}}]  ',
    b'[{"specversion":"1.0","id":"1","source":"/s","type":"t","d\\u0061ta":{"a":1}}]',
    b'[{"specversion":"1.0","id":"1","source":"/s","type":"t","data":{"a":1}},]',
])  # fmt: skip
def test_odd_bodies_decode_as_the_full_path_decodes_them(monkeypatch: pytest.MonkeyPatch, body: bytes) -> None:
    fast = outcome(json_format.decode_batch, body)
    full_path(monkeypatch)
    assert fast == outcome(json_format.decode_batch, body)


extension_names = st.sampled_from(["subject", "partitionkey", "traceparent", "priorityclass", "n1", "Bad"])
elements = st.fixed_dictionaries(
    {"specversion": st.sampled_from(["1.0", "0.3"]), "id": json_text.tricky_text, "source": st.just("/s"),
     "type": st.sampled_from(["t", ""])},
    optional={"data": json_text.values, "data_base64": st.sampled_from(["aGk=", "!"]),
              "datacontenttype": st.sampled_from(["application/json", "text/plain"])},
).flatmap(lambda base: st.dictionaries(extension_names, json_text.scalars, max_size=3).map(
    lambda more: {**base, **more}))  # fmt: skip


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_text.array_texts(st.one_of(elements, json_text.values)), single=st.booleans(),
       limit=st.sampled_from([0, 2]))  # fmt: skip
def test_any_body_decodes_as_the_full_path_decodes_it(body: bytes, single: bool, limit: int) -> None:
    if single:
        items = orjson.loads(body)
        body = orjson.dumps(items[0]) if items else body

    def decode(text: bytes) -> Any:
        return json_format.decode(text) if single else json_format.decode_batch(text, max_batch=limit)

    fast = outcome(decode, body)
    saved = json_format._parse_events
    json_format._parse_events = None  # (hypothesis runs many examples per test: no monkeypatch fixture)
    try:
        assert fast == outcome(decode, body)
    finally:
        json_format._parse_events = saved


@settings(max_examples=300, deadline=None)
@given(index=st.integers(0, 10_000), byte=st.sampled_from([b'"', b"\\", b"{", b"]", b",", b"\x80", b"\xff", b"\n",
                                                           b"", b"0", b"null"]))  # fmt: skip
def test_broken_bodies_fail_as_the_full_path_says(index: int, byte: bytes) -> None:
    body = batch_body(2)
    broken = body[:index % len(body)] + byte + body[index % len(body) + 1:]
    fast = outcome(json_format.decode_batch, broken)
    saved = json_format._parse_events
    json_format._parse_events = None
    try:
        assert fast == outcome(json_format.decode_batch, broken)
    finally:
        json_format._parse_events = saved
