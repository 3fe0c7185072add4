"""Subscriptions API filters (`exact`, `prefix`, `suffix`, `all`, `any`, `not`, `sql`) compiled to a flat
node program, predicates over an event's attributes, and the static analysis the configuration check
needs (a dispatch guard on `type`, and "can these two filters match the same event?").

The flat program is what the route table stores and what the Cython twin walks: one row per node in
parallel int arrays, with strings and compiled CESQL expressions interned in side tables.

    op      a                         b
    TRUE    -                         -
    EXACT   string index of attr      string index of value
    PREFIX  string index of attr      string index of value
    SUFFIX  string index of attr      string index of value
    ALL     offset into `kids`        number of children
    ANY     offset into `kids`        number of children
    NOT     child node               -
    SQL     index into `sql`          -

`exact`/`prefix`/`suffix` compare the attribute's canonical string form (CloudEvents type system,
case-sensitive); a missing attribute never matches. `sql` is CESQL filter semantics: Boolean true with
no error (`Expression.matches`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from umcef.fabric.bindings.http import attribute_to_string
from umcef.router.cesql import (
    Binary,
    BinaryOp,
    BooleanLiteral,
    CesqlParseError,
    Expression,
    Identifier,
    In,
    Like,
    Node,
    StringLiteral,
    Unary,
    UnaryOp,
    compile_expression,
)

Attributes = Mapping[str, Any]
Predicate = Callable[[Attributes], bool]
DIALECTS: Final = ("exact", "prefix", "suffix", "all", "any", "not", "sql")

OP_TRUE: Final = 0
OP_EXACT: Final = 1
OP_PREFIX: Final = 2
OP_SUFFIX: Final = 3
OP_ALL: Final = 4
OP_ANY: Final = 5
OP_NOT: Final = 6
OP_SQL: Final = 7
OP_NAMES: Final = ("TRUE", "EXACT", "PREFIX", "SUFFIX", "ALL", "ANY", "NOT", "SQL")

LIST_ATTRIBUTE: Final = "dataregulation"
"""A comma-delimited list (data-classification extension). Residency policies see one entry at a time."""


class FilterError(ValueError):
    """A filter that cannot be compiled; `path` points into the configuration."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


@dataclass(frozen=True, slots=True)
class FilterNodes:
    """The flat, immutable node program shared by every filter of a route table."""

    op: tuple[int, ...] = ()
    a: tuple[int, ...] = ()
    b: tuple[int, ...] = ()
    kids: tuple[int, ...] = ()
    strings: tuple[str, ...] = ()
    sql: tuple[Expression, ...] = ()


@dataclass
class FilterProgram:
    """Builder: compile filter specs into one shared node program; `freeze()` gives the table's copy."""

    op: list[int] = field(default_factory=list)
    a: list[int] = field(default_factory=list)
    b: list[int] = field(default_factory=list)
    kids: list[int] = field(default_factory=list)
    strings: list[str] = field(default_factory=list)
    sql: list[Expression] = field(default_factory=list)
    _interned: dict[str, int] = field(default_factory=dict)

    def freeze(self) -> FilterNodes:
        return FilterNodes(tuple(self.op), tuple(self.a), tuple(self.b), tuple(self.kids), tuple(self.strings),
                           tuple(self.sql))

    def _string(self, text: str) -> int:
        index = self._interned.get(text)
        if index is None:
            index = self._interned[text] = len(self.strings)
            self.strings.append(text)
        return index

    def _node(self, op: int, a: int = 0, b: int = 0) -> int:
        self.op.append(op)
        self.a.append(a)
        self.b.append(b)
        return len(self.op) - 1

    def _group(self, op: int, children: Sequence[int]) -> int:
        start = len(self.kids)
        self.kids.extend(children)
        return self._node(op, start, len(children))

    def add(self, spec: Any, path: str = "filter") -> int:
        """Compile one filter (None: match everything) and return its root node."""
        if spec is None:
            return self._node(OP_TRUE)
        if not isinstance(spec, Mapping) or len(spec) != 1:
            raise FilterError(path, f"expected a mapping with exactly one dialect key of {', '.join(DIALECTS)}")
        ((dialect, body),) = spec.items()
        where = f"{path}.{dialect}"
        if dialect in ("exact", "prefix", "suffix"):
            if not isinstance(body, Mapping) or not body:
                raise FilterError(where, "expected a non-empty mapping of attribute name to string")
            op = {"exact": OP_EXACT, "prefix": OP_PREFIX, "suffix": OP_SUFFIX}[dialect]
            leaves = []
            for name, value in body.items():
                if not isinstance(value, str | int | bool) or isinstance(value, float):
                    raise FilterError(f"{where}.{name}", "expected a string value")
                leaves.append(self._node(op, self._string(str(name)), self._string(attribute_to_string(value))))
            return leaves[0] if len(leaves) == 1 else self._group(OP_ALL, leaves)
        if dialect in ("all", "any"):
            if not isinstance(body, Sequence) or isinstance(body, str) or not body:
                raise FilterError(where, "expected a non-empty list of filters")
            children = [self.add(item, f"{where}[{i}]") for i, item in enumerate(body)]
            return self._group(OP_ALL if dialect == "all" else OP_ANY, children)
        if dialect == "not":
            return self._node(OP_NOT, self.add(body, where))
        if dialect == "sql":
            if not isinstance(body, str) or not body.strip():
                raise FilterError(where, "expected a CESQL expression string")
            self.sql.append(compile_sql(body, where))
            return self._node(OP_SQL, len(self.sql) - 1)
        raise FilterError(path, f"unknown filter dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")


def compile_sql(text: str, path: str) -> Expression:
    try:
        expression = compile_expression(text)
    except CesqlParseError as exc:
        raise FilterError(path, f"CESQL syntax error at position {exc.position} (line {exc.line}, column "
                                f"{exc.column}): {exc.message}") from None
    if expression.static_errors:
        error = expression.static_errors[0]
        where = f" at position {error.span[0]}" if error.span else ""
        raise FilterError(path, f"CESQL error{where}: {error.message}")
    return expression


# -- predicates --------------------------------------------------------------------------------------


def _true(attrs: Attributes) -> bool:
    return True


def _leaf(op: int, name: str, value: str) -> Predicate:
    if op == OP_EXACT:
        def exact(attrs: Attributes) -> bool:
            v = attrs.get(name)
            if v.__class__ is str:
                return v == value
            return v is not None and attribute_to_string(v) == value
        return exact
    if op == OP_PREFIX:
        def prefix(attrs: Attributes) -> bool:
            v = attrs.get(name)
            if v.__class__ is str:
                return v.startswith(value)
            return v is not None and attribute_to_string(v).startswith(value)
        return prefix

    def suffix(attrs: Attributes) -> bool:
        v = attrs.get(name)
        if v.__class__ is str:
            return v.endswith(value)
        return v is not None and attribute_to_string(v).endswith(value)
    return suffix


def _all(parts: tuple[Predicate, ...]) -> Predicate:
    if len(parts) == 2:
        p0, p1 = parts
        return lambda attrs: p0(attrs) and p1(attrs)

    def all_(attrs: Attributes) -> bool:
        for part in parts:  # noqa: SIM110 (a plain loop is faster than all() over a generator)
            if not part(attrs):
                return False
        return True
    return all_


def _any(parts: tuple[Predicate, ...]) -> Predicate:
    if len(parts) == 2:
        p0, p1 = parts
        return lambda attrs: p0(attrs) or p1(attrs)

    def any_(attrs: Attributes) -> bool:
        for part in parts:  # noqa: SIM110
            if part(attrs):
                return True
        return False
    return any_


def predicate(nodes: FilterNodes, root: int) -> Predicate:
    """The pure-Python evaluator of one node: a tree of closures built once from the flat program."""
    op = nodes.op[root]
    a = nodes.a[root]
    b = nodes.b[root]
    if op == OP_TRUE:
        return _true
    if op in (OP_EXACT, OP_PREFIX, OP_SUFFIX):
        return _leaf(op, nodes.strings[a], nodes.strings[b])
    if op in (OP_ALL, OP_ANY):
        parts = tuple(predicate(nodes, k) for k in nodes.kids[a:a + b])
        if len(parts) == 1:
            return parts[0]
        return _all(parts) if op == OP_ALL else _any(parts)
    if op == OP_NOT:
        inner = predicate(nodes, a)
        return lambda attrs: not inner(attrs)
    if op == OP_SQL:
        return nodes.sql[a].matches
    raise ValueError(f"unknown filter op {op}")


def compile_filter(spec: Any, path: str = "filter") -> Predicate:
    """Compile one filter on its own (tests, tools); route tables share one program for all filters."""
    program = FilterProgram()
    root = program.add(spec, path)
    return predicate(program.freeze(), root)


def regulation_entries(value: str) -> list[str]:
    """The entries of a comma-delimited `dataregulation`, spaces around each ignored (spec)."""
    return [part.strip() for part in value.split(",") if part.strip()]


def regulation_views(attrs: Attributes) -> list[dict[str, Any]] | None:
    """For a `dataregulation` listing several regulations (or padded with spaces): one attribute view per
    entry, so a policy written for `GDPR` applies to `GDPR,HIPAA`. None when the value is a single entry."""
    value = attrs.get(LIST_ATTRIBUTE)
    if value.__class__ is not str or ("," not in value and value == value.strip()):
        return None
    return [{**attrs, LIST_ATTRIBUTE: entry} for entry in regulation_entries(value)] or None


# -- static analysis ---------------------------------------------------------------------------------


def type_guard(nodes: FilterNodes, root: int) -> tuple[str, str] | None:
    """A necessary condition on `type` for the filter to match: ("exact", v) or ("prefix", p), or None.

    The route table indexes routes by it, so only candidates whose guard holds are evaluated."""
    op = nodes.op[root]
    if op in (OP_EXACT, OP_PREFIX) and nodes.strings[nodes.a[root]] == "type":
        value = nodes.strings[nodes.b[root]]
        if op == OP_EXACT:
            return ("exact", value)
        return ("prefix", value) if value else None
    if op == OP_ALL:
        guards = [g for k in nodes.kids[nodes.a[root]:nodes.a[root] + nodes.b[root]]
                  if (g := type_guard(nodes, k)) is not None]
        return _strongest(guards)
    if op == OP_SQL:
        return _strongest(_sql_guards(nodes.sql[nodes.a[root]].ast))
    return None


def _strongest(guards: list[tuple[str, str]]) -> tuple[str, str] | None:
    for guard in guards:
        if guard[0] == "exact":
            return guard
    return max(guards, key=lambda g: len(g[1]), default=None)


def _sql_guards(node: Node) -> list[tuple[str, str]]:
    if isinstance(node, Binary) and node.op is BinaryOp.AND:
        return _sql_guards(node.left) + _sql_guards(node.right)
    if isinstance(node, Binary) and node.op is BinaryOp.EQ:
        for ident, lit in ((node.left, node.right), (node.right, node.left)):
            if isinstance(ident, Identifier) and ident.name == "type" and isinstance(lit, StringLiteral):
                return [("exact", lit.value)]
    if isinstance(node, Like) and not node.negated and isinstance(node.operand, Identifier) \
            and node.operand.name == "type":
        shape = _like_shape(node.pattern)
        if shape is not None and shape[0] in ("eq", "prefix") and shape[1]:
            return [("exact" if shape[0] == "eq" else "prefix", shape[1])]
    return []


def _like_shape(pattern: str) -> tuple[str, str] | None:
    """'abc' -> eq, 'abc%' -> prefix, '%abc' -> suffix; anything with `_`, escapes or more `%` -> None."""
    if "_" in pattern or "\\" in pattern:
        return None
    wildcards = pattern.count("%")
    if wildcards == 0:
        return ("eq", pattern)
    if wildcards == 1 and pattern.endswith("%"):
        return ("prefix", pattern[:-1])
    if wildcards == 1 and pattern.startswith("%"):
        return ("suffix", pattern[1:])
    if wildcards == 2 and len(pattern) > 2 and pattern.startswith("%") and pattern.endswith("%"):
        return ("contains", pattern[1:-1])
    return None


@dataclass(frozen=True, slots=True)
class Constraint:
    """What a conjunction of conditions says about one attribute's string form."""

    allowed: frozenset[str] | None = None  # present, and one of these (None: no such fact)
    excluded: frozenset[str] = frozenset()  # absent, or none of these
    prefixes: tuple[str, ...] = ()  # present, and starts with each
    suffixes: tuple[str, ...] = ()  # present, and ends with each
    absent: frozenset[str] = frozenset()  # absent, or contains none of these substrings

    def merge(self, other: Constraint) -> Constraint:
        if self.allowed is None:
            allowed = other.allowed
        elif other.allowed is None:
            allowed = self.allowed
        else:
            allowed = self.allowed & other.allowed
        return Constraint(allowed, self.excluded | other.excluded, self.prefixes + other.prefixes,
                          self.suffixes + other.suffixes, self.absent | other.absent)

    def satisfiable(self) -> bool:
        if self.allowed is not None:
            return any(v not in self.excluded and all(v.startswith(p) for p in self.prefixes)
                       and all(v.endswith(s) for s in self.suffixes) and not any(a in v for a in self.absent)
                       for v in self.allowed)
        return (all(p.startswith(q) or q.startswith(p) for p in self.prefixes for q in self.prefixes)
                and all(s.endswith(t) or t.endswith(s) for s in self.suffixes for t in self.suffixes)
                and not any(a in x for a in self.absent for x in self.prefixes + self.suffixes))


Term = dict[str, Constraint]
"""A conjunction: attribute -> constraint. An empty term is `true`."""
MAX_TERMS: Final = 256
_INT_LIKE: Final = re.compile(r"\s*[+-]?\d+\s*")


def _merge(x: Term, y: Term) -> Term | None:
    out = dict(x)
    for name, c in y.items():
        merged = out[name].merge(c) if name in out else c
        if not merged.satisfiable():
            return None
        out[name] = merged
    return out


def _cross(left: list[Term], right: list[Term]) -> list[Term]:
    out = [t for x in left for y in right if (t := _merge(x, y)) is not None]
    return out if len(out) <= MAX_TERMS else [{}]


def _union(left: list[Term], right: list[Term]) -> list[Term]:
    out = left + right
    return out if len(out) <= MAX_TERMS else [{}]


def terms(nodes: FilterNodes, root: int, negated: bool = False) -> list[Term]:
    """A superset of the filter's matches as a disjunction of conjunctions (DNF) of simple facts.

    Weakening is always safe here (a fact we cannot express becomes `true`), so "no term survives"
    proves the filter can never match. Used to prove two filters disjoint."""
    op = nodes.op[root]
    a = nodes.a[root]
    b = nodes.b[root]
    if op == OP_TRUE:
        return [] if negated else [{}]
    if op in (OP_EXACT, OP_PREFIX, OP_SUFFIX):
        name, value = nodes.strings[a], nodes.strings[b]
        if op == OP_EXACT:
            c = Constraint(excluded=frozenset({value})) if negated else Constraint(allowed=frozenset({value}))
        elif negated:
            return [{}]
        else:
            c = Constraint(prefixes=(value,)) if op == OP_PREFIX else Constraint(suffixes=(value,))
        return [{name: c}]
    if op in (OP_ALL, OP_ANY):
        children = [terms(nodes, k, negated) for k in nodes.kids[a:a + b]]
        conjunctive = (op == OP_ALL) != negated
        result = children[0]
        for child in children[1:]:
            result = _cross(result, child) if conjunctive else _union(result, child)
        return result
    if op == OP_NOT:
        return terms(nodes, a, not negated)
    if op == OP_SQL:
        return _sql_terms(nodes.sql[a].ast, negated)
    return [{}]


def _safe_literal(node: Node) -> str | None:
    """A string literal whose comparison with any attribute type means string equality of its form."""
    if not isinstance(node, StringLiteral):
        return None
    value = node.value
    if _INT_LIKE.fullmatch(value) or value.lower() in ("true", "false"):
        return None
    return value


def _sql_terms(node: Node, failing: bool) -> list[Term]:
    """Facts implied by `Expression.matches` being true (failing=False) or false (failing=True).

    CESQL folds errors into "no match" (a missing attribute is an error), so a failing expression says
    little: only facts that a missing attribute also satisfies (`excluded`, `absent`) are derived from
    it, and De Morgan is applied only where it holds with errors (`A OR B` failing implies `A`
    failing, not `B`: `A` may have failed with an error while `B` was true)."""
    if isinstance(node, BooleanLiteral):
        return [{}] if node.value != failing else []
    if isinstance(node, Unary) and node.op is UnaryOp.NOT:
        # NOT A matching means A evaluated to false without error, which implies A failing.
        return [{}] if failing else _sql_terms(node.operand, True)
    if isinstance(node, Binary):
        if node.op is BinaryOp.AND:
            left, right = _sql_terms(node.left, failing), _sql_terms(node.right, failing)
            return _union(left, right) if failing else _cross(left, right)
        if node.op is BinaryOp.OR:
            if failing:
                return _sql_terms(node.left, True)
            return _union(_sql_terms(node.left, False), _sql_terms(node.right, False))
        if node.op in (BinaryOp.EQ, BinaryOp.NE):
            for ident, lit in ((node.left, node.right), (node.right, node.left)):
                value = _safe_literal(lit)
                if isinstance(ident, Identifier) and value is not None:
                    if node.op is BinaryOp.EQ:
                        one = frozenset({value})
                        c = Constraint(excluded=one) if failing else Constraint(allowed=one)
                    elif failing:
                        return [{}]  # `x != v` failing: x missing or equal to v; nothing simple
                    else:
                        c = Constraint(excluded=frozenset({value}))
                    return [{ident.name: c}]
        return [{}]
    if isinstance(node, In) and isinstance(node.operand, Identifier):
        values = [_safe_literal(item) for item in node.items]
        if not values or any(v is None for v in values):
            return [{}]
        found = frozenset(v for v in values if v is not None)
        if node.negated:
            return [{}] if failing else [{node.operand.name: Constraint(excluded=found)}]
        return [{node.operand.name: Constraint(excluded=found) if failing else Constraint(allowed=found)}]
    if isinstance(node, Like) and isinstance(node.operand, Identifier):
        shape = _like_shape(node.pattern)
        if shape is None:
            return [{}]
        kind, text = shape
        if node.negated and failing:
            return [{}]  # `x NOT LIKE p` failing: x missing, or matching p
        facts: dict[str, Constraint]
        if not node.negated and not failing:  # x is present and matches the pattern
            facts = {"eq": Constraint(allowed=frozenset({text})), "prefix": Constraint(prefixes=(text,)),
                     "suffix": Constraint(suffixes=(text,))}
        else:  # x does not match the pattern (or is missing, when failing)
            facts = {"eq": Constraint(excluded=frozenset({text})), "contains": Constraint(absent=frozenset({text}))}
        return [{node.operand.name: facts[kind]}] if kind in facts else [{}]
    return [{}]


def as_entry_facts(term: Term) -> Constraint | None:
    """What a route's facts about the whole `dataregulation` say about each of its entries."""
    whole = term.get(LIST_ATTRIBUTE)
    if whole is None:
        return None
    allowed = None if whole.allowed is None else frozenset(e for v in whole.allowed for e in regulation_entries(v))
    return Constraint(allowed=allowed, absent=whole.absent)  # entries are substrings of the whole


def jointly_satisfiable(route: Term, policies: Sequence[Term]) -> bool:
    """Can one event match the route term and every policy term? Policies see `dataregulation` one entry
    at a time (each possibly a different entry), so their facts about it are checked one policy at a
    time against what the route implies for every entry."""
    merged: Term | None = {k: v for k, v in route.items() if k != LIST_ATTRIBUTE}
    for policy in policies:
        assert merged is not None
        merged = _merge(merged, {k: v for k, v in policy.items() if k != LIST_ATTRIBUTE})
        if merged is None:
            return False
    entry = as_entry_facts(route)
    for policy in policies:
        facts = policy.get(LIST_ATTRIBUTE)
        if facts is not None and entry is not None and not entry.merge(facts).satisfiable():
            return False
    return True
