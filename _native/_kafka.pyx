# cython: language_level=3, boundscheck=False, wraparound=False
"""Compiled twin of the Kafka binary mode's header list: `binary_headers` <- `_binary_headers` in
`umcef.fabric.bindings.kafka` (which selects this one when built).

Per attribute: a borrowed dict walk, one cached header name, the UTF-8 bytes of a `str` value straight
from its string (the common case) and one tuple -- no Python frame or bytecode per attribute. Values of
the other CloudEvents types, and anything outside the hot path's contract (a dict subclass, a name that
is not an exact `str`), take the pure reference's own code, so results are identical (tests/
test_kafka_binding.py, hypothesis).
"""

from cpython.dict cimport PyDict_GetItem, PyDict_Next, PyDict_SetItem
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8String, PyUnicode_GET_LENGTH

from umcef.fabric.bindings.http import attribute_to_string as _to_string

# What binary_record's size bound adds per header besides its name and value bytes (5 + 5 + 3: two
# length varints and `ce_`); equal to `umcef.fabric.bindings.kafka._HEADER_MAX_OVERHEAD` (tested).
cdef Py_ssize_t _PER_HEADER = 13
# Attribute name -> header name, like the reference's cache (bounded: names are client input).
cdef dict _NAMES = {"datacontenttype": "content-type"}
cdef Py_ssize_t _NAMES_MAX = 4096

cdef object _pure = None  # the reference, for inputs outside the hot path's contract


cdef object _header_name(str name):
    cdef PyObject *found = PyDict_GetItem(_NAMES, name)  # borrowed; NULL when missing
    if found != NULL:
        return <object>found
    header = "ce_" + name
    if len(_NAMES) < _NAMES_MAX:
        PyDict_SetItem(_NAMES, name, header)
    return header


def binary_headers(attributes):
    """The `ce_` / `content-type` headers of an event's attributes and their share of
    `binary_record`'s size bound. Twin of `umcef.fabric.bindings.kafka._binary_headers`."""
    if type(attributes) is not dict:
        return _reference()(attributes)
    cdef dict attrs = <dict>attributes
    cdef list headers = []
    cdef Py_ssize_t pos = 0, size = 0
    cdef PyObject *key
    cdef PyObject *item
    cdef bytes raw
    while PyDict_Next(attrs, &pos, &key, &item):
        name = <object>key
        if type(name) is not str:  # not reachable from a wire format; nothing done yet
            return _reference()(attributes)
        value = <object>item
        raw = PyUnicode_AsUTF8String(value if type(value) is str else _to_string(value))
        size += len(raw) + 4 * PyUnicode_GET_LENGTH(name) + _PER_HEADER
        headers.append((_header_name(name), raw))
    return headers, size


cdef object _reference():
    global _pure
    if _pure is None:
        from umcef.fabric.bindings.kafka import _binary_headers

        _pure = _binary_headers
    return _pure
