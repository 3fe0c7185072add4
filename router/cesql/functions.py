"""Built-in CESQL functions (spec 3.5) and the registry that resolves calls by name and arity.

A function implementation receives its arguments already cast to the parameter types and returns a
value of its return type. When it cannot produce its regular result it raises `FunctionFailure`
carrying the value the spec prescribes for that case and the error type (FunctionEvaluationError
unless said otherwise); the evaluator records the error and uses the value. Exceptions are free in
CPython 3.11 when nothing is raised, and every failure path here is off the hot path.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Final

from .lexer import KEYWORDS
from .types import (
    INT32_MAX,
    INT32_MIN,
    CastError,
    CesqlError,
    FunctionEvaluationError,
    MathError,
    Type,
    Value,
    cast_value,
    to_string,
)


class FunctionFailure(Exception):
    """Raised by an implementation: return `value` and record an error of type `error` with `message`."""

    def __init__(self, value: Value, message: str, error: type[CesqlError] = FunctionEvaluationError) -> None:
        super().__init__(message)
        self.value = value
        self.message = message
        self.error = error


@dataclass(frozen=True, slots=True)
class Function:
    """One overload: `name(parameters..., variadic...) -> return_type`.

    `Type.ANY` as a parameter type means "no implicit cast". `variadic`, when set, is the type of any
    number (zero or more) of trailing arguments after the fixed `parameters`.
    """

    name: str
    parameters: tuple[Type, ...]
    return_type: Type
    implementation: Callable[..., Value]
    variadic: Type | None = None
    builtin: bool = False

    def accepts(self, arity: int) -> bool:
        fixed = len(self.parameters)
        return arity == fixed or (self.variadic is not None and arity > fixed)

    def parameter_type(self, index: int) -> Type:
        if index < len(self.parameters):
            return self.parameters[index]
        assert self.variadic is not None
        return self.variadic

    def signature(self) -> str:
        params = [p.value for p in self.parameters]
        if self.variadic is not None:
            params.append(f"{self.variadic.value}...")
        return f"{self.name}({', '.join(params)}) -> {self.return_type.value}"


class FunctionDefinitionError(ValueError):
    """A function set the spec forbids (3.5): overloads that cannot be told apart."""


_NAME = re.compile(r"[A-Za-z][A-Za-z_]*\Z")


class FunctionRegistry:
    """Functions by name (case-insensitive) and arity. Built-ins come first; user functions are added
    with `register`, which enforces the overloading rules of spec 3.5:

    - no two overloads of a name with the same fixed arity (implicit casts make types useless for
      dispatch);
    - at most one variadic overload per name, and only if its number of fixed parameters is greater
      than the arity of every fixed-arity overload of that name.
    """

    def __init__(self, functions: Iterable[Function] = ()) -> None:
        self._by_name: dict[str, list[Function]] = {}
        for function in functions:
            self.register(function)

    @classmethod
    def with_builtins(cls) -> FunctionRegistry:
        return cls(BUILTINS)

    def copy(self) -> FunctionRegistry:
        return FunctionRegistry(self)

    def __iter__(self) -> Iterator[Function]:
        for overloads in self._by_name.values():
            yield from overloads

    def register(self, function: Function) -> None:
        name = function.name.upper()
        if not _NAME.match(function.name) or name in KEYWORDS:
            raise FunctionDefinitionError(f"{function.name!r} cannot be a function name")
        if function.return_type is Type.ANY:
            raise FunctionDefinitionError(f"{function.signature()}: the return type must be a primitive type")
        if function.name != name:
            function = Function(
                name, function.parameters, function.return_type, function.implementation, function.variadic,
                function.builtin,
            )
        overloads = self._by_name.get(name, [])
        fixed = len(function.parameters)
        for other in overloads:
            other_fixed = len(other.parameters)
            if function.variadic is None and other.variadic is None and fixed == other_fixed:
                raise FunctionDefinitionError(f"{function.signature()}: {other.signature()} has the same arity")
            if function.variadic is not None and other.variadic is not None:
                raise FunctionDefinitionError(f"{function.signature()}: {other.signature()} is variadic already")
            variadic, plain = (function, other) if function.variadic is not None else (other, function)
            if variadic.variadic is not None and len(variadic.parameters) <= len(plain.parameters):
                raise FunctionDefinitionError(
                    f"{variadic.signature()} needs more fixed parameters than {plain.signature()} has"
                )
        self._by_name[name] = [*overloads, function]

    def resolve(self, name: str, arity: int) -> Function | None:
        """The overload of `name` that takes `arity` arguments; a fixed arity wins over a variadic."""
        overloads = self._by_name.get(name.upper(), ())
        for function in overloads:
            if function.variadic is None and len(function.parameters) == arity:
                return function
        for function in overloads:
            if function.accepts(arity):
                return function
        return None

    def names(self) -> list[str]:
        return sorted(self._by_name)


# --------------------------------------------------------------------------------------------------
# String functions (3.5.1)

# Unicode's White_Space property. `str.strip()` would also strip U+001C..U+001F, which are control
# characters, not whitespace; the spec says TRIM must not remove those.
UNICODE_WHITESPACE: Final = (
    "\u0009\u000a\u000b\u000c\u000d\u0020\u0085\u00a0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)


def fn_length(x: str) -> int:
    return len(x)  # characters are Unicode code points


def fn_concat(*xs: str) -> str:
    return "".join(xs)


def fn_concat_ws(delimiter: str, *xs: str) -> str:
    return delimiter.join(xs)


def fn_lower(x: str) -> str:
    return x.lower()


def fn_upper(x: str) -> str:
    return x.upper()


def fn_trim(x: str) -> str:
    return x.strip(UNICODE_WHITESPACE)


def fn_left(x: str, y: int) -> str:
    if y < 0:
        raise FunctionFailure(x, f"LEFT: the length must not be negative, got {y}")
    return x[:y]


def fn_right(x: str, y: int) -> str:
    if y < 0:
        raise FunctionFailure(x, f"RIGHT: the length must not be negative, got {y}")
    return x[len(x) - y :] if y < len(x) else x


def _substring_start(x: str, pos: int, name: str) -> int | None:
    """0-based start for a 1-based (or negative, from the end) `pos`; None for pos 0."""
    length = len(x)
    if pos > length or pos < -length:
        raise FunctionFailure("", f"{name}: position {pos} is outside a string of length {length}")
    if pos == 0:
        return None
    return pos - 1 if pos > 0 else length + pos


def fn_substring(x: str, pos: int) -> str:
    start = _substring_start(x, pos, "SUBSTRING")
    return "" if start is None else x[start:]


def fn_substring_len(x: str, pos: int, length: int) -> str:
    if length < 0:
        raise FunctionFailure("", f"SUBSTRING: the length must not be negative, got {length}")
    start = _substring_start(x, pos, "SUBSTRING")
    return "" if start is None else x[start : start + length]


# --------------------------------------------------------------------------------------------------
# Math (3.5.2)


def fn_abs(x: int) -> int:
    if x == INT32_MIN:
        raise FunctionFailure(INT32_MAX, "ABS: |-2147483648| is outside the 32-bit range", MathError)
    return abs(x)


# --------------------------------------------------------------------------------------------------
# Casting and type checks. The v1 spec's function tables no longer list them, but its casting
# section refers to "the same semantics of INT / STRING", the TCK calls INT, BOOL and STRING, and the
# reference SDKs ship all five; they perform the casts of spec 3.7 explicitly.


def fn_int(x: Value) -> int:
    value = cast_value(x, Type.INTEGER, explicit=True)
    if value is None:
        raise FunctionFailure(0, f"INT: cannot cast {_shown(x)} to Integer", CastError)
    return value  # type: ignore[return-value]


def fn_bool(x: Value) -> bool:
    value = cast_value(x, Type.BOOLEAN, explicit=True)
    if value is None:
        raise FunctionFailure(False, f"BOOL: cannot cast {_shown(x)} to Boolean", CastError)
    return value  # type: ignore[return-value]


def fn_string(x: Value) -> str:
    return to_string(x)


def fn_is_int(x: Value) -> bool:
    """True when INT(x) succeeds."""
    return cast_value(x, Type.INTEGER, explicit=True) is not None


def fn_is_bool(x: Value) -> bool:
    """True when BOOL(x) succeeds."""
    return cast_value(x, Type.BOOLEAN, explicit=True) is not None


def _shown(x: Value) -> str:
    text = to_string(x)
    if type(x) is str:
        return repr(text if len(text) <= 40 else text[:37] + "...")
    return text


S, N, B, A = Type.STRING, Type.INTEGER, Type.BOOLEAN, Type.ANY  # N for "number": ruff rejects `I`


def _builtin(
    name: str, params: tuple[Type, ...], ret: Type, impl: Callable[..., Value], variadic: Type | None = None
) -> Function:
    return Function(name, params, ret, impl, variadic, builtin=True)


BUILTINS: Final[tuple[Function, ...]] = (
    _builtin("LENGTH", (S,), N, fn_length),
    _builtin("CONCAT", (), S, fn_concat, variadic=S),
    _builtin("CONCAT_WS", (S,), S, fn_concat_ws, variadic=S),
    _builtin("LOWER", (S,), S, fn_lower),
    _builtin("UPPER", (S,), S, fn_upper),
    _builtin("TRIM", (S,), S, fn_trim),
    _builtin("LEFT", (S, N), S, fn_left),
    _builtin("RIGHT", (S, N), S, fn_right),
    _builtin("SUBSTRING", (S, N), S, fn_substring),
    _builtin("SUBSTRING", (S, N, N), S, fn_substring_len),
    _builtin("ABS", (N,), N, fn_abs),
    _builtin("INT", (A,), N, fn_int),
    _builtin("BOOL", (A,), B, fn_bool),
    _builtin("STRING", (A,), S, fn_string),
    _builtin("IS_INT", (A,), B, fn_is_int),
    _builtin("IS_BOOL", (A,), B, fn_is_bool),
)

DEFAULT_REGISTRY: Final = FunctionRegistry(BUILTINS)
"""The built-ins; `compile_expression` uses it unless given another registry."""
