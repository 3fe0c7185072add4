"""The foundation's static route table: Subscriptions-API style filters, every matching route fans out.

The router issue replaces this step with CESQL, residency and scoring; the configuration shape
(`destinations:` by URL, `routes:` with `filter` and `to:`) stays the same.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from umcef.fabric.bindings.http import attribute_to_string
from umcef.fabric.event import Event

Predicate = Callable[[Event], bool]
DIALECTS = ("exact", "prefix", "suffix", "all", "any", "not")


class FilterError(ValueError):
    """A filter that cannot be compiled; `path` points into the configuration."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def _attribute(event: Event, name: str) -> str | None:
    value = event.attributes.get(name)
    return None if value is None else attribute_to_string(value)


def compile_filter(spec: Any, path: str = "filter") -> Predicate:
    """Compile one filter expression (a one-key mapping naming its dialect) into a predicate."""
    if not isinstance(spec, Mapping) or len(spec) != 1:
        raise FilterError(path, f"expected a mapping with exactly one dialect key of {', '.join(DIALECTS)}")
    ((dialect, body),) = spec.items()
    where = f"{path}.{dialect}"
    if dialect in ("exact", "prefix", "suffix"):
        if not isinstance(body, Mapping) or not body:
            raise FilterError(where, "expected a non-empty mapping of attribute name to string")
        pairs = []
        for name, value in body.items():
            if not isinstance(value, str | int | bool) or isinstance(value, float):
                raise FilterError(f"{where}.{name}", "expected a string value")
            pairs.append((str(name), attribute_to_string(value)))
        return _string_match(dialect, tuple(pairs))
    if dialect in ("all", "any"):
        if not isinstance(body, Sequence) or isinstance(body, str) or not body:
            raise FilterError(where, "expected a non-empty list of filters")
        parts = tuple(compile_filter(item, f"{where}[{i}]") for i, item in enumerate(body))
        if dialect == "all":
            return lambda event: all(p(event) for p in parts)
        return lambda event: any(p(event) for p in parts)
    if dialect == "not":
        inner = compile_filter(body, where)
        return lambda event: not inner(event)
    raise FilterError(path, f"unknown filter dialect {dialect!r}; expected one of {', '.join(DIALECTS)}")


def _string_match(dialect: str, pairs: tuple[tuple[str, str], ...]) -> Predicate:
    def exact(event: Event) -> bool:
        return all(_attribute(event, n) == v for n, v in pairs)

    def prefix(event: Event) -> bool:
        return all((a := _attribute(event, n)) is not None and a.startswith(v) for n, v in pairs)

    def suffix(event: Event) -> bool:
        return all((a := _attribute(event, n)) is not None and a.endswith(v) for n, v in pairs)

    return {"exact": exact, "prefix": prefix, "suffix": suffix}[dialect]


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    matches: Predicate
    to: tuple[str, ...]


class StaticRouter:
    """Every route whose filter matches contributes its destinations; no match → the default."""

    def __init__(self, routes: Sequence[Route], default: tuple[str, ...]) -> None:
        self.routes = tuple(routes)
        self.default = default

    def route(self, event: Event) -> tuple[str, ...]:
        chosen: list[str] = []
        for route in self.routes:
            if route.matches(event):
                chosen.extend(d for d in route.to if d not in chosen)
        return tuple(chosen) if chosen else self.default
