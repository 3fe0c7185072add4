"""CESQL abstract syntax tree, a recursive-descent (Pratt) parser, and a printer.

The AST is a tree of frozen, slotted dataclasses with typed fields: the evaluator (evaluate.py) and a
later Cython twin compile the same tree. Every node carries the `span` of text it came from for error
messages; spans take no part in equality, so `parse(to_text(ast)) == ast` holds.

Precedence (spec 3.6), tightest first; operators of equal precedence group left to right:

    function invocation
    NOT x, -x                          (prefix; their operand is a primary or another prefix operator)
    x [NOT] LIKE 'pattern'             (postfix)
    EXISTS identifier                  (a primary in effect)
    x [NOT] IN (y, ...)                (postfix)
    *  /  %
    +  -
    =  !=  <>  >=  <=  >  <
    AND  OR  XOR                       (one level, so `a OR b AND c` is `(a OR b) AND c`)

Because the prefix operators bind tighter than every binary operator, `NOT a = b` is `(NOT a) = b`
and `-a * b` is `(-a) * b`, as in CESQLParser.g4. The one place this parser departs from the .g4
is the logical operators: the .g4 marks them `<assoc=right>`, the spec text says equal precedence is
evaluated left to right; the spec text is normative, so they group to the left (docs/cesql.md).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Final, TypeAlias

from . import lexer
from .lexer import EOF, INT, STRING, WORD, Token, string_literal, tokenize
from .types import INT32_MAX, INT32_MIN, CesqlParseError, Span

MAX_DEPTH: Final = 200
"""Deepest AST (and nesting) accepted. Keeps parsing, compiling and evaluating far from Python's
recursion limit whatever the input; real filters are a few levels deep, a 200-way OR chain fits."""


class UnaryOp(enum.Enum):
    NOT = "NOT"
    NEGATE = "-"


class BinaryOp(enum.Enum):
    MUL = "*"
    DIV = "/"
    MOD = "%"
    ADD = "+"
    SUB = "-"
    EQ = "="
    NE = "!="  # `<>` parses to the same operator
    LT = "<"
    LE = "<="
    GT = ">"
    GE = ">="
    AND = "AND"
    OR = "OR"
    XOR = "XOR"


ARITHMETIC: Final = frozenset({BinaryOp.MUL, BinaryOp.DIV, BinaryOp.MOD, BinaryOp.ADD, BinaryOp.SUB})
RELATIONAL: Final = frozenset({BinaryOp.LT, BinaryOp.LE, BinaryOp.GT, BinaryOp.GE})
EQUALITY: Final = frozenset({BinaryOp.EQ, BinaryOp.NE})
LOGICAL: Final = frozenset({BinaryOp.AND, BinaryOp.OR, BinaryOp.XOR})


@dataclass(frozen=True, slots=True)
class _Node:
    span: Span = field(default=(0, 0), compare=False, repr=False, kw_only=True)


@dataclass(frozen=True, slots=True)
class BooleanLiteral(_Node):
    value: bool


@dataclass(frozen=True, slots=True)
class IntegerLiteral(_Node):
    value: int


@dataclass(frozen=True, slots=True)
class StringLiteral(_Node):
    value: str


@dataclass(frozen=True, slots=True)
class Identifier(_Node):
    """A context attribute or extension, by its (lower-cased) name."""

    name: str


@dataclass(frozen=True, slots=True)
class Exists(_Node):
    name: str


@dataclass(frozen=True, slots=True)
class Unary(_Node):
    op: UnaryOp
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary(_Node):
    op: BinaryOp
    left: Node
    right: Node


@dataclass(frozen=True, slots=True)
class Like(_Node):
    operand: Node
    pattern: str
    """The pattern as written in the literal: `%`, `_` and the escapes `\\%`, `\\_` still in it."""
    negated: bool = False


@dataclass(frozen=True, slots=True)
class In(_Node):
    operand: Node
    items: tuple[Node, ...]
    negated: bool = False


@dataclass(frozen=True, slots=True)
class Call(_Node):
    name: str
    """Upper-cased: function names are case-insensitive like keywords."""
    args: tuple[Node, ...]


Node: TypeAlias = (
    BooleanLiteral | IntegerLiteral | StringLiteral | Identifier | Exists | Unary | Binary | Like | In | Call
)
Literal: TypeAlias = BooleanLiteral | IntegerLiteral | StringLiteral

# Binding powers: a higher number binds tighter.
_LOGIC, _COMPARISON, _ADDITIVE, _MULTIPLICATIVE, _IN, _LIKE, _PREFIX = 1, 2, 3, 4, 5, 7, 8
_BINARY: Final[dict[str, tuple[int, BinaryOp]]] = {
    "*": (_MULTIPLICATIVE, BinaryOp.MUL),
    "/": (_MULTIPLICATIVE, BinaryOp.DIV),
    "%": (_MULTIPLICATIVE, BinaryOp.MOD),
    "+": (_ADDITIVE, BinaryOp.ADD),
    "-": (_ADDITIVE, BinaryOp.SUB),
    "=": (_COMPARISON, BinaryOp.EQ),
    "!=": (_COMPARISON, BinaryOp.NE),
    "<>": (_COMPARISON, BinaryOp.NE),
    "<": (_COMPARISON, BinaryOp.LT),
    "<=": (_COMPARISON, BinaryOp.LE),
    ">": (_COMPARISON, BinaryOp.GT),
    ">=": (_COMPARISON, BinaryOp.GE),
    "AND": (_LOGIC, BinaryOp.AND),
    "OR": (_LOGIC, BinaryOp.OR),
    "XOR": (_LOGIC, BinaryOp.XOR),
}


def parse(text: str) -> Node:
    """Parse one CESQL expression. Raises CesqlParseError with the offending position."""
    return _Parser(text).parse()


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0
        self.depth = 0

    # -- helpers ------------------------------------------------------------------------------

    def error(self, message: str, at: Token | int) -> CesqlParseError:
        return CesqlParseError(message, at if isinstance(at, int) else at.start, self.text)

    def peek(self, ahead: int = 0) -> Token:
        return self.tokens[min(self.pos + ahead, len(self.tokens) - 1)]

    def advance(self) -> Token:
        token = self.tokens[self.pos]
        if token.kind != EOF:
            self.pos += 1
        return token

    def expect(self, kind: str, what: str) -> Token:
        token = self.peek()
        if token.kind != kind:
            raise self.error(f"expected {what} but found {_describe(token)}", token)
        return self.advance()

    def check_height(self, node: Node, height: int) -> tuple[Node, int]:
        if height > MAX_DEPTH:
            raise self.error(f"expression nested deeper than {MAX_DEPTH} levels", node.span[0])
        return node, height

    # -- grammar ------------------------------------------------------------------------------

    def parse(self) -> Node:
        node, _ = self.expression(0)
        token = self.peek()
        if token.kind != EOF:
            raise self.error(f"unexpected {_describe(token)}; expected an operator or the end of the expression", token)
        return node

    def expression(self, min_bp: int) -> tuple[Node, int]:
        """Parse an expression whose operators all bind tighter than `min_bp`; returns (node, height)."""
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested deeper than {MAX_DEPTH} levels", self.peek())
        left, height = self.prefix()
        while True:
            token = self.peek()
            kind = token.kind
            if kind in _BINARY:
                bp, op = _BINARY[kind]
                if bp <= min_bp:
                    break
                self.advance()
                right, right_height = self.expression(bp)
                node = Binary(op, left, right, span=(left.span[0], right.span[1]))
                left, height = self.check_height(node, 1 + max(height, right_height))
            elif kind in ("LIKE", "IN") or (kind == "NOT" and self.peek(1).kind in ("LIKE", "IN")):
                negated = kind == "NOT"
                operator = self.peek(1) if negated else token
                bp = _LIKE if operator.kind == "LIKE" else _IN
                if bp <= min_bp:
                    break
                self.pos += 2 if negated else 1
                left, height = self.postfix(operator, left, height, negated)
            elif kind == "NOT":
                raise self.error(f"expected LIKE or IN after NOT but found {_describe(self.peek(1))}", self.peek(1))
            else:
                break
        self.depth -= 1
        return left, height

    def postfix(self, operator: Token, left: Node, height: int, negated: bool) -> tuple[Node, int]:
        if operator.kind == "LIKE":
            pattern = self.peek()
            if pattern.kind != STRING:
                # Spec 3.4.3: the pattern MUST be a string literal, otherwise a parse error.
                raise self.error(f"the pattern of LIKE must be a string literal, found {_describe(pattern)}", pattern)
            self.advance()
            return self.check_height(Like(left, pattern.text, negated, span=(left.span[0], pattern.end)), height + 1)
        self.expect("(", "'(' to open the set of IN")
        if self.peek().kind == ")":
            raise self.error("the set of IN must not be empty", self.peek())
        items, items_height = self.node_list()
        close = self.expect(")", "',' or ')' in the set of IN")
        node = In(left, items, negated, span=(left.span[0], close.end))
        return self.check_height(node, 1 + max(height, items_height))

    def node_list(self) -> tuple[tuple[Node, ...], int]:
        items: list[Node] = []
        height = 0
        while True:
            item, item_height = self.expression(0)
            items.append(item)
            height = max(height, item_height)
            if self.peek().kind != ",":
                return tuple(items), height
            self.advance()

    def prefix(self) -> tuple[Node, int]:
        token = self.advance()
        kind = token.kind
        span = (token.start, token.end)
        if kind == INT:
            return IntegerLiteral(self.integer(token.text, token), span=span), 1
        if kind in ("-", "+"):
            following = self.peek()
            if following.kind == INT and following.start == token.end:
                # A sign touching the digits is part of the literal (integer-literal ::= ('+'|'-')? digit+),
                # so `-2147483648` is a valid literal although 2147483648 is not.
                self.advance()
                value = self.integer(token.text + following.text, token)
                return IntegerLiteral(value, span=(token.start, following.end)), 1
            if kind == "+":
                raise self.error("'+' is only allowed as the sign of an integer literal (no unary plus)", token)
            operand, height = self.expression(_PREFIX)
            return self.check_height(Unary(UnaryOp.NEGATE, operand, span=(token.start, operand.span[1])), height + 1)
        if kind == "NOT":
            operand, height = self.expression(_PREFIX)
            return self.check_height(Unary(UnaryOp.NOT, operand, span=(token.start, operand.span[1])), height + 1)
        if kind == STRING:
            return StringLiteral(token.text, span=span), 1
        if kind in ("TRUE", "FALSE"):
            return BooleanLiteral(kind == "TRUE", span=span), 1
        if kind == "EXISTS":
            name = self.peek()
            if name.kind != WORD or self.peek(1).kind == "(":
                raise self.error(f"expected an attribute name after EXISTS but found {_describe(name)}", name)
            self.advance()
            return Exists(self.identifier(name), span=(token.start, name.end)), 1
        if kind == "(":
            inner, height = self.expression(0)
            self.expect(")", "')'")
            return inner, height
        if kind == WORD:
            if self.peek().kind == "(":
                return self.call(token)
            return Identifier(self.identifier(token), span=span), 1
        if kind == EOF:
            raise self.error("expected an expression but reached the end of the input", token)
        raise self.error(f"expected an expression but found {_describe(token)}", token)

    def call(self, name: Token) -> tuple[Node, int]:
        text = name.text
        if not (text[0].isalpha() and text.replace("_", "").isalpha()):
            # function-identifier ::= char ( "_" | char )*
            raise self.error(f"{text!r} is not a function name (letters and '_', starting with a letter)", name)
        self.advance()  # "("
        args: tuple[Node, ...] = ()
        height = 0
        if self.peek().kind != ")":
            args, height = self.node_list()
        close = self.expect(")", f"',' or ')' in the arguments of {text.upper()}")
        return self.check_height(Call(text.upper(), args, span=(name.start, close.end)), height + 1)

    def identifier(self, token: Token) -> str:
        text = token.text
        if "_" in text:
            # value-identifier ::= ( lowercase-char | digit )+ : CloudEvents attribute names have no '_'.
            raise self.error(f"{text!r} is not an attribute name (letters and digits only)", token)
        # CloudEvents attribute names are lower case; the TCK's `EXISTS SOURCE` addresses `source`.
        return text.lower()

    def integer(self, text: str, token: Token) -> int:
        value = int(text)
        if value < INT32_MIN or value > INT32_MAX:
            raise self.error(f"integer literal {text} is outside the 32-bit range", token)
        return value


def _describe(token: Token) -> str:
    if token.kind == EOF:
        return "the end of the input"
    if token.kind == STRING:
        return "a string literal"
    return repr(token.text)


# --------------------------------------------------------------------------------------------------
# Printer


def to_text(node: Node) -> str:
    """Canonical CESQL text for `node`: keywords upper case, every compound expression parenthesized,
    so the text parses back to an equal tree whatever the precedence rules.

    Raises ValueError for a string the literal syntax cannot spell (see `lexer.string_literal`).
    """
    if isinstance(node, BooleanLiteral):
        return "TRUE" if node.value else "FALSE"
    if isinstance(node, IntegerLiteral):
        return str(node.value)  # a negative literal prints as `-5`, which reads back as one literal
    if isinstance(node, StringLiteral):
        return string_literal(node.value)
    if isinstance(node, Identifier):
        return node.name
    if isinstance(node, Exists):
        return f"EXISTS {node.name}"
    if isinstance(node, Unary):
        # `-(5)` and not `-5`: the latter would read back as the literal -5, not as negation.
        return f"{'NOT ' if node.op is UnaryOp.NOT else '-'}({to_text(node.operand)})"
    if isinstance(node, Binary):
        return f"({to_text(node.left)} {node.op.value} {to_text(node.right)})"
    if isinstance(node, Like):
        keyword = "NOT LIKE" if node.negated else "LIKE"
        return f"({to_text(node.operand)} {keyword} {lexer.string_literal(node.pattern)})"
    if isinstance(node, In):
        keyword = "NOT IN" if node.negated else "IN"
        return f"({to_text(node.operand)} {keyword} ({', '.join(to_text(item) for item in node.items)}))"
    return f"{node.name}({', '.join(to_text(arg) for arg in node.args)})"
