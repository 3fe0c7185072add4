"""`jsonparse.parse_events` (compiled and pure) against orjson, the parser it stands in for.

The contract: for any bytes, it raises iff `orjson.loads` raises, and otherwise the attributes plus
the `data` text decoded by orjson are what orjson gives for the whole body -- except integers
beyond 64 bits in attributes, which are exact where orjson rounds them to floats. Every expectation
below is computed by orjson at test time, not written down by hand.

A missing extension is a failure in CI (CI=true): a skip there would hide a broken build.
"""

from __future__ import annotations

import importlib
import json
import math
import os
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umcef.fabric import accel
from umcef.fabric.formats import jsonparse

pytestmark = pytest.mark.pure_twin

Parse = Callable[[Any, bool], list[tuple[Any, int, int, int, int, bool]]]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
ERROR = object()  # what orjson "returns" for a body it rejects


def _native() -> Parse | None:
    try:
        parse: Parse = importlib.import_module("umcef._native._jsonparse").parse_events
    except ImportError:
        return None
    return parse


NATIVE = _native()


@pytest.fixture(params=["compiled", "pure"])
def parse(request: pytest.FixtureRequest) -> Parse:
    if request.param == "pure":
        return jsonparse._parse_events_pure
    if NATIVE is None:
        message = "umcef._native._jsonparse is not built; `.venv/bin/pip install -e . --no-build-isolation`"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return NATIVE


def native_or_skip() -> Parse:
    if NATIVE is None:
        if IN_CI:
            pytest.fail("umcef._native._jsonparse is not built")
        pytest.skip("umcef._native._jsonparse is not built")
    return NATIVE


# --- comparing with orjson ------------------------------------------------------------------------


def same(ours: Any, theirs: Any) -> bool:
    """Equal values of equal types, members in the same order; an integer orjson could not hold as
    one (it gives the nearest float) must be exact on our side. Iterative: values nest 1024 deep."""
    stack = [(ours, theirs)]
    while stack:
        a, b = stack.pop()
        if type(a) is int and type(b) is float:
            if -(2**63) <= a < 2**64 or float(a) != b:
                return False
        elif type(a) is not type(b):
            return False
        elif type(a) is dict:
            if list(a) != list(b):
                return False
            stack.extend((a[k], b[k]) for k in a)
        elif type(a) is list:
            if len(a) != len(b):
                return False
            stack.extend(zip(a, b, strict=True))
        elif type(a) is float:
            if a != b or math.copysign(1, a) != math.copysign(1, b):
                return False
        elif a != b:
            return False
    return True


def orjson_result(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return ERROR


def rebuilt(body: bytes, parsed: list[tuple[Any, int, int, int, int, bool]]) -> list[Any]:
    """The elements as orjson would build them, from the attributes and the `data` spans. The data
    goes back in its place among the members (orjson keeps text order), spans are checked."""
    out = []
    for attrs, start, end, data_start, data_end, faithful in parsed:
        element = orjson.loads(body[start:end])
        if type(element) is not dict:
            assert (data_start, data_end, faithful) == (-1, -1, False)
            out.append(attrs)
            continue
        assert start < end and body[start] == 0x7B and body[end - 1] == 0x7D
        whole = dict(attrs)
        if data_start >= 0:
            assert start < data_start < data_end < end
            whole["data"] = orjson.loads(body[data_start:data_end])
        else:
            assert (data_start, data_end) == (-1, -1)
        out.append({k: whole[k] for k in element})  # text order, as orjson gives it
        assert list(attrs) == [k for k in element if k != "data"]
    return out


def check(parse: Parse, body: bytes, batch: bool) -> None:
    """parse_events agrees with orjson.loads on `body`: both reject it, or the same values."""
    expected = orjson_result(body)
    if expected is ERROR:
        with pytest.raises(ValueError):
            parse(body, batch)
        return
    if batch and type(expected) is not list:
        with pytest.raises(ValueError, match="a batch must be a JSON array"):
            parse(body, batch)
        return
    parsed = parse(body, batch)
    got = rebuilt(body, parsed)
    want = expected if batch else [expected]
    assert same(got, want), (body, got, want)


# --- table tests: each tricky value in every position -------------------------------------------

VALUES = [
    # strings and escapes
    b'""', b'"plain"', b'"\\"\\\\\\/\\b\\f\\n\\r\\t"', b'"\\u0041\\u00e9\\u20ac\\u0000"', b'"\\uD83D\\uDE00"',
    b'"\\udbff\\udfff"', b'"\\ud800"', b'"\\udc00"', b'"\\ud800\\u0041"', b'"\\ud800\\ud800"', b'"\\ud800x"',
    b'"a\\ud800"', b'"\\ud800\\udc0"', b'"\\u12G4"', b'"\\u00"', b'"\\x41"', b'"\\a"', b'"\\', b'"abc', b'"\\"',
    b'"tab\there"', b'"nl\nhere"', b'"\x00"', b'"\x1f"', b'"\x7f"', '"Hauptstraße 😀 中文"'.encode(),
    b'"\xc3"', b'"\xc3\x28"', b'"\xc0\x80"', b'"\xe0\x80\x80"', b'"\xed\xa0\x80"', b'"\xed\x9f\xbf"',
    b'"\xf4\x8f\xbf\xbf"', b'"\xf4\x90\x80\x80"', b'"\xf5\x80\x80\x80"', b'"\xff"', b'"\x80"', b'"\xef\xbf\xbe"',
    b'"12345678\xc3\xa912345678"', b'"12345678\xe2\x82"', b'"' + b"x" * 100 + b'\\n"',
    # numbers
    b"0", b"-0", b"-0.0", b"0.5", b"1e5", b"1E+5", b"1e-5", b"2.5E-3", b"01", b"-01", b"00", b"1.", b".5", b"+1",
    b"-", b"1e", b"1e+", b"1.e5", b"-.5", b"0e5", b"1.5e", b"0x10", b"1_000", b"9223372036854775807",
    b"9223372036854775808", b"-9223372036854775808", b"-9223372036854775809", b"18446744073709551615",
    b"18446744073709551616", b"123456789012345678901234567890", b"-123456789012345678901234567890",
    b"1" * 308, b"9" * 309, b"1" * 400, b"1" * 400 + b".0", b"1e308", b"1e309", b"-1e309", b"1e-400", b"-1e-400",
    b"1.7976931348623157e308", b"1.7976931348623159e308", b"1e99999999999999999999", b"1e-99999999999999999999",
    b"0." + b"0" * 400 + b"1e400", b"0.1", b"0.30000000000000004", b"5e-324", b"2.2250738585072014e-308",
    b"123456789012345678.5", b"4.35", b"1" * 18, b"-" + b"9" * 18, b"1" * 19,
    # literals
    b"true", b"false", b"null", b"tru", b"nul", b"fals", b"True", b"NaN", b"-NaN", b"Infinity", b"-Infinity",
    b"nulll", b"truex",
    # containers
    b"[]", b"{}", b"[ ]", b"{ }", b"[1,]", b'{"a":1,}', b"[,1]", b"[1 2]", b'{"a" 1}', b'{"a":}', b"{1:2}",
    b'{"a":1 "b":2}', b"[1]]", b"[[1]", b'{"a":[1,{"b":null}]}', b'{"a":1,"a":2}', b"[1,[2,[3,[4]]]]",
    b'{"\\u0064ata":1}', b"{'a':1}",
]  # fmt: skip


@pytest.mark.parametrize("value", VALUES, ids=lambda v: repr(v[:24]))
def test_value_in_every_position(parse: Parse, value: bytes) -> None:
    check(parse, value, batch=False)  # the whole body
    check(parse, value, batch=True)  # a batch body that may not be an array
    check(parse, b"[" + value + b"]", batch=True)  # an element
    check(parse, b'[{"a":' + value + b',"b":1}]', batch=True)  # an attribute
    check(parse, b'{"id":"x","data":' + value + b"}", batch=False)  # the data
    check(parse, b'[{"data":[' + value + b"]}, {}]", batch=True)  # inside the data


BODIES = [
    b"", b" ", b"\t\n\r ", b"[", b"]", b"[]", b" [ ] ", b"[]x", b"[] []", b"[]\x00", b"\x00[]", b"\x0c[]", b"[]\x0c",
    b"\xef\xbb\xbf[]", b"\xef\xbb\xbf{}", b"\xa0[]", b"[\xff]", b"[]\xff", b"[1]\xc3", b'[{"a":1}]',
    b'[{"a":1},{"b":2}]', b'[{"a":1}{"b":2}]', b'[{"a":1},]', b'{"a":1}', b'"s"', b"1", b"null",
    b'[{"data":1,"data":{"x":2}}]', b'[{"data":{"x":2},"data":1}]', b'{"d\\u0061ta":1,"data":2}',
    b'[{"a":null,"b":[1,{"c":2}],"c":{"d":[]}}]', b'\n[\n{\n"a"\n:\n1\n}\n]\n', b'\r\n[{"a":"b"}]\r\n',
]  # fmt: skip


@pytest.mark.parametrize("body", BODIES, ids=repr)
@pytest.mark.parametrize("batch", [True, False])
def test_bodies(parse: Parse, body: bytes, batch: bool) -> None:
    check(parse, body, batch)


@pytest.mark.parametrize("depth", [1, 2, 1022, 1023, 1024, 1025, 1026, 3000])
def test_depth_limit_matches_orjson(parse: Parse, depth: int) -> None:
    """orjson allows 1024 nested arrays/objects (the top-level array and the event object count)."""
    check(parse, b"[" * depth + b"]" * depth, batch=True)
    check(parse, b"[" * depth, batch=True)
    check(parse, b'{"a":' * depth + b"1" + b"}" * depth, batch=False)
    inner = max(depth - 2, 0)
    check(parse, b'[{"data":' + b"[" * inner + b"]" * inner + b"}]", batch=True)
    check(parse, b'[{"ext":' + b"[" * inner + b"]" * inner + b"}]", batch=True)


def test_depth_limit_is_1024(parse: Parse) -> None:
    assert parse(b"[" * 1024 + b"]" * 1024, True)
    with pytest.raises(ValueError):
        parse(b"[" * 1025 + b"]" * 1025, True)
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(b"[" * 1025 + b"]" * 1025)


def test_documented_orjson_behaviours() -> None:
    """What the module docstring says of orjson (if these change, the contract above moved)."""
    for rejected in (b"\xef\xbb\xbf[]", b'"\\ud800"', b'"\\udc00"', b'"\xed\xa0\x80"', b"1e309", b"9" * 309):
        with pytest.raises(orjson.JSONDecodeError):
            orjson.loads(rejected)
    assert orjson.loads(b"18446744073709551616") == 2.0**64  # a float: precision lost
    assert type(orjson.loads(b"-9223372036854775809")) is float


@pytest.mark.parametrize("big", [2**64, 2**64 - 1, -(2**63) - 1, -(2**63), 10**30, -(10**30), 10**300])
def test_big_integers_in_attributes_are_exact(parse: Parse, big: int) -> None:
    """The intended difference from orjson: exact, like the stdlib parser (and the SDK)."""
    body = json.dumps([{"n": big, "nested": [big], "data": {"n": big}}]).encode()
    ((attrs, _, _, data_start, data_end, _),) = parse(body, True)
    assert attrs == {"n": big, "nested": [big]}
    assert type(attrs["n"]) is int and type(attrs["nested"][0]) is int
    assert json.loads(body[data_start:data_end]) == {"n": big}
    ((value, *_),) = parse(str(big).encode(), False)
    assert value == big and type(value) is int


def test_spans_and_faithful(parse: Parse) -> None:
    one = b'{"id":"1","data":{"x":[1,2]}}'
    multi = b'{"id":"2",\n"data":1}'
    dup = b'{"id":"3","id":"4"}'
    dup_data = b'{"id":"5","data":1,"data":2}'
    null = b'{"id":"6","subject":null}'
    no_data = b'{"id":"7"}'
    body = b" [ " + b" , ".join([one, multi, dup, dup_data, null, no_data, b"[1]", b'"x"']) + b" ] "
    parsed = parse(body, True)
    texts = [body[s:e] for _, s, e, *_ in parsed]
    assert texts == [one, multi, dup, dup_data, null, no_data, b"[1]", b'"x"']
    assert [p[5] for p in parsed] == [True, False, False, False, False, True, False, False]
    attrs, _, _, ds, de, _ = parsed[0]
    assert attrs == {"id": "1"} and body[ds:de] == b'{"x":[1,2]}'
    assert parsed[2][0] == {"id": "4"}
    attrs, _, _, ds, de, _ = parsed[3]
    assert attrs == {"id": "5"} and body[ds:de] == b"2"  # the last one, as orjson keeps
    assert parsed[4][0] == {"id": "6", "subject": None}
    assert parsed[5][3:5] == (-1, -1)
    assert parsed[6] == ([1], body.index(b"[1]"), body.index(b"[1]") + 3, -1, -1, False)
    assert parse(b"[]", True) == []
    assert parse(b"\t" + one + b"\r\n", False) == [({"id": "1"}, 1, 1 + len(one), 18, 29, True)]


def test_escaped_data_name_is_data(parse: Parse) -> None:
    body = b'{"d\\u0061ta":{"x":1},"id":"1"}'
    ((attrs, _, _, ds, de, faithful),) = parse(body, False)
    assert attrs == {"id": "1"} and body[ds:de] == b'{"x":1}' and faithful


def test_body_types(parse: Parse) -> None:
    body = b'[{"id":"1","data":2}]'
    expected = parse(body, True)
    assert parse(bytearray(body), True) == expected
    assert parse(memoryview(body), True) == expected
    with pytest.raises(TypeError):
        parse(body.decode(), True)


def test_batch_of_a_non_array(parse: Parse) -> None:
    with pytest.raises(ValueError, match="got object"):
        parse(b'{"id":"1"}', True)
    with pytest.raises(ValueError, match="got number"):
        parse(b" 12 ", True)
    with pytest.raises(ValueError) as caught:  # not JSON at all: the syntax error wins
        parse(b'{"id":"1"', True)
    assert "JSON array" not in str(caught.value)


def test_error_names_the_position() -> None:
    parse = native_or_skip()
    with pytest.raises(ValueError, match="at byte 8"):
        parse(b'[{"a":1,}]', True)


def test_entry_point_is_the_compiled_twin_when_built() -> None:
    if accel.NATIVE and NATIVE is not None:
        assert jsonparse.parse_events is NATIVE
    else:
        assert jsonparse.parse_events is jsonparse._parse_events_pure


def test_name_cache_keeps_names_apart(parse: Parse) -> None:
    """Names that collide in the compiled name cache, or differ only past the bytes it hashes."""
    names = [f"n{i}" for i in range(3000)] + ["x" * 48 + "a", "x" * 48 + "b", "é", "\u20ac" * 3]
    body = orjson.dumps([{name: i} for i, name in enumerate(names)] * 2)
    parsed = parse(body, True)
    assert [p[0] for p in parsed] == [{name: i} for i, name in enumerate(names)] * 2


# --- hypothesis: random events, serialized every which way ----------------------------------------

_chars = st.characters(exclude_categories=("Cs",))  # orjson cannot write lone surrogates
_text = st.text(_chars, max_size=12) | st.sampled_from(["", "data", "id", "\u2028", "\x00\x1f\x7f", "\\u0041"])
_scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | _text
)
_json = st.recursive(
    _scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4), max_leaves=12
)
_attr_value = _scalars | st.integers() | st.lists(_scalars, max_size=2)  # any size of integer (stdlib only)
_event = st.builds(
    lambda base, extra, data: {**base, **extra, **data},
    st.fixed_dictionaries({"specversion": st.just("1.0"), "id": _text, "source": _text, "type": _text}),
    st.dictionaries(_text, _attr_value, max_size=4),
    st.just({}) | st.builds(lambda d: {"data": d}, _json),
)
_events = st.lists(_event | _scalars, max_size=5)


@st.composite
def bodies(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A batch (or one event) as orjson or the stdlib writes it, with varied spacing and escaping."""
    batch = draw(st.booleans())
    value = draw(_events) if batch else draw(_event)
    writer = draw(st.sampled_from(["orjson", "orjson-indent", "json"]))
    if writer != "json":
        try:
            return orjson.dumps(value, option=orjson.OPT_INDENT_2 if writer == "orjson-indent" else 0), batch
        except TypeError:  # an integer beyond 64 bits: only the stdlib writes it
            pass
    text = json.dumps(
        value,
        ensure_ascii=draw(st.booleans()),
        indent=draw(st.sampled_from([None, 0, 1, "\t", " \r\n"])),
        separators=draw(st.sampled_from([None, (",", ":"), (" , ", " : "), (",\t", ":\n")])),
    )
    return text.encode(), batch


_SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@_SETTINGS
@given(bodies())
def test_random_bodies_agree_with_orjson(body_batch: tuple[bytes, bool]) -> None:
    body, batch = body_batch
    for parse in (jsonparse._parse_events_pure, NATIVE):
        if parse is not None:
            check(parse, body, batch)


_SPECIAL = [b'"', b"\\", b"{", b"}", b"[", b"]", b",", b":", b"\x80", b"\xff", b"\x00", b"\n", b"e", b"-", b"0", b"u"]


@st.composite
def mutated(draw: st.DrawFn) -> tuple[bytes, bool]:
    body, batch = draw(bodies())
    text = bytearray(body)
    for _ in range(draw(st.integers(1, 3))):
        pos = draw(st.integers(0, len(text)))
        kind = draw(st.sampled_from(["flip", "delete", "insert", "replace"]))
        if kind == "insert" or not text or pos == len(text):
            text[pos:pos] = draw(st.sampled_from(_SPECIAL))
        elif kind == "flip":
            text[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "delete":
            del text[pos]
        else:
            text[pos : pos + 1] = draw(st.sampled_from(_SPECIAL))
    return bytes(text), batch


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_bodies_fail_iff_orjson_fails(body_batch: tuple[bytes, bool]) -> None:
    body, batch = body_batch
    check(native_or_skip(), body, batch)
    check(jsonparse._parse_events_pure, body, batch)


@_SETTINGS
@given(st.floats(allow_nan=False, allow_infinity=False), st.integers(-400, 400), st.integers(0, 30))
def test_float_texts_round_like_orjson(x: float, exponent: int, digits: int) -> None:
    """Numbers in shapes writers do not produce (long mantissas, big exponents)."""
    texts = [repr(x).encode(), f"{x:.{digits}e}".encode(), f"{abs(x):.{digits}f}e{exponent}".encode()]
    for text in texts:
        if b"inf" not in text and b"nan" not in text:
            for parse in (jsonparse._parse_events_pure, NATIVE):
                if parse is not None:
                    check(parse, b'[{"a":' + text + b',"data":' + text + b"}]", True)
