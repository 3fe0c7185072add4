# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twin of `umcef.fabric.formats.jsonparse._parse_events_pure`: one pass over a CloudEvents
JSON body (an event or a batch) that builds only the attributes of each event and validates its
`data` value without building it.

Why: the gateway forwards `data` as the exact text it arrived in, so building its ~40 Python objects
per event (what `orjson.loads` does) is wasted work and GC pressure. The contract is orjson's: for
any bytes this raises `ValueError` iff `orjson.loads` rejects them (same grammar, UTF-8 rules, lone
surrogate rules, 1024-level depth limit, infinity on overflow), and otherwise gives the same values,
except that attribute integers beyond 64 bits are exact (orjson rounds them to floats).
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.long cimport PyLong_FromLongLong
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.math cimport isinf
from libc.string cimport memchr, memcmp

import json as _json

import orjson as _orjson


cdef extern from "Python.h":
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception) except? -1.0
    dict _PyDict_NewPresized(Py_ssize_t minused)
    bint PyUnicode_IS_COMPACT_ASCII(object o)
    Py_ssize_t PyUnicode_GET_LENGTH(object o)
    void *PyUnicode_DATA(object o)
    void Py_XDECREF(PyObject *o)
    void Py_INCREF(object o)


cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    /* Offset of the first byte among the 8 at p that a string scan must look at (quote, backslash,
       control character, non-ASCII), 8 when there is none. SWAR: each term flags its bytes exactly
       up to its lowest hit (a borrow only flags bytes above a real hit), so the lowest flag is exact. */
    static inline int umcef_jp_special8(const unsigned char *p) {
    #if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__ && defined(__GNUC__)
        uint64_t w, q, b, m;
        const uint64_t ones = 0x0101010101010101ULL;
        memcpy(&w, p, 8);
        q = w ^ (ones * 0x22);
        b = w ^ (ones * 0x5C);
        m = ((q - ones) & ~q) | ((b - ones) & ~b) | ((w - ones * 0x20) & ~w) | w;
        m &= ones * 0x80;
        return m ? __builtin_ctzll(m) >> 3 : 8;
    #else
        int k;
        for (k = 0; k < 8; k++)
            if (p[k] == 0x22 || p[k] == 0x5C || p[k] < 0x20 || p[k] >= 0x80) return k;
        return 8;
    #endif
    }
    """
    int umcef_jp_special8(const unsigned char *p) noexcept nogil


# orjson (yyjson) refuses a document nested deeper than this many arrays/objects.
# An integer of at most FAST_DIGITS digits fits a long long; one of more than SAFE_DIGITS may overflow
# a double.
cdef enum:
    MAX_DEPTH = 1024
    FAST_DIGITS = 18
    SAFE_DIGITS = 308

cdef signed char _HEXVAL[256]
for _i in range(256):
    _HEXVAL[_i] = -1
for _i in range(10):
    _HEXVAL[0x30 + _i] = _i
for _i in range(6):
    _HEXVAL[0x41 + _i] = _HEXVAL[0x61 + _i] = 10 + _i

cdef str _DATA = "data"

# Member names repeat in every event of a batch (and across requests), and so do many values
# (specversion, type, source, datacontenttype, dataschema): direct-mapped caches of their str, found by
# the raw bytes, save decoding and allocating each, and for names hashing too (the str keeps its hash)
# -- the largest costs left once `data` is not built. Short ASCII strings only: the str's storage is
# then the literal's bytes, so a hit is a memcmp; values get their own table so that unique ones (ids,
# times) do not evict the names.
cdef enum:
    CACHE_SLOTS = 1024
    CACHE_MAX = 48
cdef PyObject *_names[CACHE_SLOTS]
cdef PyObject *_values[CACHE_SLOTS]
for _i in range(CACHE_SLOTS):
    _names[_i] = _values[_i] = NULL


cdef str _cached(const unsigned char *p, Py_ssize_t start, Py_ssize_t end, PyObject **table, bint is_name):
    """The str of the unescaped string literal p[start:end] (quotes included), through `table`."""
    cdef Py_ssize_t size = end - start - 2, k
    cdef unsigned int h = 2166136261u
    cdef PyObject *hit
    cdef str text
    if size > CACHE_MAX:
        return PyUnicode_DecodeUTF8(<const char *>p + start + 1, size, NULL)
    for k in range(start + 1, end - 1):
        h = (h ^ p[k]) * 16777619u
    h = (h ^ (h >> 15)) & (CACHE_SLOTS - 1)
    hit = table[h]
    if (hit != NULL and PyUnicode_GET_LENGTH(<object>hit) == size
            and memcmp(PyUnicode_DATA(<object>hit), p + start + 1, size) == 0):
        return <str>hit
    text = PyUnicode_DecodeUTF8(<const char *>p + start + 1, size, NULL)
    if PyUnicode_IS_COMPACT_ASCII(text):
        if is_name:
            hash(text)
        Py_INCREF(text)
        Py_XDECREF(table[h])
        table[h] = <PyObject *>text
    return text


cdef inline double _to_double(const unsigned char *p, Py_ssize_t i) except? -1.0:
    """The correctly rounded double of the validated number at `i` (±inf when it overflows)."""
    cdef char *stop
    return PyOS_string_to_double(<const char *>p + i, &stop, NULL)


cdef int _fail(str message, Py_ssize_t pos) except -1:
    raise ValueError(f"{message} at byte {pos}")


cdef inline Py_ssize_t _skip_ws(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    cdef unsigned char c
    while i < n:
        c = p[i]
        if c != 0x20 and c != 0x0A and c != 0x0D and c != 0x09:
            break
        i += 1
    return i


cdef inline int _hex4(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    """The code unit of the four hex digits at `i`, or -1."""
    if i + 4 > n:
        return -1
    cdef int a = _HEXVAL[p[i]], b = _HEXVAL[p[i + 1]], c = _HEXVAL[p[i + 2]], d = _HEXVAL[p[i + 3]]
    if a < 0 or b < 0 or c < 0 or d < 0:
        return -1
    return (a << 12) | (b << 8) | (c << 4) | d


cdef Py_ssize_t _escape_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, unsigned int *cp) except -1:
    """`i` at a backslash: the index after the escape (a surrogate pair is one), its code point in `cp`.
    Lone surrogates are errors, as in orjson (a Python str could hold them, UTF-8 cannot)."""
    cdef unsigned char e
    cdef int hi, lo
    if i + 1 >= n:
        _fail("unterminated string", i)
    e = p[i + 1]
    if e == 0x75:  # u
        hi = _hex4(p, i + 2, n)
        if hi < 0:
            _fail("invalid \\u escape in string", i)
        if 0xDC00 <= hi <= 0xDFFF:
            _fail("lone low surrogate in string", i)
        if 0xD800 <= hi <= 0xDBFF:
            if i + 7 >= n or p[i + 6] != 0x5C or p[i + 7] != 0x75:
                _fail("high surrogate without a low one in string", i)
            lo = _hex4(p, i + 8, n)
            if lo < 0xDC00 or lo > 0xDFFF:
                _fail("high surrogate without a low one in string", i)
            cp[0] = 0x10000 + ((<unsigned int>(hi - 0xD800)) << 10) + <unsigned int>(lo - 0xDC00)
            return i + 12
        cp[0] = <unsigned int>hi
        return i + 6
    if e == 0x22 or e == 0x5C or e == 0x2F:
        cp[0] = e
    elif e == 0x62:
        cp[0] = 0x08
    elif e == 0x66:
        cp[0] = 0x0C
    elif e == 0x6E:
        cp[0] = 0x0A
    elif e == 0x72:
        cp[0] = 0x0D
    elif e == 0x74:
        cp[0] = 0x09
    else:
        _fail("invalid escape in string", i)
    return i + 2


cdef inline bint _cont(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    return i < n and (p[i] & 0xC0) == 0x80


cdef Py_ssize_t _utf8_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) except -1:
    """`i` at a byte >= 0x80: the index after its UTF-8 sequence. Strict (RFC 3629): no overlong
    forms, no encoded surrogates, nothing above U+10FFFF -- what orjson and Python's codec accept."""
    cdef unsigned char c = p[i], c1
    if 0xC2 <= c <= 0xDF:
        if _cont(p, i + 1, n):
            return i + 2
    elif 0xE0 <= c <= 0xEF:
        if i + 1 < n:
            c1 = p[i + 1]
            if ((c == 0xE0 and 0xA0 <= c1 <= 0xBF) or (c == 0xED and 0x80 <= c1 <= 0x9F)
                    or (c != 0xE0 and c != 0xED and 0x80 <= c1 <= 0xBF)) and _cont(p, i + 2, n):
                return i + 3
    elif 0xF0 <= c <= 0xF4:
        if i + 1 < n:
            c1 = p[i + 1]
            if ((c == 0xF0 and 0x90 <= c1 <= 0xBF) or (c == 0xF4 and 0x80 <= c1 <= 0x8F)
                    or (0xF1 <= c <= 0xF3 and 0x80 <= c1 <= 0xBF)) and _cont(p, i + 2, n) and _cont(p, i + 3, n):
                return i + 4
    _fail("invalid UTF-8", i)
    return -1


cdef Py_ssize_t _string_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, bint *escaped) except -1:
    """`i` at an opening quote: the index after the closing one, the string validated (escapes,
    control characters, UTF-8); `escaped` set when it holds a backslash. Eight bytes a step."""
    cdef Py_ssize_t start = i
    cdef unsigned char c
    cdef int k
    cdef unsigned int cp
    i += 1
    while True:
        while i + 8 <= n:
            k = umcef_jp_special8(p + i)
            i += k
            if k < 8:
                break
        if i >= n:
            _fail("unterminated string", start)
        c = p[i]
        if c == 0x22:
            return i + 1
        if c == 0x5C:
            escaped[0] = True
            i = _escape_end(p, i, n, &cp)
        elif c < 0x20:
            _fail("control character in string", i)
        elif c >= 0x80:
            i = _utf8_end(p, i, n)
        else:
            i += 1


cdef str _decode_string(const unsigned char *p, Py_ssize_t start, Py_ssize_t end, bint escaped):
    """The str of a validated string literal p[start:end] (quotes included)."""
    if not escaped:
        return PyUnicode_DecodeUTF8(<const char *>p + start + 1, end - start - 2, NULL)
    # Escapes only shrink the text (\uXXXX is 6 bytes for at most 3; a pair 12 for 4), so the UTF-8
    # of the decoded string fits in the literal's length.
    cdef char *buf = <char *>PyMem_Malloc(end - start)
    cdef Py_ssize_t i = start + 1, o = 0
    cdef unsigned int cp
    if buf == NULL:
        raise MemoryError()
    try:
        while i < end - 1:
            if p[i] != 0x5C:
                buf[o] = <char>p[i]
                o += 1
                i += 1
                continue
            i = _escape_end(p, i, end, &cp)
            if cp < 0x80:
                buf[o] = <char>cp
                o += 1
            elif cp < 0x800:
                buf[o] = <char>(0xC0 | (cp >> 6))
                buf[o + 1] = <char>(0x80 | (cp & 0x3F))
                o += 2
            elif cp < 0x10000:
                buf[o] = <char>(0xE0 | (cp >> 12))
                buf[o + 1] = <char>(0x80 | ((cp >> 6) & 0x3F))
                buf[o + 2] = <char>(0x80 | (cp & 0x3F))
                o += 3
            else:
                buf[o] = <char>(0xF0 | (cp >> 18))
                buf[o + 1] = <char>(0x80 | ((cp >> 12) & 0x3F))
                buf[o + 2] = <char>(0x80 | ((cp >> 6) & 0x3F))
                buf[o + 3] = <char>(0x80 | (cp & 0x3F))
                o += 4
        return PyUnicode_DecodeUTF8(buf, o, NULL)
    finally:
        PyMem_Free(buf)


cdef inline bint _digit(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) noexcept:
    return i < n and 0x30 <= p[i] <= 0x39


cdef Py_ssize_t _number_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, bint *is_float) except -1:
    """`i` at '-' or a digit: the index after the number (RFC 8259 grammar). A number that would be
    infinite as a double is an error, as in orjson, which reads every non-64-bit number as one."""
    cdef Py_ssize_t start = i, digits
    cdef bint exponent = False
    if p[i] == 0x2D:
        i += 1
    if not _digit(p, i, n):
        _fail("no digit in number", i)
    digits = i
    if p[i] == 0x30:
        i += 1
    else:
        while _digit(p, i, n):
            i += 1
    digits = i - digits
    is_float[0] = False
    if i < n and p[i] == 0x2E:
        i += 1
        if not _digit(p, i, n):
            _fail("no digit after decimal point", i)
        while _digit(p, i, n):
            i += 1
        is_float[0] = True
    if i < n and (p[i] == 0x65 or p[i] == 0x45):
        i += 1
        if i < n and (p[i] == 0x2B or p[i] == 0x2D):
            i += 1
        if not _digit(p, i, n):
            _fail("no digit in exponent", i)
        while _digit(p, i, n):
            i += 1
        is_float[0] = exponent = True
    if (exponent or digits > SAFE_DIGITS) and isinf(_to_double(p, start)):
        _fail("number is infinite as a double", start)
    return i


cdef Py_ssize_t _literal_end(const unsigned char *p, Py_ssize_t i, Py_ssize_t n) except -1:
    cdef unsigned char c = p[i]
    if c == 0x74 and n - i >= 4 and memcmp(p + i, b"true", 4) == 0:
        return i + 4
    if c == 0x66 and n - i >= 5 and memcmp(p + i, b"false", 5) == 0:
        return i + 5
    if c == 0x6E and n - i >= 4 and memcmp(p + i, b"null", 4) == 0:
        return i + 4
    _fail("expected a JSON value", i)
    return -1


cdef Py_ssize_t _skip_value(const unsigned char *p, Py_ssize_t i, Py_ssize_t n, int depth) except -1:
    """`i` at a value inside `depth` containers: the index after it, validated, nothing built."""
    cdef unsigned char c
    cdef bint flag = False
    if i >= n:
        _fail("unexpected end of data", i)
    c = p[i]
    if c == 0x22:
        return _string_end(p, i, n, &flag)
    if c == 0x2D or 0x30 <= c <= 0x39:
        return _number_end(p, i, n, &flag)
    if c != 0x7B and c != 0x5B:
        return _literal_end(p, i, n)
    if depth >= MAX_DEPTH:
        _fail("depth limit exceeded", i)
    i = _skip_ws(p, i + 1, n)
    if i < n and p[i] == c + 2:  # } is { + 2, ] is [ + 2
        return i + 1
    while True:
        if c == 0x7B:
            if i >= n or p[i] != 0x22:
                _fail("expected a string key", i)
            i = _skip_ws(p, _string_end(p, i, n, &flag), n)
            if i >= n or p[i] != 0x3A:
                _fail("expected ':'", i)
            i = _skip_ws(p, i + 1, n)
        i = _skip_ws(p, _skip_value(p, i, n, depth + 1), n)
        if i >= n:
            _fail("unexpected end of data", i)
        if p[i] == c + 2:
            return i + 1
        if p[i] != 0x2C:
            _fail("expected ',' or a closing bracket", i)
        i = _skip_ws(p, i + 1, n)


cdef bint _has_digit_run(const unsigned char *p, Py_ssize_t i, Py_ssize_t end) noexcept:
    """19+ consecutive digits: an integer orjson may turn into a float (below -2**63 or above 2**64-1)."""
    cdef Py_ssize_t run = 0
    while i < end:
        if 0x30 <= p[i] <= 0x39:
            run += 1
            if run > FAST_DIGITS:
                return True
        else:
            run = 0
        i += 1
    return False


cdef object _value(bytes body, const unsigned char *p, Py_ssize_t i, Py_ssize_t n, int depth, Py_ssize_t *end):
    """`i` at a value inside `depth` containers: the value as orjson builds it (integers exact), the
    index after it in `end`."""
    cdef unsigned char c
    cdef bint flag = False
    cdef Py_ssize_t j, k
    cdef long long acc
    if i >= n:
        _fail("unexpected end of data", i)
    c = p[i]
    if c == 0x22:
        j = _string_end(p, i, n, &flag)
        end[0] = j
        return _decode_string(p, i, j, True) if flag else _cached(p, i, j, _values, False)
    if c == 0x2D or 0x30 <= c <= 0x39:
        j = _number_end(p, i, n, &flag)
        end[0] = j
        if flag:
            return _to_double(p, i)
        k = i + 1 if c == 0x2D else i
        if j - k > FAST_DIGITS:
            return int(body[i:j])
        acc = 0
        while k < j:
            acc = acc * 10 + (p[k] - 0x30)
            k += 1
        return PyLong_FromLongLong(-acc if c == 0x2D else acc)
    if c == 0x7B or c == 0x5B:  # rare in attributes (an odd extension): validate, then decode the span
        j = _skip_value(p, i, n, depth)
        end[0] = j
        text = body[i:j]
        return _json.loads(text) if _has_digit_run(p, i, j) else _orjson.loads(text)
    j = _literal_end(p, i, n)
    end[0] = j
    return True if c == 0x74 else False if c == 0x66 else None


cdef Py_ssize_t _element(bytes body, const unsigned char *p, Py_ssize_t i, Py_ssize_t n, int depth,
                         list out, Py_ssize_t *size_hint) except -1:
    """`i` at one event: append its tuple to `out`, return the index after it."""
    cdef Py_ssize_t start = i, key, j, data_start = -1, data_end = -1, members = 0
    cdef bint escaped, nulls = False, is_data
    cdef dict attrs
    cdef str name
    if i >= n or p[i] != 0x7B:
        value = _value(body, p, i, n, depth, &j)
        out.append((value, start, j, -1, -1, False))
        return j
    if depth >= MAX_DEPTH:
        _fail("depth limit exceeded", i)
    attrs = _PyDict_NewPresized(size_hint[0])  # the events of a batch are alike: no resizing
    i = _skip_ws(p, i + 1, n)
    if i < n and p[i] == 0x7D:
        i += 1
    else:
        while True:
            if i >= n or p[i] != 0x22:
                _fail("expected a string key", i)
            key = i
            escaped = False
            i = _string_end(p, i, n, &escaped)
            if escaped:
                name = _decode_string(p, key, i, True)
                is_data = name == _DATA
            else:
                is_data = i - key == 6 and memcmp(p + key + 1, b"data", 4) == 0
                name = None if is_data else _cached(p, key, i, _names, True)
            i = _skip_ws(p, i, n)
            if i >= n or p[i] != 0x3A:
                _fail("expected ':'", i)
            i = _skip_ws(p, i + 1, n)
            members += 1
            if is_data:
                data_start = i
                i = data_end = _skip_value(p, i, n, depth + 1)
            else:
                value = _value(body, p, i, n, depth + 1, &i)
                if value is None:
                    nulls = True
                attrs[name] = value
            i = _skip_ws(p, i, n)
            if i >= n:
                _fail("unexpected end of data", i)
            if p[i] == 0x7D:
                i += 1
                break
            if p[i] != 0x2C:
                _fail("expected ',' or '}'", i)
            i = _skip_ws(p, i + 1, n)
    # Reusable text (see jsonparse.py): one line, no name twice (the count of distinct names falls
    # short of the members), no null attribute.
    faithful = (not nulls and members == len(attrs) + (data_start >= 0)
                and memchr(p + start, 0x0A, i - start) == NULL and memchr(p + start, 0x0D, i - start) == NULL)
    size_hint[0] = len(attrs)
    out.append((attrs, start, i, data_start, data_end, faithful))
    return i


_KINDS = {0x7B: "object", 0x5B: "array", 0x22: "string", 0x74: "boolean", 0x66: "boolean", 0x6E: "null"}


def parse_events(body, bint batch):
    """See `umcef.fabric.formats.jsonparse.parse_events` (the documented entry point)."""
    if type(body) is not bytes:
        if not isinstance(body, (bytearray, memoryview)):
            raise TypeError(f"body must be bytes, not {type(body).__name__}")
        body = bytes(body)
    cdef bytes text = <bytes>body
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(text)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(text), i = _skip_ws(p, 0, n), first
    cdef list out = []
    cdef Py_ssize_t size_hint = 0
    if i >= n:
        _fail("empty document", i)
    first = i
    if batch and p[i] == 0x5B:
        i = _skip_ws(p, i + 1, n)
        if i < n and p[i] == 0x5D:
            i += 1
        else:
            while True:
                i = _skip_ws(p, _element(text, p, i, n, 1, out, &size_hint), n)
                if i >= n:
                    _fail("unexpected end of data", i)
                if p[i] == 0x5D:
                    i += 1
                    break
                if p[i] != 0x2C:
                    _fail("expected ',' or ']'", i)
                i = _skip_ws(p, i + 1, n)
    elif batch:  # validated first: a malformed body says what is wrong with it, not that it is no array
        i = _skip_value(p, i, n, 0)
    else:
        i = _element(text, p, i, n, 0, out, &size_hint)
    i = _skip_ws(p, i, n)
    if i < n:
        _fail("unexpected content after the document", i)
    if batch and p[first] != 0x5B:
        raise ValueError(f"a batch must be a JSON array, got {_KINDS.get(p[first], 'number')}")
    return out
