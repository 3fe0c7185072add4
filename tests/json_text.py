"""Hypothesis strategies for JSON *text*: the same value spelled many valid ways.

The raw-text scanner (`element_spans` and friends) must find the same positions whatever the writer
did, so values are written by hand here with random whitespace (line breaks included), random escapes
(short ones, `\\uXXXX` in either case, surrogate pairs, `\\/`), optional duplicate object members and
strings full of the characters a scanner could trip on: brackets, braces, commas, colons, quotes and
backslashes, at every offset of an 8-byte word.
"""

from __future__ import annotations

import json
from typing import Any

from hypothesis import strategies as st

TRICKY = '[]{}",:\\/ \t\n\u00e9\u20ac\U0001f600\u2028'
tricky_text = st.text(
    st.one_of(st.sampled_from(TRICKY), st.characters(codec="utf-8", exclude_categories=["Cs"])), max_size=24
)
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),  # beyond 64 bits too: the long-digit fallback
    st.floats(allow_nan=False, allow_infinity=False),
    tricky_text,
)
names = st.one_of(st.just("data"), tricky_text)  # `data` often: the scanner notes where its value is
values = st.recursive(
    scalars,
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(names, kids, max_size=4),
    max_leaves=16,
)
_BLANKS = ["", "", "", " ", "  ", "\t", "\n", "\r\n", " \n "]
_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t", "\r": "\\r", "\b": "\\b", "\f": "\\f"}


def _u(code: int, upper: bool) -> str:
    text = f"\\u{code:04x}"
    return text.upper().replace("\\U", "\\u") if upper else text


def _char(draw: st.DrawFn, char: str) -> str:
    code = ord(char)
    how = draw(st.integers(0, 7))
    if how == 0 or (code < 0x20 and char not in _SHORT) or 0xD800 <= code <= 0xDFFF:  # \uXXXX
        upper = draw(st.booleans())
        if code > 0xFFFF:  # a surrogate pair
            code -= 0x10000
            return _u(0xD800 + (code >> 10), upper) + _u(0xDC00 + (code & 0x3FF), upper)
        return _u(code, upper)
    if char in _SHORT:
        return _SHORT[char]
    if char == "/" and how == 1:
        return "\\/"
    return char


def _string(draw: st.DrawFn, text: str) -> str:
    return '"' + "".join(_char(draw, c) for c in text) + '"'


def _blank(draw: st.DrawFn, flat: bool) -> str:
    return "" if flat else draw(st.sampled_from(_BLANKS))


def write(draw: st.DrawFn, value: Any, flat: bool = False, duplicates: bool = True) -> str:
    """JSON text for `value`; `flat`: no whitespace at all (one line, like most writers)."""
    if isinstance(value, dict):
        members = list(value.items())
        if duplicates and members and draw(st.integers(0, 9)) == 0:
            # A repeated name first, with another value: parsers keep the last one, i.e. `value`.
            members.insert(0, (members[-1][0], draw(scalars)))
        parts = [
            _blank(draw, flat) + _string(draw, k) + _blank(draw, flat) + ":" + _blank(draw, flat)
            + write(draw, v, flat, duplicates) + _blank(draw, flat)
            for k, v in members
        ]
        return "{" + ",".join(parts) + ("" if parts else _blank(draw, flat)) + "}"
    if isinstance(value, list):
        parts = [_blank(draw, flat) + write(draw, v, flat, duplicates) + _blank(draw, flat) for v in value]
        return "[" + ",".join(parts) + ("" if parts else _blank(draw, flat)) + "]"
    if isinstance(value, str):
        return _string(draw, value)
    if isinstance(value, float) and draw(st.booleans()):
        return repr(value).replace("e+", "E+") if "e" in repr(value) else json.dumps(value)
    return json.dumps(value)


@st.composite
def texts(draw: st.DrawFn, strategy: st.SearchStrategy[Any] = values) -> tuple[Any, bytes]:
    """(value, its JSON text as UTF-8)."""
    value = draw(strategy)
    return value, write(draw, value).encode("utf-8")


@st.composite
def array_texts(draw: st.DrawFn, elements: st.SearchStrategy[Any] = values, flat: bool = False) -> bytes:
    """A JSON array of `elements`, each written its own way."""
    items = draw(st.lists(elements, max_size=6))
    inner = [_blank(draw, flat) + write(draw, item, flat) + _blank(draw, flat) for item in items]
    return (_blank(draw, flat) + "[" + ",".join(inner) + ("" if inner else _blank(draw, flat)) + "]"
            + _blank(draw, flat)).encode("utf-8")  # fmt: skip
