"""The compiled validator (`umcef._native._validate`) behaves exactly like the pure reference.

"Exactly": for every input both return None, or both raise the same exception type with the same
`attribute`, `reason` and `index`; neither mutates the dict. Inputs are random attribute dicts that
start from a valid event and are mutated at random (names, value types, unicode edge code points,
32-bit integer edges, hand-built timestamps/URIs/media types), plus random limits.

A missing extension is a failure in CI (CI=true): a skip there would hide a broken build.
"""

from __future__ import annotations

import base64
import copy
import importlib
import json
import os
from collections.abc import Callable
from typing import Any
from unittest.mock import patch

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests import json_text
from umcef.fabric import accel, validation
from umcef.fabric.errors import EventError, InvalidAttribute, MalformedBody
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

Validate = Callable[[dict[Any, Any], Any, Any], object]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def load_native(name: str = "validate_attributes") -> Any:
    """A function of the compiled module; fails the test in CI and skips it (with the reason) elsewhere."""
    try:
        module = importlib.import_module("umcef._native._validate")
    except ImportError as exc:
        message = (
            f"umcef._native._validate is not built ({exc}); build it with "
            "`.venv/bin/pip install -e . --no-build-isolation` (needs Cython and a C compiler)"
        )
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    if not hasattr(module, name):
        message = f"umcef._native._validate has no {name}: the extension is stale, rebuild it"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return getattr(module, name)


@pytest.fixture(scope="module")
def native() -> Validate:
    fn: Validate = load_native()
    return fn


@pytest.fixture(scope="module")
def compiled() -> Any:
    """The compiled module, checked to have every twin (a stale build fails in CI)."""
    for name in ("has_long_digit_run", "event_from_dict", "events_from_list"):
        load_native(name)
    return importlib.import_module("umcef._native._validate")


def outcome(fn: Validate, attrs: dict[Any, Any], max_attributes: Any, max_value_bytes: Any) -> tuple[Any, ...]:
    """What a call did, in a comparable form; also checks that the input was left untouched."""
    before = list(attrs.items())
    try:
        result = fn(attrs, max_attributes, max_value_bytes)
    except InvalidAttribute as exc:
        seen: tuple[Any, ...] = ("raised", type(exc), exc.attribute, exc.reason, exc.index, str(exc))
    except Exception as exc:  # any other exception must also be the same on both sides
        seen = ("crashed", type(exc), str(exc))
    else:
        seen = ("ok", result)
    assert list(attrs.items()) == before, "the validator mutated its input"
    return seen


def assert_twins(native: Validate, attrs: dict[Any, Any], max_attributes: Any = 0, max_value_bytes: Any = 0) -> None:
    expected = outcome(validation.validate_attributes, attrs, max_attributes, max_value_bytes)
    got = outcome(native, attrs, max_attributes, max_value_bytes)
    assert got == expected, f"native {got!r} != pure {expected!r} for {attrs!r}"


# ---------------------------------------------------------------------------------------------------
# Strategies. Each aims at a boundary of one rule, with plenty of plain random noise mixed in.

EDGE_CODE_POINTS = [
    0x00, 0x09, 0x0A, 0x1F, 0x20, 0x25, 0x7E, 0x7F, 0x80, 0x9F, 0xA0, 0xFF, 0x660, 0x7FF, 0x800,
    0xD7FF, 0xD800, 0xDBFF, 0xDC00, 0xDFFF, 0xE000, 0xFDCF, 0xFDD0, 0xFDEF, 0xFDF0, 0xFFFD, 0xFFFE,
    0xFFFF, 0x10000, 0x1FFFD, 0x1FFFE, 0x1FFFF, 0x20000, 0xEFFFF, 0x10FFFD, 0x10FFFE, 0x10FFFF,
]  # fmt: skip
URI_CHARS = "ABCXYZabcxyz0189-._~:/?#[]@!$&'()*+,;=%"
TCHARS = "!#$%&'*+.^_`|~-azAZ09"

any_char = st.one_of(
    st.sampled_from(EDGE_CODE_POINTS).map(chr),
    st.integers(0, 0x10FFFF).map(chr),  # includes lone surrogates and noncharacters
    st.characters(min_codepoint=0x20, max_codepoint=0x7E),
)
any_text = st.text(any_char, max_size=12)
uri_text = st.text(st.one_of(st.sampled_from(URI_CHARS), any_char), max_size=16)
hex_pct = st.tuples(st.sampled_from("0123456789abcdefABCDEFgG"), st.sampled_from("0123456789afAFzZ")).map(
    lambda t: "%" + t[0] + t[1]
)
uri_like = st.lists(st.one_of(uri_text, hex_pct, st.just("%"), st.just("https:")), max_size=4).map("".join)


# (width, valid range, edge values) of each numeric field: year, month, day, hour, minute, second,
# offset hours, offset minutes.
_FIELDS = [
    (4, (0, 9999), [0, 1900, 2000, 2100, 2400, 9999]),
    (2, (1, 12), [0, 1, 2, 12, 13, 99]),
    (2, (1, 28), [0, 1, 28, 29, 30, 31, 32]),
    (2, (0, 23), [0, 23, 24]),
    (2, (0, 59), [0, 59, 60]),
    (2, (0, 59), [0, 59, 60, 61]),
    (2, (0, 23), [0, 23, 24, 99]),
    (2, (0, 59), [0, 59, 60, 99]),
]


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    """RFC 3339-shaped strings, each at most a couple of fields away from valid: a field at or past
    an edge (Feb 29, 24:00, :60), junk (wrong width, non-ASCII digits), or a bad separator/zone."""
    broken = set(draw(st.lists(st.integers(0, 10), max_size=2)))
    parts = []
    for index, (width, (low, high), edges) in enumerate(_FIELDS):
        if index not in broken:
            number = draw(st.one_of(st.integers(low, high), st.sampled_from(edges)))
            parts.append(f"{number:0{width}d}")
        else:
            junk_chars = st.sampled_from("0123456789\u0660\u0661\u0662x +")  # incl. Arabic-Indic digits
            junk = st.text(junk_chars, min_size=width - 1, max_size=width + 1)
            parts.append(draw(junk))
    year, month, day, hour, minute, second, off_h, off_m = parts
    sep = draw(st.sampled_from(["T", "t", " ", "x"])) if 8 in broken else draw(st.sampled_from("Tt"))
    frac = draw(st.one_of(st.just(""), st.text(st.sampled_from("0123456789"), max_size=12).map(lambda s: "." + s)))
    if 9 in broken:
        zone = draw(st.sampled_from(["", "+0100", "+01:00Z", "Zz", "+1:00", "UTC", "+01:00:00"]))
    else:
        zone = draw(st.sampled_from(["Z", "z", f"+{off_h}:{off_m}", f"-{off_h}:{off_m}"]))
    if 10 in broken:
        frac = "."
    return f"{year}-{month}-{day}{sep}{hour}:{minute}:{second}{frac}{zone}"


leap_days = st.integers(0, 9999).map(lambda y: f"{y:04d}-02-29T00:00:00Z")
media_types = st.one_of(
    st.builds(
        lambda a, slash, b, blanks, params: f"{a}{slash}{b}{blanks}{params}",
        st.one_of(
            st.text(st.sampled_from(TCHARS), min_size=1, max_size=6),
            st.text(st.sampled_from(TCHARS + " /;\t"), max_size=8),
        ),
        st.sampled_from(["/", "/", "", "//"]),
        st.one_of(
            st.text(st.sampled_from(TCHARS), max_size=6),
            st.text(st.sampled_from(TCHARS + " ;\t"), max_size=8),
        ),
        st.sampled_from(["", " ", "\t", " \t "]),
        st.one_of(st.just(""), any_text.map(";".__add__)),
    ),
    st.sampled_from(["application/json", "text/plain; charset=utf-8", "application/cloudevents+json"]),
)
ints = st.one_of(
    st.integers(-(2**31) - 2, -(2**31) + 2),
    st.integers(2**31 - 3, 2**31 + 1),
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1]),
)
values = st.one_of(
    any_text,
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=20),  # valid ASCII
    st.text(st.characters(codec="utf-8", categories=["L", "N", "P", "S", "Zs"]), max_size=12),
    uri_like,
    timestamps(),
    media_types,
    ints,
    st.booleans(),
    st.binary(max_size=16),
    st.floats(allow_nan=False),
    st.none(),
    st.just(""),
    st.lists(st.integers(), max_size=2),
    st.sampled_from([1.0, "1.0", "1.0 ", "0.3", b"1.0", bytearray(b"x")]),
)
CORE_NAMES = ["id", "source", "type", "specversion", "time", "datacontenttype", "subject", "dataschema"]
names: st.SearchStrategy[Any] = st.one_of(
    st.sampled_from([*CORE_NAMES, "data", "data_base64", "partitionkey", "traceparent", "Ext", "ex-t", ""]),
    st.text(st.sampled_from("abcxyz0129"), min_size=1, max_size=10),
    any_text,
    st.integers(-2, 2),  # not reachable from a wire format, still must behave alike
)
ARABIC_INDIC_YEAR = "\u0662\u0660\u0662\u0664-01-01T00:00:00Z"  # int() reads these digits, RFC 3339 not
VALID = {
    "specversion": "1.0",
    "id": "A234-1234-1234",
    "source": "https://example.com/orders",
    "type": "com.example.order.placed",
    "time": "2024-02-29T23:59:60.123456789+14:00",
    "datacontenttype": "application/json; charset=utf-8",
    "dataschema": "urn:example:schema",
    "subject": "orders/ü/1",
    "partitionkey": "customer-4711",
    "count": 2**31 - 1,
    "flag": False,
    "blob": b"\x00\xff",
}


@st.composite
def attribute_dicts(draw: st.DrawFn) -> dict[Any, Any]:
    """A valid event with a few random edits (most fail somewhere, some stay valid)."""
    attrs: dict[Any, Any] = {k: v for k, v in VALID.items() if draw(st.integers(0, 9)) > 0}
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["set", "set", "delete", "rename"]))
        if edit == "set":
            attrs[draw(names)] = draw(values)
        elif attrs and edit == "delete":
            del attrs[draw(st.sampled_from(sorted(attrs, key=repr)))]
        elif attrs:
            old = draw(st.sampled_from(sorted(attrs, key=repr)))
            attrs[draw(names)] = attrs.pop(old)
    if draw(st.booleans()):  # shuffle: the first offending attribute depends on order
        items = list(attrs.items())
        attrs = dict(draw(st.permutations(items)))
    return attrs


limits = st.one_of(st.just(0), st.integers(-1, 20), st.just(2**70))
byte_limits = st.one_of(st.just(0), st.integers(-1, 40), st.just(2**70))


# ---------------------------------------------------------------------------------------------------


def test_accel_selects_native_unless_pure_requested() -> None:
    """The fast path is what the codecs actually use (UMCEF_PURE=1 turns it off on purpose)."""
    if accel.PURE_REQUESTED:
        assert accel.validate_attributes is validation.validate_attributes
        return
    load_native()
    assert accel.NATIVE, "the native validator is built but accel did not select it"


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attrs=attribute_dicts(), max_attributes=limits, max_value_bytes=byte_limits)
@example(attrs=dict(VALID), max_attributes=0, max_value_bytes=0)
@example(attrs={**VALID, 5: "x"}, max_attributes=0, max_value_bytes=0)
@example(attrs={**VALID, "time": ARABIC_INDIC_YEAR}, max_attributes=0, max_value_bytes=9)
def test_random_dicts_same_outcome(
    native: Validate, attrs: dict[Any, Any], max_attributes: Any, max_value_bytes: Any
) -> None:
    assert_twins(native, attrs, max_attributes, max_value_bytes)


@settings(max_examples=1500, deadline=None)
@given(name=st.sampled_from(["time", "expiry"]), stamp=st.one_of(timestamps(), leap_days))
def test_timestamps_same_outcome(native: Validate, name: str, stamp: str) -> None:
    # `time` goes through the timestamp rule; an extension holding one only through the string rule.
    assert_twins(native, {**VALID, name: stamp})


@settings(max_examples=1500, deadline=None)
@given(
    name=st.sampled_from(["source", "dataschema", "datacontenttype", "id", "subject", "type", "ext"]),
    value=st.one_of(uri_like, media_types, any_text),
)
def test_string_rules_same_outcome(native: Validate, name: str, value: str) -> None:
    assert_twins(native, {**VALID, name: value})


@settings(max_examples=1000, deadline=None)
@given(value=st.one_of(any_text, st.text(any_char, min_size=20, max_size=80)), delta=st.integers(-2, 2))
def test_size_limit_same_outcome(native: Validate, value: str, delta: int) -> None:
    # Byte length of non-ASCII text (1- to 4-byte UTF-8 sequences) must be counted the same way:
    # put the limit right at the value's UTF-8 length, where one byte miscounted changes the outcome.
    size = len(value.encode("utf-8", "surrogatepass"))
    assert_twins(native, {**VALID, "ext": value}, 0, max(size + delta, 60))
    assert_twins(
        native,
        {"specversion": "1.0", "id": "1", "source": "/", "type": "t", "ext": value},
        0,
        max(size + delta, 3),
    )


# Valid values per attribute; the test below moves each a single edit away from valid, which is
# where a hand-written scanner and a regex are most likely to disagree.
VALID_SAMPLES: dict[str, list[str]] = {
    "source": ["https://example.com/a?b=c#d", "/orders/1", "urn:uuid:6e8b", "a%20b", "mailto:x@y.z"],
    "dataschema": ["https://example.com/s.json", "urn:x:y", "a+b.c-d:e"],
    "datacontenttype": ["application/json", "text/plain; charset=utf-8", "a/b", "a/b ;x"],
    "time": ["2024-02-29T23:59:60Z", "1985-04-12T23:20:50.52+01:00", "2000-01-01t00:00:00.1z"],
    "id": ["abc", "ü€😀", "x y"],
    "subject": ["a/b", "ü"],
    "ext": ["v", "ü€😀"],
}
edit_chars = st.one_of(any_char, st.sampled_from("%/:;. \t+-Zz0129aF"))


@st.composite
def one_edit_away(draw: st.DrawFn) -> tuple[str, str]:
    name = draw(st.sampled_from(sorted(VALID_SAMPLES)))
    text = draw(st.sampled_from(VALID_SAMPLES[name]))
    for _ in range(draw(st.integers(1, 2))):
        at = draw(st.integers(0, len(text)))
        how = draw(st.sampled_from(["insert", "replace", "delete", "truncate"]))
        if how == "insert":
            text = text[:at] + draw(edit_chars) + text[at:]
        elif how == "replace":
            text = text[:at] + draw(edit_chars) + text[at + 1 :]
        elif how == "delete":
            text = text[:at] + text[at + 1 :]
        else:
            text = text[:at]
    return name, text


@settings(max_examples=3000, deadline=None)
@given(case=one_edit_away())
def test_one_edit_from_valid_same_outcome(native: Validate, case: tuple[str, str]) -> None:
    name, text = case
    assert_twins(native, {**VALID, name: text})


@pytest.mark.parametrize("code_point", EDGE_CODE_POINTS + list(range(0x20)) + list(range(0x7F, 0xA1)))
def test_every_edge_code_point(native: Validate, code_point: int) -> None:
    for name in ("id", "source", "type", "subject", "ext", "time", "datacontenttype", "dataschema"):
        assert_twins(native, {**VALID, name: f"a{chr(code_point)}b"})


@pytest.mark.parametrize(
    "attrs",
    [
        [("specversion", "1.0")],
        [],
        [("id", "x")],
        [("specversion", None)],
        [("specversion", 1.0), ("id", "x")],
    ],
)
def test_odd_containers_defer_to_reference(native: Validate, attrs: list[tuple[str, Any]]) -> None:
    class Sub(dict[str, Any]):
        pass

    assert_twins(native, dict(attrs))
    expected = outcome(validation.validate_attributes, Sub(attrs), 0, 0)
    assert outcome(native, Sub(attrs), 0, 0) == expected
    for limit in (None, True, 2.5):  # not an int: the reference's semantics, whatever they are
        assert outcome(native, dict(VALID), limit, limit) == outcome(
            validation.validate_attributes, dict(VALID), limit, limit
        )


# ---------------------------------------------------------------------------------------------------
# The other compiled helpers of the JSON decode path, against their pure twins in json_format.


@settings(max_examples=2000, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=80),
        st.lists(st.sampled_from([b"1", b"1" * 7, b"9" * 18, b"9" * 19, b"0" * 20, b"5" * 21, b"a", b".", b'"', b"-"]),
                 max_size=12).map(b"".join),
    ),
    as_bytearray=st.booleans(),
)  # fmt: skip
def test_long_digit_run_same_outcome(compiled: Any, body: bytes, as_bytearray: bool) -> None:
    native = compiled.has_long_digit_run
    raw: bytes | bytearray = bytearray(body) if as_bytearray else body
    assert native(raw) == json_format._has_long_digit_run(raw)


@pytest.mark.parametrize("run", [18, 19, 20, 21, 39, 40])
@pytest.mark.parametrize("where", ["start", "middle", "end", "alone"])
@pytest.mark.parametrize("sign", [b"", b"-", b"+"])
def test_long_digit_run_edges(compiled: Any, run: int, where: str, sign: bytes) -> None:
    # 20 digits may exceed 2**64 - 1; 19 after a minus sign may be below -2**63; 19 alone always fit.
    native = compiled.has_long_digit_run
    digits = sign + b"7" * run
    body = {"start": digits + b"x" * 30, "middle": b"x" * 17 + digits + b"x" * 13,
            "end": b"x" * 30 + digits, "alone": digits}[where]  # fmt: skip
    assert native(body) == json_format._has_long_digit_run(body) == (run >= 20 or (run == 19 and sign == b"-"))


def test_nineteen_digit_runs_side_by_side() -> None:
    # The skip-scan jumps past an unsigned 19-digit run: a run right after it is still seen.
    for body, long in ((b"1" * 19 + b",-" + b"2" * 19, True), (b"1" * 19 + b"," + b"2" * 20, True),
                       (b"1" * 19 + b"," + b"3" * 19, False)):
        assert json_format.has_long_digit_run(body) == json_format._has_long_digit_run(body) == long


def event_outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    try:
        result = fn(*args)
    except EventError as exc:
        return ("raised", type(exc), exc.attribute, exc.reason, exc.index)
    if isinstance(result, Event):
        return ("event", result.attributes, result.data)
    return ("events", [(e.attributes, e.data) for e in result])


data_members = st.fixed_dictionaries(
    {},
    optional={
        "data": st.one_of(st.none(), st.text(max_size=5), st.integers(), st.dictionaries(st.text(max_size=3),
                                                                                       st.integers())),
        "data_base64": st.one_of(st.none(), st.just(""), st.just("AAEC"), st.just("not base64!"), st.just("AAA"),
                                 st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode()),
                                 st.integers()),
    },
)  # fmt: skip
structured_items = st.one_of(
    st.builds(lambda a, d, nulls: {**a, **d, **dict.fromkeys(nulls)}, attribute_dicts(), data_members,
              st.lists(st.sampled_from(["subject", "time", "id", "specversion", "ext"]), max_size=2)),
    st.sampled_from([None, [], "x", 1, 1.5, True]),
)  # fmt: skip


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(item=structured_items, max_attributes=limits, max_value_bytes=byte_limits)
def test_event_from_dict_same_outcome(compiled: Any, item: Any, max_attributes: Any, max_value_bytes: Any) -> None:
    native = compiled.event_from_dict
    mine, theirs = copy.deepcopy(item), copy.deepcopy(item)
    with patch.object(json_format, "validate_attributes", validation.validate_attributes):
        expected = event_outcome(json_format._event_from_dict, theirs, max_attributes, max_value_bytes)
    assert event_outcome(native, mine, max_attributes, max_value_bytes) == expected
    assert mine == theirs  # the same side effect on the input (the data members are popped)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(items=st.one_of(st.lists(structured_items, max_size=5), st.lists(structured_items, max_size=3).map(tuple)))
def test_events_from_list_same_outcome(compiled: Any, items: Any) -> None:
    native = compiled.events_from_list
    with patch.object(json_format, "validate_attributes", validation.validate_attributes):
        expected = event_outcome(json_format._events_from_list, copy.deepcopy(items))
    assert event_outcome(native, copy.deepcopy(items)) == expected


def test_json_format_uses_the_native_twins_unless_pure() -> None:
    if accel.PURE_REQUESTED:
        assert json_format.event_from_dict is json_format._event_from_dict
        assert json_format.has_long_digit_run is json_format._has_long_digit_run
        return
    assert json_format.event_from_dict is load_native("event_from_dict")
    assert json_format.events_from_list is load_native("events_from_list")
    assert json_format.has_long_digit_run is load_native("has_long_digit_run")


# ---------------------------------------------------------------------------------------------------
# The raw-text scanner (element_spans / object_span) and the decoders that keep raw text.


@pytest.fixture(scope="module")
def scanner() -> Any:
    for name in ("element_spans", "object_span", "events_from_array", "event_from_object"):
        load_native(name)
    return importlib.import_module("umcef._native._validate")


def check_spans(body: bytes, spans: list[tuple[int, int, int, int, int]]) -> None:
    """What the spans claim holds, against the stdlib parser (exact big integers)."""
    items = json.loads(body)
    assert len(spans) == len(items)
    for item, (start, end, members, data_start, data_end) in zip(items, spans, strict=True):
        assert json.loads(body[start:end]) == item
        assert body[start:end].strip() == body[start:end]
        if members >= 0:
            assert type(item) is dict and b"\n" not in body[start:end] and b"\r" not in body[start:end]
            assert members >= len(item)  # more when a name repeats
        if data_start >= 0:
            assert type(item) is dict and "data" in item
            if members == len(item):
                assert json.loads(body[data_start:data_end]) == item["data"]


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_text.array_texts())
def test_element_spans_same_outcome(scanner: Any, body: bytes) -> None:
    spans = json_format._element_spans(body)
    assert scanner.element_spans(body) == spans
    assert spans is not None
    check_spans(body, spans)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_text.array_texts(flat=True))
def test_flat_objects_count_every_member(scanner: Any, body: bytes) -> None:
    spans = scanner.element_spans(body)
    assert spans == json_format._element_spans(body)
    for item, (_start, _end, members, _ds, _de) in zip(json.loads(body), spans, strict=True):
        assert members == (len(item) if type(item) is dict else -1) or members > len(item)  # or a repeat


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=json_text.texts())
def test_object_span_same_outcome(scanner: Any, case: tuple[Any, bytes]) -> None:
    value, body = case
    span = json_format._object_span(body)
    assert scanner.object_span(body) == span
    assert (span is None) == (type(value) is not dict)
    if span is not None:
        check_spans(b"[" + body + b"]", [(span[0] + 1, span[1] + 1, span[2], span[3] + (span[3] >= 0),
                                           span[4] + (span[4] >= 0))])  # fmt: skip


@pytest.mark.parametrize(
    "body",
    [b"[]", b" [ ] ", b"[1]", b'["\\\\"]', b'["\\\\\\""]', b'[{"data":"]"},{"a":"\\"}"}]', b'[[[[[[[[[[1]]]]]]]]]]',
     b'[{"data":1,"data":2}]', b'[{"d\\u0061ta":1}]', b'[{}, {"a":{}}, "x"]', b'[{"a":1}\n]', b'[{"a":\n1}]',
     b'[{"a":1}\r,{"b":"\\r"}]', b'["' + b"x" * 7 + b'\\"' + b"y" * 9 + b'"]', b"[" + b",".join([b"0"] * 300) + b"]"],
)  # fmt: skip
def test_element_spans_edges(scanner: Any, body: bytes) -> None:
    spans = scanner.element_spans(body)
    assert spans == json_format._element_spans(body)
    assert spans is not None
    check_spans(body, spans)


@settings(max_examples=1000, deadline=None)
@given(body=st.one_of(st.binary(max_size=60), st.text('[]{}",:\\ 1an\n', max_size=40).map(str.encode)))
def test_scanner_survives_anything(scanner: Any, body: bytes) -> None:
    """Not JSON: no result is promised, but both return (no crash, no read past the end)."""
    for fn in (scanner.element_spans, json_format._element_spans):
        assert fn(body) is None or isinstance(fn(body), list)
    for fn in (scanner.object_span, json_format._object_span):
        assert fn(body) is None or isinstance(fn(body), tuple)


def raw_outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """`event_outcome` plus the raw text each event kept."""
    try:
        result = fn(*args)
    except EventError as exc:
        return ("raised", type(exc), exc.attribute, exc.reason, exc.index)
    events = [result] if isinstance(result, Event) else result
    return ("events", [(e.attributes, e.data, e.raw, e.raw_data) for e in events])


def parsed(body: bytes) -> Any:
    """The JSON value of `body`; lone surrogate escapes (orjson refuses them) are not the point here."""
    try:
        return json_format.loads(body)
    except MalformedBody:
        assume(False)


def _jsonable(value: Any) -> Any:
    """A structured item as JSON can hold it (names become strings, bytes latin-1 text)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("latin-1")
    return value


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(body=json_text.array_texts(structured_items.map(_jsonable)), limits=st.tuples(limits, byte_limits))
def test_events_from_array_same_outcome(scanner: Any, body: bytes, limits: tuple[Any, Any]) -> None:
    with patch.object(json_format, "validate_attributes", validation.validate_attributes):
        expected = raw_outcome(json_format._events_from_array, parsed(body), body, *limits)
    assert raw_outcome(scanner.events_from_array, parsed(body), body, *limits) == expected


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=json_text.texts(structured_items.map(_jsonable)))
def test_event_from_object_same_outcome(scanner: Any, case: tuple[Any, bytes]) -> None:
    _value, body = case
    with patch.object(json_format, "validate_attributes", validation.validate_attributes):
        expected = raw_outcome(json_format._event_from_object, parsed(body), body)
    assert raw_outcome(scanner.event_from_object, parsed(body), body) == expected


def test_json_format_keeps_raw_only_with_the_compiled_scanner() -> None:
    if accel.PURE_REQUESTED:
        assert not json_format.KEEPS_RAW
        return
    assert json_format.KEEPS_RAW
    assert json_format.events_from_array is load_native("events_from_array")
    assert json_format._decode_array is load_native("events_from_array")
    assert json_format._decode_object is load_native("event_from_object")


# ---------------------------------------------------------------------------------------------------
# The Kafka binary mode's header list (umcef._native._kafka) against kafka._binary_headers.


@pytest.fixture(scope="module")
def kafka_native() -> Any:
    try:
        module = importlib.import_module("umcef._native._kafka")
    except ImportError as exc:
        if IN_CI:
            pytest.fail(f"umcef._native._kafka is not built ({exc})")
        pytest.skip(f"umcef._native._kafka is not built ({exc})")
    return module


def header_outcome(fn: Callable[..., Any], attrs: Any) -> tuple[Any, ...]:
    try:
        return ("ok", fn(attrs))
    except Exception as exc:
        return ("raised", type(exc), str(exc))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(attrs=attribute_dicts())
def test_binary_headers_same_outcome(kafka_native: Any, attrs: dict[Any, Any]) -> None:
    from umcef.fabric.bindings import kafka as binding

    assert header_outcome(kafka_native.binary_headers, attrs) == header_outcome(binding._binary_headers, attrs)


def test_binary_headers_selected_and_constants_agree(kafka_native: Any) -> None:
    from umcef.fabric.bindings import kafka as binding

    if not accel.PURE_REQUESTED:
        assert binding.binary_headers is kafka_native.binary_headers
    one = {"id": "x"}
    assert kafka_native.binary_headers(one)[1] == 1 + 4 * 2 + binding._HEADER_MAX_OVERHEAD
    assert kafka_native.binary_headers({**VALID, "datacontenttype": "a/b"})[0][-1] == ("ce_blob", b"AP8=")
