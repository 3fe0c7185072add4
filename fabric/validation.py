"""CloudEvents 1.0 attribute validation — the pure-Python reference.

`umcef._native._validate` is the compiled twin with identical behaviour (tests prove it); use
`umcef.fabric.accel.validate_attributes`, which picks the fastest available one.
"""

from __future__ import annotations

import re
from typing import Any

from umcef.fabric.errors import InvalidAttribute

INT_MIN = -(2**31)
INT_MAX = 2**31 - 1

_NAME = re.compile(r"[a-z0-9]+\Z")
# Disallowed in CloudEvents String values: C0/C1 controls, DEL, lone surrogates, noncharacters.
_BAD_CHARS = re.compile(
    "[\x00-\x1f\x7f-\x9f\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff"
    "\U0001fffe\U0001ffff\U0002fffe\U0002ffff\U0003fffe\U0003ffff\U0004fffe\U0004ffff"
    "\U0005fffe\U0005ffff\U0006fffe\U0006ffff\U0007fffe\U0007ffff\U0008fffe\U0008ffff"
    "\U0009fffe\U0009ffff\U000afffe\U000affff\U000bfffe\U000bffff\U000cfffe\U000cffff"
    "\U000dfffe\U000dffff\U000efffe\U000effff\U000ffffe\U000fffff\U0010fffe\U0010ffff]"
)
# RFC 3986 characters (reserved + unreserved + '%'); percent signs must start a %HH triplet.
_URI_REF = re.compile(r"[A-Za-z0-9\-._~:/?#\[\]@!$&'()*+,;=%]*\Z")
_BAD_PCT = re.compile(r"%(?![0-9A-Fa-f]{2})")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:")
_MEDIA_TYPE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z\-]+/[!#$%&'*+.^_`|~0-9A-Za-z\-]+[ \t]*(;.*)?\Z", re.S)
# ASCII digits only: `\d` would also match other scripts' digits ("٢٠٢٤"), which `int()` then accepts.
_RFC3339 = re.compile(
    r"([0-9]{4})-([0-9]{2})-([0-9]{2})[Tt]([0-9]{2}):([0-9]{2}):([0-9]{2})(\.[0-9]+)?"
    r"([Zz]|([+-])([0-9]{2}):([0-9]{2}))\Z"
)
_DAYS = (31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31)


def check_string(name: str, value: Any) -> str:
    if type(value) is not str:
        raise InvalidAttribute(f"must be a string, got {_kind(value)}", name)
    if not (value.isascii() and value.isprintable()) and _BAD_CHARS.search(value):
        raise InvalidAttribute("contains a character CloudEvents forbids in strings (control, "
                               "surrogate or noncharacter)", name)
    return value


def check_nonempty(name: str, value: Any) -> str:
    check_string(name, value)
    if not value:
        raise InvalidAttribute("must be a non-empty string", name)
    return value  # type: ignore[no-any-return]


def check_uri_reference(name: str, value: Any) -> str:
    check_nonempty(name, value)
    if not _URI_REF.match(value) or _BAD_PCT.search(value):
        raise InvalidAttribute(f"must be a URI-reference (RFC 3986), got {value!r}", name)
    return value  # type: ignore[no-any-return]


def check_uri(name: str, value: Any) -> str:
    check_uri_reference(name, value)
    if not _SCHEME.match(value):
        raise InvalidAttribute(f"must be an absolute URI with a scheme, got {value!r}", name)
    return value  # type: ignore[no-any-return]


def check_timestamp(name: str, value: Any) -> str:
    text = check_string(name, value)
    m = _RFC3339.match(text)
    if m is None:
        raise InvalidAttribute(f"must be an RFC 3339 timestamp, got {text!r}", name)
    year, month, day = int(m[1]), int(m[2]), int(m[3])
    hour, minute, second = int(m[4]), int(m[5]), int(m[6])
    if not 1 <= month <= 12:
        raise InvalidAttribute(f"month out of range in {text!r}", name)
    leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= (_DAYS[month - 1] if month != 2 or leap else 28):
        raise InvalidAttribute(f"day out of range in {text!r}", name)
    if hour > 23 or minute > 59 or second > 60:
        raise InvalidAttribute(f"time of day out of range in {text!r}", name)
    if m[9] is not None and (int(m[10]) > 23 or int(m[11]) > 59):
        raise InvalidAttribute(f"UTC offset out of range in {text!r}", name)
    return text


def check_media_type(name: str, value: Any) -> str:
    check_nonempty(name, value)
    if not _MEDIA_TYPE.match(value):
        raise InvalidAttribute(f"must be a media type like 'application/json', got {value!r}", name)
    return value  # type: ignore[no-any-return]


def check_extension(name: Any, value: Any) -> None:
    # A dict built in code (not decoded from a wire format) may carry non-str keys: reject them
    # as bad names instead of letting `re.match` raise TypeError.
    if type(name) is not str or not _NAME.match(name):
        raise InvalidAttribute("extension names must be lower-case ASCII letters and digits", str(name))
    if name == "data":
        raise InvalidAttribute("'data' is reserved and cannot be an attribute name", name)
    kind = type(value)
    if kind is str:
        check_string(name, value)
    elif kind is bool or kind is bytes:
        return
    elif kind is int:
        if not INT_MIN <= value <= INT_MAX:
            raise InvalidAttribute("integers must fit in 32 bits (CloudEvents Integer)", name)
    else:
        raise InvalidAttribute(f"must be a string, integer, boolean or binary, got {_kind(value)}", name)


def validate_attributes(attrs: dict[str, Any], max_attributes: int = 0, max_value_bytes: int = 0) -> None:
    """Raise `InvalidAttribute` naming the first offending attribute; return None when valid.

    `max_attributes` / `max_value_bytes` are the gateway's configured limits (0 = unlimited).
    """
    spec = attrs.get("specversion")
    if spec is None:
        raise InvalidAttribute("is required", "specversion")
    if spec != "1.0":
        raise InvalidAttribute(f"unsupported version {spec!r}; this gateway accepts '1.0'", "specversion")
    check_nonempty("id", attrs.get("id") if "id" in attrs else _missing("id"))
    check_uri_reference("source", attrs.get("source") if "source" in attrs else _missing("source"))
    check_nonempty("type", attrs.get("type") if "type" in attrs else _missing("type"))
    if max_attributes and len(attrs) > max_attributes:
        raise InvalidAttribute(f"too many attributes: {len(attrs)} > limit {max_attributes}")
    for name, value in attrs.items():
        if name in ("id", "source", "type", "specversion"):
            pass
        elif name == "time":
            check_timestamp(name, value)
        elif name == "datacontenttype":
            check_media_type(name, value)
        elif name == "subject":
            check_nonempty(name, value)
        elif name == "dataschema":
            check_uri(name, value)
        else:
            check_extension(name, value)
        if max_value_bytes and _size(value) > max_value_bytes:
            raise InvalidAttribute(f"value exceeds the limit of {max_value_bytes} bytes", name)


def _missing(name: str) -> Any:
    raise InvalidAttribute("is required", name)


def _size(value: Any) -> int:
    if type(value) is str:
        return len(value) if value.isascii() else len(value.encode("utf-8", "surrogatepass"))
    if type(value) is bytes:
        return len(value)
    return 0


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__
