"""CESQL's type system: the three primitive types, the casts between them, and the error types.

Everything here is a small pure function over Python values, so the closure compiler in `evaluate.py`
and a later Cython twin share one statement of the semantics. Values are plain Python objects:

    Boolean -> bool, Integer -> int (always inside the signed 32-bit range), String -> str

`bool` is a subclass of `int` in Python, so every type test in this package is `type(v) is ...`,
never `isinstance`: `True` must never be mistaken for the Integer `1`.
"""

from __future__ import annotations

import base64
import datetime as _dt
import enum
from typing import Any, ClassVar, Final, TypeAlias

Value: TypeAlias = bool | int | str
Span: TypeAlias = tuple[int, int]
"""Character offsets [start, end) of a node in the expression text."""

INT32_MIN: Final = -(2**31)
INT32_MAX: Final = 2**31 - 1


class Type(enum.Enum):
    """A CESQL type. `ANY` only appears in function signatures (no implicit cast for that parameter)."""

    BOOLEAN = "Boolean"
    INTEGER = "Integer"
    STRING = "String"
    ANY = "Any"

    @property
    def zero(self) -> Value:
        """The type's zero value (spec 3.1); `ANY` falls back to Boolean like an undeterminable type (3.2)."""
        return _ZERO[self]


# Enum attribute access (`Type.STRING`) costs ~50 ns on CPython 3.11; hot code uses these aliases.
BOOLEAN: Final = Type.BOOLEAN
INTEGER: Final = Type.INTEGER
STRING: Final = Type.STRING
ANY: Final = Type.ANY

_ZERO: Final[dict[Type, Value]] = {Type.BOOLEAN: False, Type.INTEGER: 0, Type.STRING: "", Type.ANY: False}
_TYPE_OF: Final[dict[type, Type]] = {bool: Type.BOOLEAN, int: Type.INTEGER, str: Type.STRING}
PY_TYPE: Final[dict[Type, type]] = {Type.BOOLEAN: bool, Type.INTEGER: int, Type.STRING: str}


def type_of(value: Value) -> Type:
    return _TYPE_OF[type(value)]


# --------------------------------------------------------------------------------------------------
# Errors. The spec (3.3) names seven error types; the TCK names them by `kind`.
# They are exceptions so that a fail-fast caller can raise one, but evaluation *returns* them.


class CesqlError(Exception):
    """Base of every CESQL error. `span` locates the offending subexpression in the text when known."""

    kind: ClassVar[str] = "generic"

    def __init__(self, message: str, span: Span | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.span = span

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, CesqlError)
        return self.message == other.message and self.span == other.span

    def __hash__(self) -> int:
        return hash((type(self), self.message, self.span))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, span={self.span!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # Subclasses take other constructor arguments than `Exception.args`; rebuild from the state so
        # errors survive pickling (a worker process handing results back, say).
        return (_rebuild_error, (type(self), self.args, dict(self.__dict__)))

    def __str__(self) -> str:
        return self.message


def _rebuild_error(cls: type[CesqlError], args: tuple[Any, ...], state: dict[str, Any]) -> CesqlError:
    error = cls.__new__(cls)
    Exception.__init__(error, *args)
    error.__dict__.update(state)
    return error


class GenericError(CesqlError):
    """Any error the spec does not name (here: an attribute value no CESQL type can represent)."""

    kind = "generic"


class MathError(CesqlError):
    """Division or modulo by zero, or a result outside the 32-bit Integer range."""

    kind = "math"


class CastError(CesqlError):
    """An implicit or explicit cast that has no result (`INT('abc')`, `NOT 10`)."""

    kind = "cast"


class MissingAttributeError(CesqlError):
    kind = "missingAttribute"

    def __init__(self, attribute: str, span: Span | None = None) -> None:
        super().__init__(f"attribute '{attribute}' is not present in the event", span)
        self.attribute = attribute


class MissingFunctionError(CesqlError):
    """A call no registered function (name and arity) can take."""

    kind = "missingFunction"


class FunctionEvaluationError(CesqlError):
    """A function that ran but could not produce its regular result (`LEFT('abc', -1)`)."""

    kind = "functionEvaluation"


class CesqlParseError(CesqlError):
    """The text is not a CESQL expression. `position` is the 0-based character offset of the problem;
    `line` and `column` (1-based) say the same for humans."""

    kind = "parse"

    def __init__(self, message: str, position: int, text: str = "") -> None:
        self.position = position
        before = text[:position]
        self.line = before.count("\n") + 1
        self.column = position - (before.rfind("\n") + 1) + 1
        super().__init__(message, (position, position))

    def __str__(self) -> str:
        return f"{self.message} (line {self.line}, column {self.column}, offset {self.position})"


ParseError = CesqlParseError
"""The spec's name for it (3.3)."""


# --------------------------------------------------------------------------------------------------
# Casts (spec 3.7). Each returns the cast value, or None when the cast has no result; the caller then
# uses the target type's zero value and records a CastError (the spec's "error along with a value").


def parse_int32(text: str) -> int | None:
    """String -> Integer: optional '+'/'-', then ASCII decimal digits only, inside the 32-bit range.

    Python's `int()` is far more lenient (whitespace, '_' separators, non-ASCII digits), so it only
    runs after the text has been checked to be `[+-]?[0-9]+`.
    """
    digits = text[1:] if text[:1] in ("+", "-") else text
    if not digits or not digits.isascii() or not digits.isdigit():
        return None
    value = int(text)
    if value < INT32_MIN or value > INT32_MAX:
        return None
    return value


def parse_bool(text: str) -> bool | None:
    """String -> Boolean: the lower case form must be exactly "true" or "false"."""
    lowered = text.lower()
    if lowered == "true":
        return True
    if lowered == "false":
        return False
    return None


def to_string(value: Value) -> str:
    """Any primitive -> String; always succeeds (Integer in base 10, Boolean as "true"/"false")."""
    kind = type(value)
    if kind is str:
        return value  # type: ignore[return-value]
    if kind is bool:
        return "true" if value else "false"
    return str(value)


def cast_value(value: Value, target: Type, *, explicit: bool = False) -> Value | None:
    """Cast `value` to `target`; None when the cast fails.

    The one place implicit and explicit casts differ: Integer -> Boolean. The cast table (3.7) defines
    it (0 is false, anything else true) and the explicit `BOOL()` uses it, but the TCK requires the
    *implicit* cast to fail (`NOT 10` is `true` with a CastError, i.e. the operand became `false`).
    Treating a number as a truth value is almost always a mistake in a filter, so an implicit cast
    refuses it rather than guess. docs/cesql.md records the choice.
    """
    kind = type(value)
    if target is ANY or _TYPE_OF[kind] is target:
        return value
    if target is STRING:
        return to_string(value)
    if target is INTEGER:
        if kind is bool:
            return 1 if value else 0
        return parse_int32(value)  # type: ignore[arg-type]
    # target is BOOLEAN
    if kind is str:
        return parse_bool(value)  # type: ignore[arg-type]
    if explicit:
        return value != 0
    return None


def cast_error(value: Value, target: Type, span: Span | None, *, explicit: bool = False) -> CastError:
    source = type_of(value).value
    how = "cast" if explicit else "implicitly cast"
    if type(value) is str:
        shown = value if len(value) <= 40 else value[:37] + "..."
        return CastError(f"cannot {how} String {shown!r} to {target.value}", span)
    return CastError(f"cannot {how} {source} {to_string(value)} to {target.value}", span)


# --------------------------------------------------------------------------------------------------
# Integer arithmetic. The spec only fixes ABS's overflow (`2147483647` plus a MathError); every other
# operator follows the same rule: a result outside the 32-bit range saturates to the nearest bound
# and records a MathError, instead of silently wrapping around.


def clamp_int32(value: int) -> int:
    return INT32_MIN if value < INT32_MIN else INT32_MAX if value > INT32_MAX else value


def in_int32(value: int) -> bool:
    return INT32_MIN <= value <= INT32_MAX


def truncated_divmod(x: int, y: int) -> tuple[int, int]:
    """Division rounded towards zero and the remainder with the sign of `x` (y != 0).

    Python's `//` and `%` floor instead; going through float division would lose exactness.
    """
    quotient = abs(x) // abs(y)
    if (x < 0) != (y < 0):
        quotient = -quotient
    return quotient, x - y * quotient


# --------------------------------------------------------------------------------------------------
# Attribute values. Events carry CloudEvents-typed values (fabric/event.py): str for String, URI,
# URI-reference and Timestamp, int for Integer, bool for Boolean, bytes for Binary. The spec (3.2):
# a value that is not a CESQL primitive is represented as a String, in its canonical string form
# (the same form as `umcef.fabric.bindings.http.attribute_to_string`).

_NOT_REPRESENTABLE: Final = object()


def attribute_value(raw: Any) -> Any:
    """The CESQL value of an attribute value (never None: the caller treats None as absent).

    Returns `_NOT_REPRESENTABLE` for a value that has no string form (a broken `__str__`), which the
    evaluator reports as a GenericError.
    """
    kind = type(raw)
    if kind is str or kind is bool:
        return raw
    if kind is int:
        # A CloudEvents Integer is 32-bit; a larger number is no CESQL Integer, so it is a String.
        return raw if in_int32(raw) else str(raw)
    if kind is bytes or kind is bytearray or kind is memoryview:
        return base64.b64encode(bytes(raw)).decode("ascii")
    if isinstance(raw, _dt.datetime):
        text = raw.isoformat()
        return text[:-6] + "Z" if text.endswith("+00:00") else text
    if isinstance(raw, int):  # an int subclass such as an IntEnum: its number, not its name
        number = int(raw)
        return number if in_int32(number) else str(number)
    if isinstance(raw, str):
        return str(raw)
    try:
        return str(raw)
    except Exception:
        return _NOT_REPRESENTABLE


NOT_REPRESENTABLE: Final = _NOT_REPRESENTABLE
