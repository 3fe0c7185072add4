"""Hand-written lexer for CESQL (spec section 2; tokens as in CESQLLexer.g4).

Differences from a literal reading of CESQLLexer.g4, each deliberate:

- Keywords are case-insensitive (spec 2, "Although in the EBNF keywords are defined using uppercase
  characters, they are case-insensitive"); the .g4 gets the same effect from an upper-casing stream.
- A sign is never part of an integer token here. The .g4 lexes `-1` as one INTEGER_LITERAL, which makes
  `5 -1` a syntax error there. The parser folds a sign that *directly* touches the digits into the
  literal when it stands where an operand is expected (see parser.py), which accepts everything the
  .g4 accepts with the same meaning (`-2147483648` is still one valid literal) and also `5 -1`.
- Identifiers, keywords and function names are one token kind (a "word") that the parser classifies
  by context: a word directly followed by `(` is a function name.

String literals: `\\'` inside '...' and `\\"` inside "..." stand for the quote; a doubled quote (`''`
inside '...') does too, as in SQL (the .g4 accepts it lexically). Every other backslash stays in the
value as it is, so LIKE patterns keep their `\\%` and `\\_` escapes (spec 3.4.3) and `'ab\\c'` is the
four characters a, b, backslash, c, as the TCK and the reference SDKs have it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from .types import CesqlParseError

KEYWORDS: Final = frozenset({"AND", "OR", "XOR", "NOT", "LIKE", "EXISTS", "IN", "TRUE", "FALSE"})

# Token kinds. Keywords use their upper-case spelling as kind; punctuation uses its own text.
INT: Final = "INT"
STRING: Final = "STRING"
WORD: Final = "WORD"
EOF: Final = "EOF"

_WHITESPACE: Final = frozenset(" \t\r\n")  # CESQLLexer.g4: SPACE: [ \t\r\n]+ -> skip
_WORD_CHARS: Final = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")
_TWO_CHAR: Final = frozenset({"!=", "<>", "<=", ">="})
_ONE_CHAR: Final = frozenset("(),=<>+-*/%")


@dataclass(frozen=True, slots=True)
class Token:
    kind: str
    text: str
    """The source text; for STRING the decoded value."""
    start: int
    end: int


def tokenize(text: str) -> list[Token]:
    """Split `text` into tokens, ending with one EOF token. Raises CesqlParseError."""
    tokens: list[Token] = []
    append = tokens.append
    i = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c in _WHITESPACE:
            i += 1
            continue
        if c in _WORD_CHARS:
            j = i + 1
            while j < n and text[j] in _WORD_CHARS:
                j += 1
            word = text[i:j]
            if word.isdigit():
                append(Token(INT, word, i, j))
            else:
                upper = word.upper()
                append(Token(upper if upper in KEYWORDS else WORD, word, i, j))
            i = j
            continue
        if c == "'" or c == '"':
            i = _string(text, i, append)
            continue
        pair = text[i : i + 2]
        if pair in _TWO_CHAR:
            append(Token(pair, pair, i, i + 2))
            i += 2
            continue
        if c in _ONE_CHAR:
            append(Token(c, c, i, i + 1))
            i += 1
            continue
        if c == "!":
            raise CesqlParseError("'!' must be followed by '=' (the not-equal operator is != or <>)", i, text)
        raise CesqlParseError(f"unexpected character {c!r}", i, text)
    append(Token(EOF, "", n, n))
    return tokens


def _string(text: str, start: int, append: Callable[[Token], None]) -> int:
    quote = text[start]
    parts: list[str] = []
    i = start + 1
    n = len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 >= n:
                break
            escaped = text[i + 1]
            parts.append(quote if escaped == quote else text[i : i + 2])
            i += 2
        elif c == quote:
            if i + 1 < n and text[i + 1] == quote:  # doubled quote
                parts.append(quote)
                i += 2
                continue
            append(Token(STRING, "".join(parts), start, i + 1))
            return i + 1
        else:
            parts.append(c)
            i += 1
    raise CesqlParseError(f"unterminated string literal (opened with {quote})", start, text)


def string_literal(value: str) -> str:
    """The source text of a string literal whose value is `value` (used by the printer).

    Raises ValueError for the rare value no literal can spell: because only `\\<quote>` is an escape,
    a value whose run of backslashes of odd length sits right before the chosen quote character or
    at its end cannot be written; the other quote style is tried first.
    """
    for quote in ("'", '"'):
        if _spellable(value, quote):
            return quote + value.replace(quote, "\\" + quote) + quote
    raise ValueError(f"no CESQL string literal spells {value!r}")


def _spellable(value: str, quote: str) -> bool:
    run = 0
    for c in value:
        if c == "\\":
            run += 1
            continue
        if c == quote and run % 2 == 1:
            return False
        run = 0
    return run % 2 == 0
