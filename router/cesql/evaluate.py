"""Compile a CESQL AST into a tree of Python closures, once; evaluate it per event.

Every compiled node is a function `fn(attributes, errors) -> value`: it returns its value and appends
any error to the shared `errors` list. No AST is walked and no isinstance dispatch happens at run
time; the shapes that dominate routing filters (`attr = 'literal'`, `attr LIKE 'prefix%'`,
`EXISTS attr`, `attr > 3`, `attr IN (...)`) get closures that read the attribute inline.

Error semantics (spec 3.2, 3.3 and the TCK; docs/cesql.md explains the reading):

1. An operator or function whose operand (or argument) produced an error returns the zero value of
   its own return type: `missing * 5` is 0, `true AND (1 != 1 / 0)` is false, `NOT missing` is
   false. The operand's errors stay in the list. A missing attribute is the case the spec spells out;
   any other error propagates the same way, which is what the TCK's math cases require.
2. An operator's *own* failure yields the value its definition gives and the operator carries on:
   a failed implicit cast gives the target type's zero value (`NOT 10` casts 10 to Boolean, fails,
   so it is NOT false = true, plus a CastError); division by zero gives 0; overflow saturates;
   a function returns what the spec prescribes (`ABS(-2147483648)` is 2147483647).
3. The flow is static: every operand is evaluated, left to right, except where AND / OR
   short-circuit (the right side of AND is skipped when the left is false, of OR when it is true;
   an operand that failed counts as its zero value, false, for that purpose).
4. A bare attribute that is missing evaluates to false (its type cannot be known; spec 3.2).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from . import parser as ast
from .functions import DEFAULT_REGISTRY, Function, FunctionFailure, FunctionRegistry
from .parser import BinaryOp, UnaryOp
from .types import (
    ANY,
    BOOLEAN,
    INT32_MAX,
    INT32_MIN,
    INTEGER,
    NOT_REPRESENTABLE,
    PY_TYPE,
    STRING,
    CesqlError,
    CesqlParseError,
    FunctionEvaluationError,
    GenericError,
    MathError,
    MissingAttributeError,
    MissingFunctionError,
    Span,
    Type,
    Value,
    attribute_value,
    cast_error,
    clamp_int32,
    parse_bool,
    parse_int32,
    to_string,
    truncated_divmod,
)

Attributes = Mapping[str, Any]
Errors = list[CesqlError]
EvalFn = Callable[[Attributes, Errors], Any]

REQUIRED_ATTRIBUTES: Final = frozenset({"id", "source", "specversion", "type"})
"""Spec 3.4.4: EXISTS is always true for these (the input event is assumed valid)."""

_MISSING: Final = object()


class Result:
    """What an evaluation returns: the value (bool, int or str) and the errors, possibly none."""

    __slots__ = ("errors", "value")

    def __init__(self, value: Value, errors: tuple[CesqlError, ...] = ()) -> None:
        self.value = value
        self.errors = errors

    @property
    def ok(self) -> bool:
        return not self.errors

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Result):
            return NotImplemented
        return type(self.value) is type(other.value) and self.value == other.value and self.errors == other.errors

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Result({self.value!r}, errors={list(self.errors)!r})"


class Expression:
    """A compiled CESQL expression. Immutable, thread-safe, cheap to evaluate many times."""

    __slots__ = ("_fn", "ast", "result_type", "static_errors", "text")

    def __init__(
        self, text: str, tree: ast.Node, fn: EvalFn, result_type: Type | None, static_errors: tuple[CesqlError, ...]
    ) -> None:
        self.text = text
        self.ast = tree
        self._fn = fn
        self.result_type = result_type
        """The static type of the value, or None when it depends on the event (a bare attribute)."""
        self.static_errors = static_errors
        """Errors certain to occur on every evaluation (calls no registered function can take).
        A control plane can reject such a filter up front (the Subscriptions API says it SHOULD)."""

    def evaluate(self, attributes: Attributes) -> Result:
        """Evaluate against an event's attributes (name -> str | int | bool | bytes | ...).

        Never raises: an unexpected failure (a broken Mapping, say) is a GenericError.
        """
        errors: Errors = []
        try:
            value = self._fn(attributes, errors)
        except Exception as exc:  # the last line of defence; every known failure is an error value
            errors.append(GenericError(f"evaluation failed: {type(exc).__name__}: {exc}"))
            value = False
        return Result(value, tuple(errors))

    def matches(self, attributes: Attributes) -> bool:
        """Filter semantics (spec 1.2): true only for the Boolean true with no error at all."""
        errors: Errors = []
        try:
            return self._fn(attributes, errors) is True and not errors
        except Exception:
            return False

    def __repr__(self) -> str:
        return f"Expression({self.text!r})"


def compile_expression(text: str, functions: FunctionRegistry | None = None, *, optimize: bool = True) -> Expression:
    """Parse and compile `text`. Raises CesqlParseError (with the position) if it is not CESQL."""
    tree = ast.parse(text)
    return compile_ast(tree, text=text, functions=functions, optimize=optimize)


def compile_ast(
    tree: ast.Node, *, text: str | None = None, functions: FunctionRegistry | None = None, optimize: bool = True
) -> Expression:
    """Compile a parsed tree. `optimize=False` turns off constant folding and the specialised closures
    for common shapes, leaving one general closure per operator: the same semantics, slower. The
    tests compare the two on random expressions and events, so every fast path is checked against
    the plain statement of the rules."""
    compiler = _Compiler(functions if functions is not None else DEFAULT_REGISTRY, optimize)
    compiled = compiler.compile(tree)
    if text is None:
        try:
            text = ast.to_text(tree)
        except ValueError:  # a string value no literal can spell: the tree still compiles
            text = repr(tree)
    return Expression(text, tree, compiled.fn, compiled.type, tuple(compiler.static_errors))


def evaluate(
    text: str, attributes: Attributes, functions: FunctionRegistry | None = None, *, optimize: bool = True
) -> Result:
    """Compile and evaluate in one go; a parse failure is the Result `false` with the ParseError
    (a filter that does not parse matches nothing)."""
    try:
        expression = compile_expression(text, functions, optimize=optimize)
    except CesqlParseError as exc:
        return Result(False, (exc,))
    return expression.evaluate(attributes)


# --------------------------------------------------------------------------------------------------
# Run-time helpers: the semantics in small functions, each usable on its own.


def _attribute_slow(raw: Any, missing: MissingAttributeError, errors: Errors) -> Any:
    if raw is None:  # absent, or present as null, which CloudEvents formats treat as absent
        errors.append(missing)
        return _MISSING
    value = attribute_value(raw)
    if value is NOT_REPRESENTABLE:
        errors.append(GenericError(f"attribute '{missing.attribute}' has no CESQL representation", missing.span))
        return _MISSING
    return value


def as_int(value: Any, errors: Errors, span: Span) -> int:
    """Implicit cast to Integer; a failure records a CastError and gives 0."""
    kind = type(value)
    if kind is int:
        return value  # type: ignore[no-any-return]
    if kind is bool:
        return 1 if value else 0
    parsed = parse_int32(value)
    if parsed is None:
        errors.append(cast_error(value, INTEGER, span))
        return 0
    return parsed


def as_bool(value: Any, errors: Errors, span: Span) -> bool:
    """Implicit cast to Boolean (String "true"/"false" in any case; never an Integer: see types.cast_value)."""
    if value is True or value is False:
        return value
    parsed = parse_bool(value) if type(value) is str else None
    if parsed is None:
        errors.append(cast_error(value, BOOLEAN, span))
        return False
    return parsed


def as_type(value: Any, target: Type, errors: Errors, span: Span) -> Any:
    if target is STRING:
        return to_string(value)
    if target is INTEGER:
        return as_int(value, errors, span)
    if target is BOOLEAN:
        return as_bool(value, errors, span)
    return value


def overflow(value: int, what: str, errors: Errors, span: Span) -> int:
    """A result outside the 32-bit range: saturate to the nearest bound and record a MathError."""
    errors.append(MathError(f"{what} = {value} is outside the 32-bit Integer range", span))
    return clamp_int32(value)


# The arithmetic operators on two Integers, with the spec's error values. Each checks the range
# inline and only builds a message when it has to.


def int_add(x: int, y: int, errors: Errors, span: Span) -> int:
    r = x + y
    return r if INT32_MIN <= r <= INT32_MAX else overflow(r, f"{x} + {y}", errors, span)


def int_sub(x: int, y: int, errors: Errors, span: Span) -> int:
    r = x - y
    return r if INT32_MIN <= r <= INT32_MAX else overflow(r, f"{x} - {y}", errors, span)


def int_mul(x: int, y: int, errors: Errors, span: Span) -> int:
    r = x * y
    return r if INT32_MIN <= r <= INT32_MAX else overflow(r, f"{x} * {y}", errors, span)


def int_div(x: int, y: int, errors: Errors, span: Span) -> int:
    """Rounded towards zero; `/ 0` is 0 and a MathError; -2147483648 / -1 saturates."""
    if y == 0:
        errors.append(MathError(f"{x} / 0: division by zero", span))
        return 0
    r = truncated_divmod(x, y)[0]
    return r if r <= INT32_MAX else overflow(r, f"{x} / {y}", errors, span)


def int_mod(x: int, y: int, errors: Errors, span: Span) -> int:
    """The remainder has the sign of `x`; `% 0` is 0 and a MathError."""
    if y == 0:
        errors.append(MathError(f"{x} % 0: division by zero", span))
        return 0
    return truncated_divmod(x, y)[1]


INTEGER_OPS: Final[dict[BinaryOp, Callable[[int, int, Errors, Span], int]]] = {
    BinaryOp.ADD: int_add,
    BinaryOp.SUB: int_sub,
    BinaryOp.MUL: int_mul,
    BinaryOp.DIV: int_div,
    BinaryOp.MOD: int_mod,
}


class LikePlan:
    """A LIKE pattern analysed once: `%` any run, `_` one character, `\\%` and `\\_` literal; a backslash
    before anything else is an ordinary character.

    `kind` is how to match: "exact", "prefix", "suffix", "contains", "ends" (prefix and suffix) or
    "regex" (DOTALL, so `_` and `%` match a newline too). Only "regex" needs the `re` module; the rest
    are single str operations, which is what nearly every routing pattern turns out to be.
    """

    __slots__ = ("head", "kind", "regex", "tail")

    def __init__(self, pattern: str) -> None:
        pieces: list[str] = []  # the literal text between wildcards
        wildcards: list[str] = []
        literal: list[str] = []
        i = 0
        n = len(pattern)
        while i < n:
            c = pattern[i]
            if c == "\\" and i + 1 < n and pattern[i + 1] in "%_":
                literal.append(pattern[i + 1])
                i += 2
                continue
            if c == "%" or c == "_":
                pieces.append("".join(literal))
                literal = []
                wildcards.append(c)
            else:
                literal.append(c)
            i += 1
        pieces.append("".join(literal))
        self.head = pieces[0]
        self.tail = pieces[-1]
        self.regex: re.Pattern[str] | None = None
        if not wildcards:
            self.kind = "exact"
        elif wildcards == ["%"]:
            self.kind = "prefix" if not self.tail else "suffix" if not self.head else "ends"
        elif wildcards == ["%", "%"] and not pieces[0] and not pieces[2]:
            self.kind = "contains"
            self.head = pieces[1]
        else:
            self.kind = "regex"
            regex: list[str] = []
            for k, piece in enumerate(pieces):
                regex.append(re.escape(piece))
                if k < len(wildcards):
                    regex.append(".*" if wildcards[k] == "%" else ".")
            self.regex = re.compile("".join(regex), re.DOTALL)

    def matcher(self) -> Callable[[str], bool]:
        head, tail, kind = self.head, self.tail, self.kind
        if kind == "exact":
            return lambda s: s == head
        if kind == "prefix":
            return lambda s: s.startswith(head)
        if kind == "suffix":
            return lambda s: s.endswith(tail)
        if kind == "contains":
            return lambda s: head in s
        if kind == "ends":
            size = len(head) + len(tail)
            return lambda s: len(s) >= size and s.startswith(head) and s.endswith(tail)
        assert self.regex is not None
        fullmatch = self.regex.fullmatch
        return lambda s: fullmatch(s) is not None


def like_matcher(pattern: str) -> Callable[[str], bool]:
    """A predicate `str -> bool` for a LIKE pattern (see LikePlan)."""
    return LikePlan(pattern).matcher()


def _like_attribute(name: str, plan: LikePlan, negated: bool, missing: MissingAttributeError) -> EvalFn:
    """`attr [NOT] LIKE 'pattern'`, the commonest filter there is: the str test is inlined for the
    usual kinds of pattern, so a String attribute costs one dict lookup and one str method."""
    match = plan.matcher()

    def slow(v: Any, errors: Errors) -> bool:
        v = _attribute_slow(v, missing, errors)
        if v is _MISSING:
            return False
        return match(to_string(v)) is not negated

    head, tail = plan.head, plan.tail
    if plan.kind == "prefix":
        def like_prefix(attributes: Attributes, errors: Errors) -> bool:
            v = attributes.get(name)
            if type(v) is str:
                return v.startswith(head) is not negated
            return slow(v, errors)
        return like_prefix
    if plan.kind == "suffix":
        def like_suffix(attributes: Attributes, errors: Errors) -> bool:
            v = attributes.get(name)
            if type(v) is str:
                return v.endswith(tail) is not negated
            return slow(v, errors)
        return like_suffix
    if plan.kind == "contains":
        def like_contains(attributes: Attributes, errors: Errors) -> bool:
            v = attributes.get(name)
            if type(v) is str:
                return (head in v) is not negated
            return slow(v, errors)
        return like_contains

    def like_other(attributes: Attributes, errors: Errors) -> bool:
        v = attributes.get(name)
        if type(v) is str:
            return match(v) is not negated
        return slow(v, errors)
    return like_other


# --------------------------------------------------------------------------------------------------
# The compiler


class _Compiled:
    """A compiled node: its function; its static type (None: depends on the event); when it is a
    compile-time constant that cannot fail, its value; and whether it is *exact*.

    An exact node records errors only when it returns its zero value (false, 0, ""), so a parent that
    sees any other value knows, without counting the error list, that the operand did not fail.
    Attribute reads, literals, EXISTS, LIKE, AND and string equality are exact; a cast that can fail
    and still let a non-zero value through (`NOT 10` is true with a CastError) is not.
    """

    __slots__ = ("const", "exact", "fn", "is_const", "type")

    def __init__(self, fn: EvalFn, type_: Type | None, const: Any = _MISSING, *, exact: bool = False) -> None:
        self.fn = fn
        self.type = type_
        self.const = const
        self.is_const = const is not _MISSING
        self.exact = exact or self.is_const


def _constant(value: Value) -> _Compiled:
    return _Compiled(lambda attributes, errors: value, _type_of_value(value), value)


def _type_of_value(value: Value) -> Type:
    return BOOLEAN if type(value) is bool else INTEGER if type(value) is int else STRING


_RELATIONAL_OPS: Final[dict[BinaryOp, Callable[[int, int], bool]]] = {
    BinaryOp.LT: operator.lt,
    BinaryOp.LE: operator.le,
    BinaryOp.GT: operator.gt,
    BinaryOp.GE: operator.ge,
}
# `literal < attr` is `attr > literal`.
_MIRRORED: Final = {
    BinaryOp.LT: BinaryOp.GT,
    BinaryOp.LE: BinaryOp.GE,
    BinaryOp.GT: BinaryOp.LT,
    BinaryOp.GE: BinaryOp.LE,
}


class _Compiler:
    def __init__(self, functions: FunctionRegistry, optimize: bool = True) -> None:
        self.functions = functions
        self.optimize = optimize
        self.static_errors: list[CesqlError] = []

    def compile(self, node: ast.Node) -> _Compiled:
        return self._compile(node)

    def _compile(self, node: ast.Node) -> _Compiled:
        if isinstance(node, ast.BooleanLiteral | ast.IntegerLiteral | ast.StringLiteral):
            return _constant(node.value)
        if isinstance(node, ast.Identifier):
            return _Compiled(_identifier(node.name, node.span), None, exact=True)
        if isinstance(node, ast.Exists):
            if node.name in REQUIRED_ATTRIBUTES:
                return _constant(True)
            return _Compiled(_exists(node.name), BOOLEAN, exact=True)
        if isinstance(node, ast.Unary):
            return self._unary(node)
        if isinstance(node, ast.Binary):
            return self._binary(node)
        if isinstance(node, ast.Like):
            return self._like(node)
        if isinstance(node, ast.In):
            return self._in(node)
        return self._call(node)

    def _fold(self, compiled: _Compiled, children: list[_Compiled]) -> _Compiled:
        """Constant folding: a node over constants only is evaluated now, unless that records an error
        (then it stays a run-time node, so every evaluation reports the error)."""
        if not self.optimize or not all(child.is_const for child in children):
            return compiled
        errors: Errors = []
        value = compiled.fn({}, errors)
        return compiled if errors else _constant(value)

    # -- unary ---------------------------------------------------------------------------------

    def _unary(self, node: ast.Unary) -> _Compiled:
        operand = self._compile(node.operand)
        fn = operand.fn
        span = node.span
        if node.op is UnaryOp.NOT:
            def not_(attributes: Attributes, errors: Errors) -> bool:
                n = len(errors)
                x = fn(attributes, errors)
                if len(errors) != n:
                    return False
                if x is True:
                    return False
                if x is False:
                    return True
                return not as_bool(x, errors, span)
            return self._fold(_Compiled(not_, BOOLEAN), [operand])

        def negate(attributes: Attributes, errors: Errors) -> int:
            n = len(errors)
            x = fn(attributes, errors)
            if len(errors) != n:
                return 0
            if type(x) is not int:
                x = as_int(x, errors, span)
            if x == INT32_MIN:
                errors.append(MathError("-(-2147483648) is outside the 32-bit Integer range", span))
                return INT32_MAX
            return -x
        return self._fold(_Compiled(negate, INTEGER), [operand])

    # -- binary --------------------------------------------------------------------------------

    def _binary(self, node: ast.Binary) -> _Compiled:
        op = node.op
        if op is BinaryOp.AND or op is BinaryOp.OR:
            return self._and_or(node)
        special = self._fast_comparison(node) if self.optimize else None
        if special is not None:
            return special
        left = self._compile(node.left)
        right = self._compile(node.right)
        if op in ast.ARITHMETIC:
            compiled = _Compiled(_arithmetic(op, left.fn, right.fn, node.span), INTEGER)
        elif op in ast.RELATIONAL:
            compiled = _Compiled(_relational(_RELATIONAL_OPS[op], left.fn, right.fn, node.span), BOOLEAN)
        elif op in ast.EQUALITY:
            compiled = _Compiled(_equality(op is BinaryOp.NE, left.fn, right.fn, node.span), BOOLEAN)
        else:
            exact = left.type is BOOLEAN and right.type is BOOLEAN
            compiled = _Compiled(_xor(left.fn, right.fn, node.span), BOOLEAN, exact=exact)
        return self._fold(compiled, [left, right])

    @staticmethod
    def _fast_comparison(node: ast.Binary) -> _Compiled | None:
        """An attribute against a literal, the shape of most filters, gets a closure of its own."""
        left, right, op = node.left, node.right, node.op
        if isinstance(left, ast.Identifier) and isinstance(right, ast.Literal):
            return _attribute_vs_literal(op, left, right.value, node.span, mirrored=False)
        if isinstance(right, ast.Identifier) and isinstance(left, ast.Literal) and op in _MIRRORED:
            return _attribute_vs_literal(_MIRRORED[op], right, left.value, node.span, mirrored=True)
        return None

    def _and_or(self, node: ast.Binary) -> _Compiled:
        left = self._compile(node.left)
        right = self._compile(node.right)
        lf, rf, span = left.fn, right.fn, node.span
        if node.op is BinaryOp.AND:
            if self.optimize and left.exact and right.exact:
                # Neither operand can fail and still return a non-zero value, so: false (failed or
                # not) stops, true goes on, anything else is cast. No error-list bookkeeping at all.
                def and_exact(attributes: Attributes, errors: Errors) -> bool:
                    x = lf(attributes, errors)
                    if x is not True and (x is False or not as_bool(x, errors, span)):
                        return False  # short circuit: the right operand is not evaluated
                    y = rf(attributes, errors)
                    if y is True or y is False:
                        return y
                    return as_bool(y, errors, span)
                return self._fold(_Compiled(and_exact, BOOLEAN, exact=True), [left, right])

            def and_(attributes: Attributes, errors: Errors) -> bool:
                n = len(errors)
                x = lf(attributes, errors)
                if len(errors) != n:
                    return False
                if x is not True and (x is False or not as_bool(x, errors, span)):
                    return False  # short circuit: the right operand is not evaluated
                y = rf(attributes, errors)
                if len(errors) != n:
                    return False
                if y is True or y is False:
                    return y
                return as_bool(y, errors, span)
            # Exact: every error path returns false.
            return self._fold(_Compiled(and_, BOOLEAN, exact=True), [left, right])

        def or_(attributes: Attributes, errors: Errors) -> bool:
            n = len(errors)
            x = lf(attributes, errors)
            failed = len(errors) != n
            if not failed:
                if x is True:
                    return True  # short circuit
                if x is not False:
                    # The OR's own cast: a failure makes x false and is the OR's error, not its operand's.
                    x = as_bool(x, errors, span)
                    if x:
                        return True
            m = len(errors)
            y = rf(attributes, errors)
            if failed or len(errors) != m:
                return False
            if y is True or y is False:
                return y
            return as_bool(y, errors, span)
        # With Boolean operands OR makes no casts, so its only errors are its operands' and it is false.
        exact = left.type is BOOLEAN and right.type is BOOLEAN
        return self._fold(_Compiled(or_, BOOLEAN, exact=exact), [left, right])

    # -- LIKE, IN --------------------------------------------------------------------------------

    def _like(self, node: ast.Like) -> _Compiled:
        plan = LikePlan(node.pattern)
        negated = node.negated
        if self.optimize and isinstance(node.operand, ast.Identifier):
            missing = MissingAttributeError(node.operand.name, node.operand.span)
            return _Compiled(_like_attribute(node.operand.name, plan, negated, missing), BOOLEAN, exact=True)
        match = plan.matcher()

        operand = self._compile(node.operand)
        fn = operand.fn

        def like(attributes: Attributes, errors: Errors) -> bool:
            n = len(errors)
            x = fn(attributes, errors)
            if len(errors) != n:
                return False
            if type(x) is not str:
                x = to_string(x)
            return match(x) is not negated
        return self._fold(_Compiled(like, BOOLEAN, exact=True), [operand])

    def _in(self, node: ast.In) -> _Compiled:
        operand = self._compile(node.operand)
        items = [self._compile(item) for item in node.items]
        negated = node.negated
        fn = operand.fn
        if self.optimize and all(item.is_const for item in items):
            # The set cast to each possible operand type, once. Casts that fail are errors of every
            # evaluation with that operand type, so they are kept and appended at run time.
            tables: dict[type, tuple[frozenset[Any], tuple[CesqlError, ...]]] = {}
            for target, pytype in PY_TYPE.items():
                errors: Errors = []
                pairs = zip(items, node.items, strict=True)
                values = frozenset(as_type(item.const, target, errors, source.span) for item, source in pairs)
                tables[pytype] = (values, tuple(errors))
            str_values = tables[str][0] if not tables[str][1] else None

            def in_constants(attributes: Attributes, errors: Errors) -> bool:
                n = len(errors)
                x = fn(attributes, errors)
                if len(errors) != n:
                    return False
                if str_values is not None and type(x) is str:
                    return (x in str_values) is not negated
                values, cast_errors = tables[type(x)]
                if cast_errors:
                    errors.extend(cast_errors)
                # Same-type comparison only: the set holds values of x's type, so True never meets 1.
                return (x in values) is not negated
            return self._fold(_Compiled(in_constants, BOOLEAN), [operand, *items])

        item_fns = [(item.fn, node.items[k].span) for k, item in enumerate(items)]

        def in_(attributes: Attributes, errors: Errors) -> bool:
            n = len(errors)
            x = fn(attributes, errors)
            ys = [f(attributes, errors) for f, _ in item_fns]
            if len(errors) != n:
                return False
            target = _type_of_value(x)
            found = False
            for y, (_, item_span) in zip(ys, item_fns, strict=True):
                if type(y) is not type(x):
                    y = as_type(y, target, errors, item_span)
                if y == x:
                    found = True  # keep casting the rest: their cast errors belong to this evaluation
            return found is not negated
        return _Compiled(in_, BOOLEAN)

    # -- function calls ------------------------------------------------------------------------

    def _call(self, node: ast.Call) -> _Compiled:
        args = [self._compile(arg) for arg in node.args]
        arg_fns = tuple(arg.fn for arg in args)
        span = node.span
        function = self.functions.resolve(node.name, len(args))
        if function is None:
            error = MissingFunctionError(_missing_function_message(self.functions, node.name, len(args)), span)
            self.static_errors.append(error)

            def missing_function(attributes: Attributes, errors: Errors) -> bool:
                for f in arg_fns:  # the arguments still run: their errors are part of the result
                    f(attributes, errors)
                errors.append(error)
                return False
            return _Compiled(missing_function, BOOLEAN, exact=True)
        compiled = _Compiled(_invoke(function, arg_fns, span, self.optimize), function.return_type)
        # User functions are not folded: nothing says they are pure.
        return self._fold(compiled, args) if function.builtin else compiled


def _valid_result(value: object, pytype: type) -> bool:
    """A user function's result: of the declared type, and an Integer inside the 32-bit range."""
    if type(value) is not pytype:
        return False
    return not isinstance(value, int) or isinstance(value, bool) or INT32_MIN <= value <= INT32_MAX


def _missing_function_message(functions: FunctionRegistry, name: str, arity: int) -> str:
    overloads = [f.signature() for f in functions if f.name == name]
    if overloads:
        return f"no overload of {name} takes {arity} argument{'s' if arity != 1 else ''} (have: {'; '.join(overloads)})"
    return f"unknown function {name}"


def _invoke(function: Function, arg_fns: tuple[EvalFn, ...], span: Span, optimize: bool = True) -> EvalFn:
    """The closure for a resolved call: evaluate the arguments, cast them to the parameter types
    (spec 3.7: n-ary functions cast every argument), run the implementation."""
    implementation = function.implementation
    zero = function.return_type.zero
    # (index, parameter type, its Python type) for every argument that may need a cast.
    casts = tuple(
        (k, target, PY_TYPE[target]) for k in range(len(arg_fns)) if (target := function.parameter_type(k)) is not ANY
    )
    if not function.builtin:
        return _invoke_user(function, arg_fns, casts, span)

    if optimize and len(arg_fns) == 1:
        # One argument (LENGTH, LOWER, INT, ...): no list, no loop.
        (only,) = arg_fns
        target, pytype = (casts[0][1], casts[0][2]) if casts else (ANY, object)

        def call1(attributes: Attributes, errors: Errors) -> Any:
            n = len(errors)
            x = only(attributes, errors)
            if len(errors) != n:
                return zero
            if target is not ANY and type(x) is not pytype:
                x = as_type(x, target, errors, span)
            try:
                return implementation(x)
            except FunctionFailure as failure:
                errors.append(failure.error(failure.message, span))
                return failure.value
        return call1

    def call(attributes: Attributes, errors: Errors) -> Any:
        n = len(errors)
        values = [f(attributes, errors) for f in arg_fns]
        if len(errors) != n:
            return zero
        for k, target, pytype in casts:
            if type(values[k]) is not pytype:
                values[k] = as_type(values[k], target, errors, span)
        try:
            return implementation(*values)
        except FunctionFailure as failure:
            errors.append(failure.error(failure.message, span))
            return failure.value
    return call


def _invoke_user(
    function: Function, arg_fns: tuple[EvalFn, ...], casts: tuple[tuple[int, Type, type], ...], span: Span
) -> EvalFn:
    """A user-defined function: as a built-in, but its result is checked (spec 3.5.3: without a valid
    value of its return type the call gives the zero value and a FunctionEvaluationError)."""
    implementation = function.implementation
    return_type = function.return_type
    zero = return_type.zero
    result_type = PY_TYPE[return_type]
    name = function.name

    def call_user(attributes: Attributes, errors: Errors) -> Any:
        n = len(errors)
        values = [f(attributes, errors) for f in arg_fns]
        if len(errors) != n:
            return zero
        for k, target, pytype in casts:
            if type(values[k]) is not pytype:
                values[k] = as_type(values[k], target, errors, span)
        try:
            result = implementation(*values)
        except FunctionFailure as failure:
            errors.append(failure.error(failure.message, span))
            result = failure.value
        except Exception as exc:
            errors.append(FunctionEvaluationError(f"{name} failed: {type(exc).__name__}: {exc}", span))
            return zero
        if not _valid_result(result, result_type):
            errors.append(FunctionEvaluationError(f"{name} returned {result!r}, not a {return_type.value}", span))
            return zero
        return result
    return call_user


# --------------------------------------------------------------------------------------------------
# Closure factories


def _identifier(name: str, span: Span) -> EvalFn:
    missing = MissingAttributeError(name, span)

    def attribute(attributes: Attributes, errors: Errors) -> Any:
        v: Any = attributes.get(name)
        kind = type(v)
        if kind is str or kind is bool:
            return v
        if kind is int and INT32_MIN <= v <= INT32_MAX:
            return v
        v = _attribute_slow(v, missing, errors)
        return False if v is _MISSING else v
    return attribute


def _exists(name: str) -> EvalFn:
    def exists(attributes: Attributes, errors: Errors) -> bool:
        return attributes.get(name) is not None
    return exists


def _arithmetic(op: BinaryOp, lf: EvalFn, rf: EvalFn, span: Span) -> EvalFn:
    compute = INTEGER_OPS[op]

    def arithmetic(attributes: Attributes, errors: Errors) -> int:
        n = len(errors)
        x = lf(attributes, errors)
        y = rf(attributes, errors)
        if len(errors) != n:
            return 0
        if type(x) is not int:
            x = as_int(x, errors, span)
        if type(y) is not int:
            y = as_int(y, errors, span)
        return compute(x, y, errors, span)
    return arithmetic


def _relational(compare: Callable[[int, int], bool], lf: EvalFn, rf: EvalFn, span: Span) -> EvalFn:
    def relational(attributes: Attributes, errors: Errors) -> bool:
        n = len(errors)
        x = lf(attributes, errors)
        y = rf(attributes, errors)
        if len(errors) != n:
            return False
        if type(x) is not int:
            x = as_int(x, errors, span)
        if type(y) is not int:
            y = as_int(y, errors, span)
        return compare(x, y)
    return relational


def _equality(negated: bool, lf: EvalFn, rf: EvalFn, span: Span) -> EvalFn:
    """`=` is defined for each type pair (T, T); the right operand's type picks the definition and the
    left operand is cast to it (spec 3.7, the ambiguous-operator rule)."""

    def equality(attributes: Attributes, errors: Errors) -> bool:
        n = len(errors)
        x = lf(attributes, errors)
        y = rf(attributes, errors)
        if len(errors) != n:
            return False
        if type(x) is not type(y):
            x = as_type(x, _type_of_value(y), errors, span)
        return (x == y) is not negated
    return equality


def _xor(lf: EvalFn, rf: EvalFn, span: Span) -> EvalFn:
    def xor(attributes: Attributes, errors: Errors) -> bool:
        n = len(errors)
        x = lf(attributes, errors)
        y = rf(attributes, errors)
        if len(errors) != n:
            return False
        if x is not True and x is not False:
            x = as_bool(x, errors, span)
        if y is not True and y is not False:
            y = as_bool(y, errors, span)
        return x is not y
    return xor


def _attribute_vs_literal(
    op: BinaryOp, left: ast.Identifier, constant: Value, span: Span, *, mirrored: bool
) -> _Compiled | None:
    """`attr op literal` (or `literal op attr` for the order-insensitive cases) reading the attribute
    inline: one closure call per comparison instead of three, and no error-list bookkeeping.

    `mirrored` is True when the literal was written on the left; `=` then casts the *literal* to the
    attribute's type, so only the relational operators (Integer on both sides) are mirrored here.
    """
    name = left.name
    missing = MissingAttributeError(name, left.span)
    if op in ast.EQUALITY and not mirrored:
        negated = op is BinaryOp.NE
        target = _type_of_value(constant)
        pytype = PY_TYPE[target]

        def slow_equality(v: Any, errors: Errors) -> bool:
            v = _attribute_slow(v, missing, errors)
            if v is _MISSING:
                return False
            if type(v) is not pytype:
                v = as_type(v, target, errors, span)
            return (v == constant) is not negated

        if target is STRING:
            def eq_string(attributes: Attributes, errors: Errors) -> bool:
                v = attributes.get(name)
                if type(v) is str:
                    return (v == constant) is not negated
                return slow_equality(v, errors)
            return _Compiled(eq_string, BOOLEAN, exact=True)  # a cast to String cannot fail
        if target is INTEGER:
            def eq_integer(attributes: Attributes, errors: Errors) -> bool:
                v = attributes.get(name)
                # An int equal to the in-range literal is in range itself; any other int takes the slow
                # path, which turns an out-of-range one into a String first.
                if type(v) is int and v == constant:
                    return not negated
                return slow_equality(v, errors)
            # A failed cast compares 0: only `attr = 0` could then be true with an error.
            return _Compiled(eq_integer, BOOLEAN, exact=not negated and constant != 0)

        def eq_boolean(attributes: Attributes, errors: Errors) -> bool:
            v = attributes.get(name)
            if type(v) is bool:
                return (v is constant) is not negated
            return slow_equality(v, errors)
        return _Compiled(eq_boolean, BOOLEAN, exact=not negated and constant is True)

    if op in ast.RELATIONAL:
        compare = _RELATIONAL_OPS[op]
        errors_at_compile: Errors = []
        bound = as_int(constant, errors_at_compile, span)
        if errors_at_compile:
            return None  # a literal that never casts: leave it to the general path, which reports it

        def relational(attributes: Attributes, errors: Errors) -> bool:
            v: Any = attributes.get(name)
            if type(v) is not int or not INT32_MIN <= v <= INT32_MAX:
                v = _attribute_slow(v, missing, errors)
                if v is _MISSING:
                    return False
                if type(v) is not int:
                    v = as_int(v, errors, span)
            return compare(v, bound)
        # A failed cast compares 0, so the node is exact when 0 fails the comparison (`attr > 3`).
        return _Compiled(relational, BOOLEAN, exact=not compare(0, bound))
    return None
