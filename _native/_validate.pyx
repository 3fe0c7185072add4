# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twins of the CloudEvents decode hot path; each has a pure-Python reference:

- `validate_attributes`  <- `umcef.fabric.validation.validate_attributes`
- `event_from_dict`, `events_from_list`, `has_long_digit_run`, `element_spans`, `object_span`,
  `events_from_array`, `event_from_object`
                         <- the same names with a leading `_` in `umcef.fabric.formats.json_format`
                            (which selects these when built)

Behaviour is identical by construction and by test (tests/test_native_twin.py, hypothesis): same
result, or the same exception with the same reason, attribute and index. The regexes of the
reference become single typed passes over the string's code points (PEP 393 storage read in place,
no copies), which is where the time goes: an event is ~10 short strings checked several ways each.

Anything outside the hot path's contract (a dict subclass, non-int limits, a key that is not an
exact `str`) is handed to the pure reference, so even odd inputs behave exactly alike.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.dict cimport PyDict_GetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DATA, PyUnicode_GET_LENGTH, PyUnicode_KIND, PyUnicode_READ
from libc.stdlib cimport free, malloc
from libc.string cimport memchr, memcmp

import base64 as _base64
import binascii as _binascii

from umcef.fabric import validation as _pure
from umcef.fabric.errors import EventError, InvalidAttribute, InvalidData
from umcef.fabric.event import Event


cdef extern from "Python.h":
    bint PyUnicode_IS_ASCII(object o)


cdef object _INT_MIN = _pure.INT_MIN
cdef object _INT_MAX = _pure.INT_MAX
cdef object _pure_validate = _pure.validate_attributes

# The reasons, word for word as in the reference (the twin test compares them).
cdef str _FORBIDDEN = ("contains a character CloudEvents forbids in strings (control, "
                       "surrogate or noncharacter)")
cdef str _NONEMPTY = "must be a non-empty string"
cdef str _REQUIRED = "is required"
cdef str _BAD_NAME = "extension names must be lower-case ASCII letters and digits"
cdef str _RESERVED = "'data' is reserved and cannot be an attribute name"
cdef str _INT_RANGE = "integers must fit in 32 bits (CloudEvents Integer)"

# Character classes of the reference's regexes, as ASCII lookup tables (index < 128 only).
cdef unsigned char _URI_OK[128]     # RFC 3986 reserved + unreserved + '%'
cdef unsigned char _TCHAR[128]      # RFC 7230 token characters (media type and subtype)
cdef unsigned char _SCHEME[128]     # scheme characters after the first letter
cdef unsigned char _HEX[128]
cdef unsigned char _NAME[128]       # extension names: a-z 0-9
cdef int _DAYS[12]


cdef void _fill(unsigned char *table, bytes members):
    cdef Py_ssize_t i
    for i in range(128):
        table[i] = 0
    for i in range(len(members)):
        table[members[i]] = 1


_ALNUM = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
_fill(_URI_OK, _ALNUM + b"-._~:/?#[]@!$&'()*+,;=%")
_fill(_TCHAR, _ALNUM + b"!#$%&'*+.^_`|~-")
_fill(_SCHEME, _ALNUM + b"+.-")
_fill(_HEX, b"0123456789ABCDEFabcdef")
_fill(_NAME, b"abcdefghijklmnopqrstuvwxyz0123456789")
for _i, _d in enumerate(_pure._DAYS):
    _DAYS[_i] = _d


cdef inline bint _forbidden(Py_UCS4 c) noexcept:
    """C0/C1 controls, DEL, surrogates, U+FDD0..U+FDEF and every U+xxFFFE/U+xxFFFF."""
    if c < 0x20:
        return True
    if c < 0x7F:
        return False
    if c < 0xA0:
        return True
    if c < 0xD800:
        return False
    if c < 0xE000:
        return True
    if c < 0xFDD0:
        return False
    if c <= 0xFDEF:
        return True
    return (<unsigned int>c & 0xFFFE) == 0xFFFE  # cast: keeps the test in C


cdef inline bint _in(const unsigned char *table, Py_UCS4 c) noexcept:
    return c < 128 and table[c] != 0


cdef inline bint _digit(Py_UCS4 c) noexcept:
    return 0x30 <= c <= 0x39


cdef str _kind(object value):
    return "null" if value is None else type(value).__name__


cdef int _check_string(str name, object value) except -1:
    """`check_string`: type, then no forbidden code point anywhere."""
    if type(value) is not str:
        raise InvalidAttribute(f"must be a string, got {_kind(value)}", name)
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(value)
    cdef int kind = PyUnicode_KIND(value)
    cdef void *data = PyUnicode_DATA(value)
    cdef const unsigned char *ascii
    if PyUnicode_IS_ASCII(value):
        # The common case: one byte per character, only controls and DEL can be forbidden.
        ascii = <const unsigned char *>data
        for i in range(n):
            if ascii[i] < 0x20 or ascii[i] == 0x7F:
                raise InvalidAttribute(_FORBIDDEN, name)
        return 0
    for i in range(n):
        if _forbidden(PyUnicode_READ(kind, data, i)):
            raise InvalidAttribute(_FORBIDDEN, name)
    return 0


cdef int _check_nonempty(str name, object value) except -1:
    _check_string(name, value)
    if PyUnicode_GET_LENGTH(value) == 0:
        raise InvalidAttribute(_NONEMPTY, name)
    return 0


cdef int _check_uri_reference(str name, object value) except -1:
    """`check_uri_reference` in one pass. A forbidden character anywhere outranks a non-URI one
    (the reference runs `check_nonempty` first), so a non-URI character only sets a flag."""
    if type(value) is not str:
        raise InvalidAttribute(f"must be a string, got {_kind(value)}", name)
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(value)
    cdef int kind = PyUnicode_KIND(value)
    cdef void *data = PyUnicode_DATA(value)
    cdef Py_UCS4 c
    cdef bint bad = False
    for i in range(n):
        c = PyUnicode_READ(kind, data, i)
        if _forbidden(c):
            raise InvalidAttribute(_FORBIDDEN, name)
        if bad:
            continue
        if not _in(_URI_OK, c):
            bad = True
        elif c == 0x25:  # '%' must start a %HH triplet
            if i + 2 >= n or not (
                _in(_HEX, PyUnicode_READ(kind, data, i + 1)) and _in(_HEX, PyUnicode_READ(kind, data, i + 2))
            ):
                bad = True
    if n == 0:
        raise InvalidAttribute(_NONEMPTY, name)
    if bad:
        raise InvalidAttribute(f"must be a URI-reference (RFC 3986), got {value!r}", name)
    return 0


cdef int _check_uri(str name, object value) except -1:
    _check_uri_reference(name, value)
    cdef Py_ssize_t i = 1, n = PyUnicode_GET_LENGTH(value)
    cdef int kind = PyUnicode_KIND(value)
    cdef void *data = PyUnicode_DATA(value)
    cdef Py_UCS4 c = PyUnicode_READ(kind, data, 0)
    cdef bint ok = (0x41 <= c <= 0x5A) or (0x61 <= c <= 0x7A)
    if ok:
        while i < n and _in(_SCHEME, PyUnicode_READ(kind, data, i)):
            i += 1
        ok = i < n and PyUnicode_READ(kind, data, i) == 0x3A  # ':'
    if not ok:
        raise InvalidAttribute(f"must be an absolute URI with a scheme, got {value!r}", name)
    return 0


cdef inline int _two(int kind, void *data, Py_ssize_t i) noexcept:
    # Cast first: arithmetic on a Py_UCS4 would make Cython build a 1-character str.
    return (<int>PyUnicode_READ(kind, data, i) - 0x30) * 10 + (<int>PyUnicode_READ(kind, data, i + 1) - 0x30)


cdef int _check_timestamp(str name, object value) except -1:
    """`check_timestamp`: the RFC 3339 grammar by position, then the same range checks in order."""
    _check_string(name, value)
    cdef Py_ssize_t i, start, n = PyUnicode_GET_LENGTH(value)
    cdef int kind = PyUnicode_KIND(value)
    cdef void *data = PyUnicode_DATA(value)
    cdef Py_UCS4 c
    cdef bint ok = n >= 20
    cdef bint offset = False
    # Fixed part "YYYY-MM-DDTHH:MM:SS" (19 characters).
    if ok:
        for i in range(19):
            c = PyUnicode_READ(kind, data, i)
            if i == 4 or i == 7:
                ok = c == 0x2D  # '-'
            elif i == 10:
                ok = c == 0x54 or c == 0x74  # 'T' 't'
            elif i == 13 or i == 16:
                ok = c == 0x3A  # ':'
            else:
                ok = _digit(c)
            if not ok:
                break
    i = 19
    if ok and PyUnicode_READ(kind, data, i) == 0x2E:  # '.' then at least one digit
        i += 1
        start = i
        while i < n and _digit(PyUnicode_READ(kind, data, i)):
            i += 1
        ok = i > start
    if ok:
        ok = i < n
    if ok:
        c = PyUnicode_READ(kind, data, i)
        if c == 0x5A or c == 0x7A:  # 'Z' 'z'
            ok = i + 1 == n
        elif c == 0x2B or c == 0x2D:  # '+' '-' then HH:MM
            offset = True
            ok = (
                i + 6 == n
                and _digit(PyUnicode_READ(kind, data, i + 1))
                and _digit(PyUnicode_READ(kind, data, i + 2))
                and PyUnicode_READ(kind, data, i + 3) == 0x3A
                and _digit(PyUnicode_READ(kind, data, i + 4))
                and _digit(PyUnicode_READ(kind, data, i + 5))
            )
        else:
            ok = False
    if not ok:
        raise InvalidAttribute(f"must be an RFC 3339 timestamp, got {value!r}", name)
    cdef int year = _two(kind, data, 0) * 100 + _two(kind, data, 2)
    cdef int month = _two(kind, data, 5)
    cdef int day = _two(kind, data, 8)
    if not 1 <= month <= 12:
        raise InvalidAttribute(f"month out of range in {value!r}", name)
    cdef bint leap = year % 4 == 0 and (year % 100 != 0 or year % 400 == 0)
    if not 1 <= day <= (_DAYS[month - 1] if month != 2 or leap else 28):
        raise InvalidAttribute(f"day out of range in {value!r}", name)
    if _two(kind, data, 11) > 23 or _two(kind, data, 14) > 59 or _two(kind, data, 17) > 60:
        raise InvalidAttribute(f"time of day out of range in {value!r}", name)
    if offset and (_two(kind, data, n - 5) > 23 or _two(kind, data, n - 2) > 59):
        raise InvalidAttribute(f"UTC offset out of range in {value!r}", name)
    return 0


cdef int _check_media_type(str name, object value) except -1:
    """`check_media_type`: token '/' token, optional blanks, then the end or ';' and anything."""
    _check_nonempty(name, value)
    cdef Py_ssize_t i = 0, start, n = PyUnicode_GET_LENGTH(value)
    cdef int kind = PyUnicode_KIND(value)
    cdef void *data = PyUnicode_DATA(value)
    cdef Py_UCS4 c
    cdef bint ok
    while i < n and _in(_TCHAR, PyUnicode_READ(kind, data, i)):
        i += 1
    ok = 0 < i < n and PyUnicode_READ(kind, data, i) == 0x2F  # '/'
    if ok:
        i += 1
        start = i
        while i < n and _in(_TCHAR, PyUnicode_READ(kind, data, i)):
            i += 1
        ok = i > start
    if ok:
        while i < n:
            c = PyUnicode_READ(kind, data, i)
            if c != 0x20 and c != 0x09:
                break
            i += 1
        ok = i == n or PyUnicode_READ(kind, data, i) == 0x3B  # ';'
    if not ok:
        raise InvalidAttribute(f"must be a media type like 'application/json', got {value!r}", name)
    return 0


cdef int _check_extension(str name, object value) except -1:
    cdef Py_ssize_t i, n = PyUnicode_GET_LENGTH(name)
    cdef int kind = PyUnicode_KIND(name)
    cdef void *data = PyUnicode_DATA(name)
    cdef bint ok = n > 0
    for i in range(n):
        if not _in(_NAME, PyUnicode_READ(kind, data, i)):
            ok = False
            break
    if not ok:
        raise InvalidAttribute(_BAD_NAME, name)
    if name == "data":
        raise InvalidAttribute(_RESERVED, name)
    cdef type t = type(value)
    if t is str:
        _check_string(name, value)
    elif t is bool or t is bytes:
        pass
    elif t is int:
        if not _INT_MIN <= value <= _INT_MAX:
            raise InvalidAttribute(_INT_RANGE, name)
    else:
        raise InvalidAttribute(f"must be a string, integer, boolean or binary, got {_kind(value)}", name)
    return 0


cdef Py_ssize_t _size(object value):
    """`_size`: UTF-8 length of a string (surrogates count 3, as with 'surrogatepass'), bytes length."""
    cdef Py_ssize_t i, n, total
    cdef int kind
    cdef void *data
    cdef Py_UCS4 c
    if type(value) is str:
        n = PyUnicode_GET_LENGTH(value)
        if PyUnicode_IS_ASCII(value):
            return n
        kind = PyUnicode_KIND(value)
        data = PyUnicode_DATA(value)
        total = 0
        for i in range(n):
            c = PyUnicode_READ(kind, data, i)
            total += 1 if c < 0x80 else 2 if c < 0x800 else 3 if c < 0x10000 else 4
        return total
    if type(value) is bytes:
        return len(<bytes>value)
    return 0


def validate_attributes(attrs, max_attributes=0, max_value_bytes=0):
    """Raise `InvalidAttribute` naming the first offending attribute; return None when valid.

    Same contract as `umcef.fabric.validation.validate_attributes`.
    """
    _validate(attrs, max_attributes, max_value_bytes)
    return None


cdef int _validate(object attrs, object max_attributes, object max_value_bytes) except -1:
    cdef Py_ssize_t limit_bytes
    if type(attrs) is not dict or type(max_attributes) is not int or type(max_value_bytes) is not int:
        _pure_validate(attrs, max_attributes, max_value_bytes)
        return 0
    try:
        limit_bytes = max_value_bytes
    except OverflowError:
        _pure_validate(attrs, max_attributes, max_value_bytes)
        return 0
    cdef dict d = <dict>attrs
    # Borrowed lookups (NULL = missing): one hash probe per required attribute instead of two.
    cdef PyObject *found = PyDict_GetItem(d, "specversion")
    if found is NULL or <object>found is None:
        raise InvalidAttribute(_REQUIRED, "specversion")
    spec = <object>found
    if not (type(spec) is str and <str>spec == "1.0") and spec != "1.0":
        raise InvalidAttribute(f"unsupported version {spec!r}; this gateway accepts '1.0'", "specversion")
    found = PyDict_GetItem(d, "id")
    if found is NULL:
        raise InvalidAttribute(_REQUIRED, "id")
    _check_nonempty("id", <object>found)
    found = PyDict_GetItem(d, "source")
    if found is NULL:
        raise InvalidAttribute(_REQUIRED, "source")
    _check_uri_reference("source", <object>found)
    found = PyDict_GetItem(d, "type")
    if found is NULL:
        raise InvalidAttribute(_REQUIRED, "type")
    _check_nonempty("type", <object>found)
    if max_attributes and len(d) > max_attributes:
        raise InvalidAttribute(f"too many attributes: {len(d)} > limit {max_attributes}")
    cdef str key
    cdef Py_ssize_t n
    for name, value in d.items():
        if type(name) is not str:
            # Not reachable from any wire format; the reference decides (same order, same result).
            _pure_validate(attrs, max_attributes, max_value_bytes)
            return 0
        key = <str>name
        # Dispatch on the length first: most names are extensions and then match none of the eight.
        n = PyUnicode_GET_LENGTH(key)
        if (n == 2 and key == "id") or (n == 6 and key == "source") or (n == 11 and key == "specversion"):
            pass
        elif n == 4 and key == "type":
            pass
        elif n == 4 and key == "time":
            _check_timestamp(key, value)
        elif n == 15 and key == "datacontenttype":
            _check_media_type(key, value)
        elif n == 7 and key == "subject":
            _check_nonempty(key, value)
        elif n == 10 and key == "dataschema":
            _check_uri(key, value)
        else:
            _check_extension(key, value)
        if limit_bytes and _size(value) > limit_bytes:
            raise InvalidAttribute(f"value exceeds the limit of {max_value_bytes} bytes", key)
    return 0


# --- structured-mode JSON objects to events (twins of json_format's pure functions) ----------------


cdef str _json_kind(object value):
    cdef type t = type(value)
    if t is dict:
        return "object"
    if t is list:
        return "array"
    if t is str:
        return "string"
    if t is bool:
        return "boolean"
    if value is None:
        return "null"
    return "number"


cdef object _event_from_dict(object obj, object max_attributes, object max_value_bytes):
    if type(obj) is not dict:
        raise InvalidAttribute(f"a structured event must be a JSON object, got {_json_kind(obj)}")
    cdef dict attrs = <dict>obj
    data = None
    if "data" in attrs:
        data = attrs.pop("data")
        if "data_base64" in attrs:
            raise InvalidData("an event carries either 'data' or 'data_base64', not both", "data_base64")
    elif "data_base64" in attrs:
        encoded = attrs.pop("data_base64")
        if type(encoded) is not str:
            raise InvalidData("must be a base64 string", "data_base64")
        try:
            data = _base64.b64decode(encoded, validate=True)
        except (_binascii.Error, ValueError):
            raise InvalidData("is not valid base64", "data_base64") from None
    # JSON format: a null attribute value is the attribute being absent. An identity test per value
    # in C (the pure twin's `None in attrs.values()` compares each value with == instead).
    for value in attrs.values():
        if value is None:
            attrs = {k: v for k, v in attrs.items() if v is not None}
            break
    _validate(attrs, max_attributes, max_value_bytes)
    return Event(attrs, data)


def event_from_dict(obj, max_attributes=0, max_value_bytes=0):
    """Twin of `umcef.fabric.formats.json_format._event_from_dict`."""
    return _event_from_dict(obj, max_attributes, max_value_bytes)


def events_from_list(items, max_attributes=0, max_value_bytes=0):
    """Twin of `umcef.fabric.formats.json_format._events_from_list`: errors carry the item's index."""
    cdef list events = []
    for index, item in enumerate(items):  # Cython turns this into an indexed loop for a list
        try:
            events.append(_event_from_dict(item, max_attributes, max_value_bytes))
        except EventError as exc:
            raise exc.at(index) from None
    return events


def has_long_digit_run(body):
    """Whether `body` holds 20 or more consecutive ASCII digits, or 19 after a minus sign: a JSON integer
    orjson may not keep (above 2**64 - 1 takes 20 digits, below -2**63 takes 19; a positive 19-digit
    run, such as a nanosecond timestamp, always fits).

    Twin of `umcef.fabric.formats.json_format._has_long_digit_run`. A run of K digits ending at i
    needs body[i] to be a digit, so probe every K-th byte and skip K ahead on a non-digit; on a digit,
    look back for the nearest non-digit and skip to K past it (Horspool's idea, ~n/K probes on JSON).
    """
    if type(body) is not bytes:
        body = bytes(body)  # bytearray, memoryview: copy (rare); a plain pointer keeps the common case fast
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t K = 19, n = PyBytes_GET_SIZE(body), i = K - 1, j
    while i < n:
        if not (0x30 <= p[i] <= 0x39):
            i += K
            continue
        j = i - 1
        while j > i - K and 0x30 <= p[j] <= 0x39:
            j -= 1
        if j == i - K:  # p[j + 1 .. i]: 19 digits
            if j >= 0 and (0x30 <= p[j] <= 0x39 or p[j] == 0x2D):
                return True  # a 20th digit before them, or a minus sign
            if i + 1 < n and 0x30 <= p[i + 1] <= 0x39:
                return True  # a 20th after them
            i += 1 + K  # exactly 19, unsigned: the next run starts after p[i + 1], a non-digit
        else:
            i = j + K
    return False


# --- raw JSON text of decoded events: a scanner over an already validated body ---------------------
# Twins of `_element_spans`, `_object_span`, `_events_from_array`, `_event_from_object` in json_format.
# The body has passed orjson, so it is valid JSON: the scanner only tracks strings (quote and
# backslash aware) and nesting; it still never reads out of bounds and gives up (None) on anything
# unexpected.


cdef struct _Span:
    Py_ssize_t start, end, members, data_start, data_end


cdef inline bint _is_ws(unsigned char c) noexcept:
    return c == 0x20 or c == 0x0A or c == 0x0D or c == 0x09


cdef inline Py_ssize_t _skip_ws(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    while i < n and _is_ws(p[i]):
        i += 1
    return i


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Offset of the first quote or backslash among the 8 bytes at p, 8 when there is none. SWAR: a
       zero byte of x ^ c marks c; the lowest flagged byte is exact (a borrow only flags higher ones). */
    static inline int umcef_quote_or_backslash8(const unsigned char *p) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && defined(__GNUC__)
        uint64_t w, q, b, m;
        memcpy(&w, p, 8);
        q = w ^ 0x2222222222222222ULL;
        b = w ^ 0x5C5C5C5C5C5C5C5CULL;
        m = (((q - 0x0101010101010101ULL) & ~q) | ((b - 0x0101010101010101ULL) & ~b)) & 0x8080808080808080ULL;
        return m ? __builtin_ctzll(m) >> 3 : 8;
    #else
        int k;
        for (k = 0; k < 8; k++) if (p[k] == 0x22 || p[k] == 0x5C) return k;
        return 8;
    #endif
    }
    """
    int umcef_quote_or_backslash8(const unsigned char *p) noexcept nogil


cdef Py_ssize_t _string_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """`i` at an opening quote: the index after its closing quote, or -1. A backslash escapes the
    byte after it (the rest of a \\uXXXX escape is plain text). Eight bytes a step: strings are most
    of an event's text."""
    cdef unsigned char c
    cdef int skip
    i += 1
    while i < n:
        if i + 8 <= n:
            skip = umcef_quote_or_backslash8(p + i)
            i += skip
            if skip == 8:
                continue
        c = p[i]
        if c == 0x22:
            return i + 1
        i += 2 if c == 0x5C else 1
    return -1


# Bytes the nesting walk stops at: 1 a quote, 2 an opening bracket, 3 a closing one.
cdef unsigned char _STRUCTURE[256]
for _i in range(256):
    _STRUCTURE[_i] = 0
_STRUCTURE[0x22] = 1
_STRUCTURE[0x5B] = _STRUCTURE[0x7B] = 2
_STRUCTURE[0x5D] = _STRUCTURE[0x7D] = 3


cdef Py_ssize_t _value_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """`i` at the first byte of a value: the index after it, or -1."""
    cdef unsigned char c = p[i], kind
    cdef Py_ssize_t depth = 0
    if c == 0x22:
        return _string_end(p, i, n)
    if c == 0x7B or c == 0x5B:  # { [  (valid JSON: each closer matches its opener's kind)
        while i < n:
            kind = _STRUCTURE[p[i]]
            if kind == 0:
                i += 1
            elif kind == 1:
                i = _string_end(p, i, n)
                if i < 0:
                    return -1
            elif kind == 2:
                depth += 1
                i += 1
            else:
                depth -= 1
                i += 1
                if depth == 0:
                    return i
        return -1
    while i < n:  # number, true, false, null
        c = p[i]
        if _is_ws(c) or c == 0x2C or c == 0x5D or c == 0x7D:  # , ] }
            break
        i += 1
    return i


cdef Py_ssize_t _object_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, _Span *span) noexcept:
    """`i` at '{': the index after the matching '}', or -1; counts the members into `span` and notes
    where the value of a member spelled exactly `"data"` is (the last one, as JSON parsers keep)."""
    cdef Py_ssize_t key, value
    cdef bint is_data
    span.members = 0
    span.data_start = span.data_end = -1
    i = _skip_ws(p, i + 1, n)
    if i < n and p[i] == 0x7D:
        return i + 1
    while i < n:
        if p[i] != 0x22:
            return -1
        key = i
        i = _string_end(p, i, n)
        if i < 0:
            return -1
        is_data = i - key == 6 and memcmp(p + key, b'"data"', 6) == 0
        i = _skip_ws(p, i, n)
        if i >= n or p[i] != 0x3A:  # :
            return -1
        i = _skip_ws(p, i + 1, n)
        if i >= n:
            return -1
        value = i
        i = _value_end(p, i, n)
        if i < 0:
            return -1
        span.members += 1
        if is_data:
            span.data_start = value
            span.data_end = i
        i = _skip_ws(p, i, n)
        if i >= n:
            return -1
        if p[i] == 0x7D:
            return i + 1
        if p[i] != 0x2C:
            return -1
        i = _skip_ws(p, i + 1, n)
    return -1


cdef bint _scan_element(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, _Span *span) noexcept:
    """One value starting at `i` into `span`; False when the text is not what was expected."""
    span.start = i
    if p[i] == 0x7B:
        span.end = _object_end(p, i, n, span)
        # A line break (only ever whitespace: strings cannot hold one) would break one-event-per-line
        # output of stored payloads: such text is not reused.
        if span.end > i and (memchr(p + i, 0x0A, span.end - i) != NULL or memchr(p + i, 0x0D, span.end - i) != NULL):
            span.members = -1
    else:
        span.end = _value_end(p, i, n)
        span.members = span.data_start = span.data_end = -1
    return span.end > i


cdef Py_ssize_t _array_spans(const unsigned char *p, Py_ssize_t n, _Span *spans, Py_ssize_t capacity) noexcept:
    """The spans of a top-level array's elements into `spans`: their count, or -1 (not an array, more
    than `capacity` elements, or unexpected text)."""
    cdef Py_ssize_t i = _skip_ws(p, 0, n), count = 0
    if i >= n or p[i] != 0x5B:
        return -1
    i = _skip_ws(p, i + 1, n)
    if i < n and p[i] == 0x5D:
        return 0
    while i < n:
        if count == capacity or not _scan_element(p, i, n, &spans[count]):
            return -1
        i = _skip_ws(p, spans[count].end, n)
        count += 1
        if i >= n:
            return -1
        if p[i] == 0x5D:
            return count
        if p[i] != 0x2C:
            return -1
        i = _skip_ws(p, i + 1, n)
    return -1


cdef tuple _span_tuple(_Span *span):
    return (span.start, span.end, span.members, span.data_start, span.data_end)


def element_spans(body):
    """Where each element of the JSON array `body` is: a list of (start, end, members, data_start,
    data_end) per element, or None when `body` is not an array.

    `members` counts the members of an element that is an object written on one line, else -1;
    data_start/data_end is the value of its `"data"` member (-1, -1 without one). `body` must be
    valid JSON (what it returns for anything else is unspecified, but it returns)."""
    if type(body) is not bytes:
        body = bytes(body)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), count, k
    cdef Py_ssize_t capacity = n // 2 + 1  # an element and its comma take at least two bytes
    cdef _Span *spans = <_Span *>malloc(capacity * sizeof(_Span))
    if spans == NULL:
        raise MemoryError()
    try:
        count = _array_spans(p, n, spans, capacity)
        if count < 0:
            return None
        return [_span_tuple(&spans[k]) for k in range(count)]
    finally:
        free(spans)


def object_span(body):
    """`element_spans` for a body holding one JSON object: its (start, end, members, data_start,
    data_end), or None when `body` is not an object."""
    if type(body) is not bytes:
        body = bytes(body)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), i = _skip_ws(p, 0, n)
    cdef _Span span
    if i >= n or p[i] != 0x7B or not _scan_element(p, i, n, &span):
        return None
    return _span_tuple(&span)


cdef int _attach(object event, object item, Py_ssize_t size, bytes body, _Span *span) except -1:
    """Give `event` (decoded from `item`, which had `size` members) its text when that is faithful:
    an object on one line without duplicate members (`size` counts distinct names) and without null
    attributes (those are dropped: then the event's attributes are not `item` itself)."""
    if span.members != size or event.attributes is not item:
        return 0
    # A body that is just the event (a spooled payload read back) is not copied.
    event.raw = body if span.start == 0 and span.end == PyBytes_GET_SIZE(body) else body[span.start:span.end]
    if span.data_start >= 0 and event.data is not None:
        event.raw_data = body[span.data_start:span.data_end]
    return 0


def events_from_array(items, body, max_attributes=0, max_value_bytes=0):
    """Twin of `umcef.fabric.formats.json_format._events_from_array`: `events_from_list`, and each
    event's raw text from `body`, the JSON text `items` was parsed from."""
    cdef list things = items if type(items) is list else list(items)
    if type(body) is not bytes:
        body = bytes(body)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), count, index, size
    cdef Py_ssize_t capacity = len(things)
    cdef list events = []
    cdef _Span *spans = <_Span *>malloc((capacity + 1) * sizeof(_Span))
    if spans == NULL:
        raise MemoryError()
    try:
        count = _array_spans(p, n, spans, capacity)
        for index in range(capacity):
            item = things[index]
            size = len(<dict>item) if type(item) is dict else -2
            try:
                event = _event_from_dict(item, max_attributes, max_value_bytes)
            except EventError as exc:
                raise exc.at(index) from None
            if count == capacity:
                _attach(event, item, size, <bytes>body, &spans[index])
            events.append(event)
    finally:
        free(spans)
    return events


def event_from_object(obj, body, max_attributes=0, max_value_bytes=0):
    """Twin of `umcef.fabric.formats.json_format._event_from_object`: `event_from_dict`, and the
    event's raw text from `body`, the JSON text `obj` was parsed from."""
    if type(body) is not bytes:
        body = bytes(body)
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(body)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(body), i = _skip_ws(p, 0, n)
    cdef Py_ssize_t size = len(<dict>obj) if type(obj) is dict else -2
    cdef _Span span
    event = _event_from_dict(obj, max_attributes, max_value_bytes)
    if i < n and p[i] == 0x7B and _scan_element(p, i, n, &span):
        _attach(event, obj, size, <bytes>body, &span)
    return event
