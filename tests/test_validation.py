"""CloudEvents 1.0 attribute rules, one handwritten case per rule and edge, on both validators.

Every case runs against the pure reference and the compiled twin (`impl` fixture). The data rules
(`data` vs `data_base64`) live in the JSON format, so those cases run the format with each
validator patched in. Spec references are to ../shared/spec/cloudevents/cloudevents/spec.md.
"""

from __future__ import annotations

import base64
import importlib
import os
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from umcef.fabric import validation
from umcef.fabric.bindings import http
from umcef.fabric.errors import EventError, InvalidAttribute, InvalidData, LimitExceeded, MalformedBody
from umcef.fabric.formats import json_format

Validate = Callable[..., object]
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _native() -> Validate:
    try:
        fn: Validate = importlib.import_module("umcef._native._validate").validate_attributes
    except ImportError as exc:
        message = f"umcef._native._validate is not built ({exc})"
        if IN_CI:
            pytest.fail(message + "; CI must build the extension")
        pytest.skip(message)
    return fn


@pytest.fixture(params=["pure", "native"])
def impl(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Validate]:
    """One validator; the codecs are patched to use it and its sibling twins (bound at import)."""
    fn: Validate
    if request.param == "pure":
        fn = validation.validate_attributes
        twins = {name: getattr(json_format, "_" + name) for name in NATIVE_JSON_TWINS}
    else:
        fn = _native()
        module = importlib.import_module("umcef._native._validate")
        twins = {name: getattr(module, name) for name in NATIVE_JSON_TWINS}
    monkeypatch.setattr(json_format, "validate_attributes", fn)
    monkeypatch.setattr(http, "validate_attributes", fn)
    for name, twin in twins.items():
        monkeypatch.setattr(json_format, name, twin)
    yield fn


NATIVE_JSON_TWINS = ("event_from_dict", "events_from_list", "has_long_digit_run")


BASE: dict[str, Any] = {
    "specversion": "1.0",
    "id": "A234-1234-1234",
    "source": "https://github.com/cloudevents/spec/pull",
    "type": "com.github.pull_request.opened",
}


def event(**changes: Any) -> dict[str, Any]:
    """BASE with attributes changed; a value of `...` removes the attribute."""
    attrs = dict(BASE)
    for name, value in changes.items():
        if value is ...:
            attrs.pop(name, None)
        else:
            attrs[name] = value
    return attrs


def rejects(impl: Validate, attrs: dict[str, Any], attribute: str | None, reason_part: str, **limits: int) -> None:
    with pytest.raises(InvalidAttribute) as caught:
        impl(attrs, **limits)
    assert caught.value.attribute == attribute
    assert reason_part in caught.value.reason, caught.value.reason


# --- required attributes (spec §REQUIRED Attributes) ------------------------------------------------


def test_minimal_event_is_valid(impl: Validate) -> None:
    assert impl(event()) is None


@pytest.mark.parametrize("name", ["specversion", "id", "source", "type"])
def test_each_required_attribute_missing(impl: Validate, name: str) -> None:
    rejects(impl, event(**{name: ...}), name, "is required")


def test_required_checked_in_order_specversion_id_source_type(impl: Validate) -> None:
    rejects(impl, {}, "specversion", "is required")
    rejects(impl, {"specversion": "1.0"}, "id", "is required")
    rejects(impl, {"specversion": "1.0", "id": "x", "type": "t"}, "source", "is required")


@pytest.mark.parametrize("name", ["id", "type"])
@pytest.mark.parametrize(
    ("value", "reason"),
    [("", "non-empty"), (5, "got int"), (None, "got null"), (b"x", "got bytes"), (True, "got bool")],
)
def test_id_and_type_are_non_empty_strings(impl: Validate, name: str, value: Any, reason: str) -> None:
    rejects(impl, event(**{name: value}), name, reason)


# --- specversion ----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["0.3", "1", "1.0 ", " 1.0", "1.0.0", "", 1.0, b"1.0"])
def test_specversion_must_be_exactly_1_0(impl: Validate, value: Any) -> None:
    rejects(impl, event(specversion=value), "specversion", "unsupported version")


def test_specversion_null_counts_as_missing(impl: Validate) -> None:
    rejects(impl, event(specversion=None), "specversion", "is required")


# --- source: URI-reference (RFC 3986 §4.1) -------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "https://github.com/cloudevents",  # the spec's examples
        "mailto:cncf-wg-serverless@lists.cncf.io",
        "urn:uuid:6e8bc430-9c3a-11d9-9669-0800200c9a66",
        "/cloudevents/spec/pull/123",
        "/sensors/tn-1234567/alerts",
        "1-555-123-4567",
        "/a%20b?q=1&r=%C3%A9#frag",
        "http://[::1]:8080/x",
        "x",
    ],
)
def test_source_uri_references(impl: Validate, value: str) -> None:
    impl(event(source=value))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("", "non-empty"),
        ("/a b", "URI-reference"),  # space must be percent-encoded
        ("/a%2", "URI-reference"),  # truncated %HH
        ("/a%zz", "URI-reference"),
        ("/%", "URI-reference"),
        ("/ü", "URI-reference"),  # an IRI, not a URI: non-ASCII must be percent-encoded
        ('/"q"', "URI-reference"),
        ("/a\\b", "URI-reference"),
        ("/a\nb", "forbids"),  # the String rule outranks the URI rule
        (5, "got int"),
    ],
)
def test_source_rejects(impl: Validate, value: Any, reason: str) -> None:
    rejects(impl, event(source=value), "source", reason)


# --- optional attributes ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "application/json",
        "text/xml; charset=utf-8",
        "application/vnd.apache.kafka+json;v=2",
        "application/cloudevents+json",
        'multipart/form-data; boundary="a b"',
        "a/b ",
    ],
)
def test_datacontenttype_media_types(impl: Validate, value: str) -> None:
    impl(event(datacontenttype=value))


@pytest.mark.parametrize(
    ("value", "reason"),
    [("", "non-empty"), ("json", "media type"), ("application/", "media type"), ("/json", "media type"),
     ("text/plain x", "media type"), ("a/b/c", "media type"), ("ü/x", "media type"), (None, "got null")],
)  # fmt: skip
def test_datacontenttype_rejects(impl: Validate, value: Any, reason: str) -> None:
    rejects(impl, event(datacontenttype=value), "datacontenttype", reason)


@pytest.mark.parametrize("value", ["https://example.com/schema.json", "urn:example:order:v2", "a+b.c-d:x"])
def test_dataschema_absolute_uris(impl: Validate, value: str) -> None:
    impl(event(dataschema=value))


@pytest.mark.parametrize(
    ("value", "reason"),
    [("", "non-empty"), ("/schemas/order.json", "absolute URI"), ("1a:b", "absolute URI"),
     ("schema.json", "absolute URI"), ("https://x y", "URI-reference")],
)  # fmt: skip
def test_dataschema_rejects(impl: Validate, value: str, reason: str) -> None:
    rejects(impl, event(dataschema=value), "dataschema", reason)


def test_subject_non_empty_string_any_unicode(impl: Validate) -> None:
    impl(event(subject="mynewfile.jpg ü € 😀 \u00a0"))
    rejects(impl, event(subject=""), "subject", "non-empty")
    rejects(impl, event(subject=1), "subject", "got int")


# --- time: RFC 3339 -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        "1985-04-12T23:20:50.52Z",  # RFC 3339 §5.8 examples
        "1996-12-19T16:39:57-08:00",
        "1990-12-31T23:59:60Z",  # leap second
        "1990-12-31T15:59:60-08:00",
        "1937-01-01T12:00:27.87+00:20",
        "2024-02-29T00:00:00Z",  # leap days: every 4th year ...
        "2000-02-29T00:00:00Z",  # ... and every 400th
        "2400-02-29T00:00:00Z",
        "2024-01-31T00:00:00Z",
        "2024-04-30T00:00:00Z",
        "2018-04-05T17:31:00.123456789Z",  # nanoseconds (and more) are allowed
        "2018-04-05T17:31:00.1Z",
        "2018-04-05t17:31:00z",  # RFC 3339 §5.6: T and Z may be lower case
        "2018-04-05T17:31:00-00:00",  # "unknown local offset"
        "2018-04-05T17:31:00+23:59",
        "0000-01-01T00:00:00Z",
        "9999-12-31T23:59:59Z",
    ],
)
def test_time_accepts_rfc3339(impl: Validate, value: str) -> None:
    impl(event(time=value))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2023-02-29T00:00:00Z", "day out of range"),  # not a leap year
        ("1900-02-29T00:00:00Z", "day out of range"),  # century, not divisible by 400
        ("2100-02-29T00:00:00Z", "day out of range"),
        ("2024-02-30T00:00:00Z", "day out of range"),
        ("2024-04-31T00:00:00Z", "day out of range"),
        ("2024-01-00T00:00:00Z", "day out of range"),
        ("2024-01-32T00:00:00Z", "day out of range"),
        ("2024-00-10T00:00:00Z", "month out of range"),
        ("2024-13-10T00:00:00Z", "month out of range"),
        ("2024-01-01T24:00:00Z", "time of day out of range"),
        ("2024-01-01T23:60:00Z", "time of day out of range"),
        ("2024-01-01T23:59:61Z", "time of day out of range"),
        ("2024-01-01T00:00:00+24:00", "UTC offset out of range"),
        ("2024-01-01T00:00:00-01:60", "UTC offset out of range"),
        ("2024-01-01T00:00:00", "RFC 3339"),  # no offset
        ("2024-01-01T00:00:00+0100", "RFC 3339"),  # offset without colon (ISO 8601 basic)
        ("2024-01-01T00:00:00+01", "RFC 3339"),
        ("2024-01-01 00:00:00Z", "RFC 3339"),  # space separator
        ("2024-01-01T00:00:00.Z", "RFC 3339"),  # empty fraction
        ("2024-01-01T00:00Z", "RFC 3339"),  # seconds are required
        ("2024-1-01T00:00:00Z", "RFC 3339"),
        ("24-01-01T00:00:00Z", "RFC 3339"),
        ("2024-01-01", "RFC 3339"),
        ("\u0662\u0660\u0662\u0664-01-01T00:00:00Z", "RFC 3339"),  # Arabic-Indic digits; DIGIT is ASCII
        ("2024-01-01T00:00:00Z ", "RFC 3339"),
        ("2024-01-01T00:00:00ZZ", "RFC 3339"),
        ("", "RFC 3339"),
        ("2024-01-01T00:00:00\x00Z", "forbids"),
    ],
)
def test_time_rejects(impl: Validate, value: str, reason: str) -> None:
    rejects(impl, event(time=value), "time", reason)


def test_time_must_be_a_string_not_a_datetime(impl: Validate) -> None:
    # The internal model keeps time as its RFC 3339 string (see event.py); a datetime is a bug upstream.
    rejects(impl, event(time=datetime(2024, 1, 1, tzinfo=UTC)), "time", "got datetime")


# --- extensions: naming and types (spec §Extension Context Attributes, §Type System) --------------


@pytest.mark.parametrize("name", ["partitionkey", "traceparent", "a", "x1", "123", "averylongextensionname"])
def test_extension_names(impl: Validate, name: str) -> None:
    impl(event(**{name: "v"}))


FULLWIDTH = "\uff45\uff58\uff54"  # "ext" in fullwidth letters


@pytest.mark.parametrize("name", ["Ext", "ex_t", "ex-t", "ex.t", "é", "ext ", "", "EXT", FULLWIDTH])
def test_extension_names_lower_case_ascii_alnum_only(impl: Validate, name: str) -> None:
    rejects(impl, event(**{name: "v"}), name, "lower-case ASCII letters and digits")


def test_data_is_not_an_attribute_name(impl: Validate) -> None:
    rejects(impl, event(data="x"), "data", "reserved")


def test_non_string_key_is_a_bad_name_not_a_crash(impl: Validate) -> None:
    rejects(impl, {**event(), 7: "v"}, "7", "lower-case ASCII")  # type: ignore[dict-item]


@pytest.mark.parametrize("value", ["", "v", "ü😀", 0, -(2**31), 2**31 - 1, True, False, b"", b"\x00\xff"])
def test_extension_value_types(impl: Validate, value: Any) -> None:
    impl(event(ext=value))


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        (2**31, "32 bits"),
        (-(2**31) - 1, "32 bits"),
        (2**64, "32 bits"),
        (1.5, "got float"),
        (1.0, "got float"),
        (None, "got null"),
        ([], "got list"),
        ({}, "got dict"),
        (bytearray(b"x"), "got bytearray"),
        (datetime(2024, 1, 1, tzinfo=UTC), "got datetime"),
    ],
)
def test_extension_value_rejects(impl: Validate, value: Any, reason: str) -> None:
    rejects(impl, event(ext=value), "ext", reason)


# --- String: forbidden characters (spec §Type System) ---------------------------------------------


@pytest.mark.parametrize(
    "char",
    ["\x00", "\t", "\n", "\x1f", "\x7f", "\x80", "\x9f", "\ud800", "\udfff", "\ufdd0", "\ufdef", "\ufffe",
     "\uffff", "\U0001fffe", "\U0001ffff", "\U0010fffe", "\U0010ffff"],
)  # fmt: skip
@pytest.mark.parametrize("name", ["id", "type", "subject", "ext"])
def test_forbidden_characters(impl: Validate, name: str, char: str) -> None:
    rejects(impl, event(**{name: f"a{char}b"}), name, "forbids")


@pytest.mark.parametrize(
    "char", [" ", "~", "\xa0", "\u00ff", "\ufdcf", "\ufdf0", "\ufffd", "\U00010000", "😀", "\U0010fffd"]
)
def test_allowed_characters(impl: Validate, char: str) -> None:
    impl(event(id=f"a{char}b", subject=char, ext=char))


# --- limits -----------------------------------------------------------------------------------------


def test_max_attributes(impl: Validate) -> None:
    impl(event(), max_attributes=4)
    rejects(impl, event(ext="v"), None, "too many attributes: 5 > limit 4", max_attributes=4)


def test_max_value_bytes_counts_utf8_bytes(impl: Validate) -> None:
    short = event(source="/s", type="t", id="1")
    impl({**short, "ext": "é" * 3}, max_value_bytes=6)  # 3 characters, 6 bytes
    rejects(impl, {**short, "ext": "é" * 3}, "ext", "limit of 5 bytes", max_value_bytes=5)
    impl({**short, "subject": "😀" * 2}, max_value_bytes=8)
    rejects(impl, {**short, "subject": "😀" * 2}, "subject", "limit of 7 bytes", max_value_bytes=7)
    rejects(impl, {**short, "ext": b"x" * 8}, "ext", "limit of 7 bytes", max_value_bytes=7)
    impl({**short, "ext": 2**31 - 1, "flag": True}, max_value_bytes=3)  # only strings and bytes count


def test_first_offending_attribute_is_named(impl: Validate) -> None:
    attrs = {**event(), "b": 1.5, "a": None}
    rejects(impl, attrs, "b", "got float")


# --- data vs data_base64 (JSON format §3.1) ---------------------------------------------------------


def structured(**members: Any) -> bytes:
    return json_format.dumps({**BASE, **members})  # orjson.dumps refuses integers beyond 64 bits


@pytest.mark.usefixtures("impl")
class TestData:
    def test_data_and_data_base64_are_exclusive(self) -> None:
        with pytest.raises(InvalidData) as caught:
            json_format.decode(structured(data={"a": 1}, data_base64="AA=="))
        assert caught.value.attribute == "data_base64"

    def test_data_base64_decodes_to_bytes(self) -> None:
        raw = bytes(range(256))
        decoded = json_format.decode(structured(data_base64=base64.b64encode(raw).decode()))
        assert decoded.data == raw
        assert "data_base64" not in decoded.attributes

    def test_empty_data_base64_is_empty_bytes(self) -> None:
        assert json_format.decode(structured(data_base64="")).data == b""

    @pytest.mark.parametrize("bad", ["not base64!", "AAA", 5, None])
    def test_bad_data_base64(self, bad: Any) -> None:
        with pytest.raises(InvalidData) as caught:
            json_format.decode(structured(data_base64=bad))
        assert caught.value.attribute == "data_base64"

    @pytest.mark.parametrize("data", [{"a": [1, 2.5, None]}, [1, "x"], "text", 42, -1.25, True, False])
    def test_data_keeps_its_json_type(self, data: Any) -> None:
        assert json_format.decode(structured(data=data)).data == data

    def test_integers_beyond_64_bits_stay_exact(self) -> None:
        # orjson alone would read these as floats (and refuse to write them back).
        data = {"n": 123456789012345678901234567890, "m": [-(2**70), 2**64, 2**63 - 1], "s": "1" * 25}
        decoded = json_format.decode(structured(data=data, datacontenttype="application/json"))
        assert decoded.data == data
        assert orjson.loads(json_format.encode(decoded))["data"]["s"] == "1" * 25
        assert json_format.decode(json_format.encode(decoded)).data == data
        assert json_format.decode_batch(json_format.encode_batch([decoded, decoded]))[1].data == data
        assert http.decode_binary(*http.encode_binary(decoded)).data == json_format.dumps(data)

    def test_long_digit_fallback_is_as_strict_as_orjson(self) -> None:
        for body in (b'{"a": NaN, "b": 123456789012345678901234}', b'{"a": "\\ud800", "b": 1' + b"0" * 25 + b"}"):
            with pytest.raises(MalformedBody):
                json_format.decode(body)

    def test_data_null_is_no_data(self) -> None:
        decoded = json_format.decode(structured(data=None))
        assert decoded.data is None
        assert "data" not in decoded.attributes

    def test_no_data_at_all(self) -> None:
        assert json_format.decode(structured()).data is None

    def test_attribute_errors_still_apply(self) -> None:
        with pytest.raises(InvalidAttribute) as caught:
            json_format.decode(structured(data="x", time="yesterday"))
        assert caught.value.attribute == "time"

    def test_not_an_object(self) -> None:
        with pytest.raises(InvalidAttribute, match="must be a JSON object, got array"):
            json_format.decode(b"[]")

    def test_not_json(self) -> None:
        with pytest.raises(MalformedBody):
            json_format.decode(b"{")

    def test_batch_errors_name_the_index(self) -> None:
        body = orjson.dumps([BASE, {**BASE, "id": ""}])
        with pytest.raises(EventError) as caught:
            json_format.decode_batch(body)
        assert (caught.value.index, caught.value.attribute) == (1, "id")
        assert str(caught.value) == "event[1]: attribute 'id': must be a non-empty string"

    def test_batch_limit(self) -> None:
        with pytest.raises(LimitExceeded):
            json_format.decode_batch(orjson.dumps([BASE] * 3), max_batch=2)


# --- HTTP binary mode: header-level rules (HTTP binding §3.1.3) -------------------------------------


def binary_headers(**extra: str) -> dict[str, str]:
    return {"ce-" + k: v for k, v in {**BASE, **extra}.items()}


@pytest.mark.usefixtures("impl")
class TestBinaryHeaders:
    def test_percent_encoded_utf8(self) -> None:
        decoded = http.decode_binary(binary_headers(subject="caf%C3%A9%20%22q%22%25"), b"")
        assert decoded.attributes["subject"] == 'café "q"%'
        assert decoded.data is None

    def test_raw_non_ascii_is_rejected_even_next_to_a_percent(self) -> None:
        for value in ("café", "café%20x"):
            with pytest.raises(InvalidAttribute, match="must be ASCII"):
                http.decode_binary(binary_headers(subject=value), b"")

    def test_percent_encoded_invalid_utf8(self) -> None:
        with pytest.raises(InvalidAttribute, match="not valid UTF-8"):
            http.decode_binary(binary_headers(subject="%C3"), b"")

    def test_percent_decoded_control_character_is_rejected(self) -> None:
        with pytest.raises(InvalidAttribute, match="forbids"):
            http.decode_binary(binary_headers(subject="a%0Ab"), b"")

    def test_header_names_are_case_insensitive(self) -> None:
        headers = {"CE-SpecVersion": "1.0", "Ce-Id": "1", "ce-SOURCE": "/s", "ce-type": "t",
                   "Content-Type": "text/plain"}  # fmt: skip
        decoded = http.decode_binary(headers, b"hi")
        assert decoded.attributes == {"specversion": "1.0", "id": "1", "source": "/s", "type": "t",
                                      "datacontenttype": "text/plain"}  # fmt: skip
        assert http.detect_mode(headers) is http.Mode.BINARY

    def test_detect_mode_reads_content_type_from_a_plain_dict_in_any_case(self) -> None:
        assert http.detect_mode({"Content-Type": "application/cloudevents+json"}) is http.Mode.STRUCTURED
        assert http.detect_mode({"CONTENT-TYPE": "application/cloudevents-batch+json"}) is http.Mode.BATCH

    def test_duplicate_attribute(self) -> None:
        class Multi(dict[str, str]):
            def items(self) -> Any:  # what a multi-dict (aiohttp's CIMultiDict) yields for repeated headers
                return [*super().items(), ("CE-ID", "2")]

        with pytest.raises(InvalidAttribute, match="more than one header"):
            http.decode_binary(Multi(binary_headers()), b"")

    def test_attributes_are_validated(self) -> None:
        with pytest.raises(InvalidAttribute) as caught:
            http.decode_binary(binary_headers(time="2023-02-29T00:00:00Z"), b"")
        assert caught.value.attribute == "time"
