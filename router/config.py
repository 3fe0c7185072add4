"""Parse and validate the router's part of the gateway configuration (docs/router.md is the contract).

`parse()` reads the `destinations` (routing attributes), `residency`, `routes` and `router` keys of the
top-level mapping and returns a `RoutingConfig`. Every mistake raises `RouterConfigError(path, reason)`
with the key path and what was expected; fabric/config.py adds the file name. Besides shapes it checks:

- every destination a route names exists;
- every filter compiles (CESQL syntax errors carry their position);
- every jurisdiction a policy allows belongs to some destination (a typo would silently deny);
- **residency coverage**: no route can match an event that the residency policies would leave with
  none of the route's destinations. The check is conservative: it reports a route unless its filter
  and the policy's condition (or the conditions of several policies that can apply together) are
  *provably* disjoint — by contradictory `exact`/`prefix`/`suffix`/`IN`/`=`/`LIKE` facts on the same
  attribute, see `router.filters.terms`. Deliberate denials are not reported: a policy with
  `allow: []` and, with `unmatched: deny`, events no policy matches. The default destination
  (events no route matches) is checked at run time only: its reachable events are "everything no
  route matched", which no filter describes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from umcef.router.filters import FilterError, FilterNodes, FilterProgram, Term, jointly_satisfiable, terms
from umcef.router.model import (
    MODES,
    UNMATCHED,
    Constraints,
    Destination,
    EstimatorSettings,
    Hysteresis,
    Mode,
    Residency,
    ResidencyPolicy,
    Route,
    RoutingConfig,
    Unmatched,
    Weights,
)

DESTINATION_KEYS = ("url", "options", "cloud", "region", "jurisdiction", "egress_usd_per_gb", "usd_per_million",
                    "weight", "max_in_flight")
ROUTE_KEYS = ("name", "priority", "filter", "to", "mode", "weights", "constraints", "hysteresis")
ESTIMATOR_KEYS = ("decay_seconds", "initial_rtt_ms", "probe_interval_seconds", "probe_timeout_seconds",
                  "eject_after_failures", "ejection_seconds", "max_ejection_seconds", "readmit_seconds",
                  "readmit_floor")
MAX_COVERAGE_STEPS = 100_000


class RouterConfigError(ValueError):
    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path}: {reason}")


def parse(raw: Mapping[str, Any], urls: Mapping[str, str], default: str) -> RoutingConfig:
    """`raw` is the top-level configuration mapping; `urls` the destinations already resolved by
    fabric/config.py (name -> URL, including an implicit default); `default` the default's name."""
    destinations = _destinations(raw.get("destinations") or {}, urls)
    residency = _residency(raw.get("residency"), destinations)
    routes = _routes(raw.get("routes") or [], {d.name for d in destinations})
    estimator, sample_every = _router(raw.get("router"))
    config = RoutingConfig(destinations, routes, residency, default, estimator, sample_every)
    check_residency_coverage(config)
    return config


# -- small typed readers --------------------------------------------------------------------------


def _kind(value: Any) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _mapping(value: Any, path: str, allowed: Sequence[str]) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RouterConfigError(path, f"expected a mapping, got {_kind(value)}")
    for key in value:
        if key not in allowed:
            raise RouterConfigError(f"{path}.{key}", f"unknown key; expected one of {', '.join(allowed)}")
    return value


def _number(raw: Mapping[str, Any], key: str, path: str, default: float, *, low: float = 0.0,
            above: bool = False, high: float | None = None) -> float:
    value = raw.get(key, default)
    where = f"{path}.{key}"
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise RouterConfigError(where, f"expected a number, got {_kind(value)} {value!r}")
    if (value <= low if above else value < low) or (high is not None and value >= high):
        bound = f"above {low:g}" if above else f"at least {low:g}"
        if high is not None:
            bound += f" and below {high:g}"
        raise RouterConfigError(where, f"expected a number {bound}, got {value!r}")
    return float(value)


def _integer(raw: Mapping[str, Any], key: str, path: str, default: int, *, low: int | None = None) -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise RouterConfigError(f"{path}.{key}", f"expected an integer, got {_kind(value)} {value!r}")
    if low is not None and value < low:
        raise RouterConfigError(f"{path}.{key}", f"expected an integer of at least {low}, got {value}")
    return value


def _string(raw: Mapping[str, Any], key: str, path: str) -> str | None:
    value = raw.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise RouterConfigError(f"{path}.{key}", f"expected a non-empty string, got {_kind(value)}")
    return value.strip()


# -- sections -------------------------------------------------------------------------------------


def _destinations(raw: Any, urls: Mapping[str, str]) -> tuple[Destination, ...]:
    specs = raw if isinstance(raw, Mapping) else {}
    out = []
    for name, url in urls.items():
        path = f"destinations.{name}"
        if name.startswith("_"):
            raise RouterConfigError(path, "destination names starting with '_' are reserved")
        spec = specs.get(name)
        if not isinstance(spec, Mapping):
            out.append(Destination(name, url))
            continue
        _mapping(spec, path, DESTINATION_KEYS)
        out.append(Destination(
            name, url,
            cloud=_string(spec, "cloud", path),
            region=_string(spec, "region", path),
            jurisdiction=_string(spec, "jurisdiction", path),
            egress_usd_per_gb=_number(spec, "egress_usd_per_gb", path, 0.0),
            usd_per_million=_number(spec, "usd_per_million", path, 0.0),
            weight=_number(spec, "weight", path, 1.0, above=True),
            max_in_flight=_integer(spec, "max_in_flight", path, 500, low=1),
        ))
    return tuple(out)


def _residency(raw: Any, destinations: tuple[Destination, ...]) -> Residency:
    if raw is None:
        return Residency()
    unmatched: Unmatched = "unrestricted"
    items: Any = raw
    prefix = "residency"
    if isinstance(raw, Mapping):
        body = _mapping(raw, "residency", ("policies", "unmatched"))
        value = body.get("unmatched", "unrestricted")
        if value not in UNMATCHED:
            raise RouterConfigError("residency.unmatched", f"expected one of {', '.join(UNMATCHED)}, got {value!r}")
        unmatched = value
        items = body.get("policies") or []
        prefix = "residency.policies"
    if not isinstance(items, list):
        raise RouterConfigError(prefix, f"expected a list of policies with 'when' and 'allow', got {_kind(items)}")
    known = sorted({d.jurisdiction for d in destinations if d.jurisdiction})
    policies = []
    program = FilterProgram()
    for i, item in enumerate(items):
        path = f"{prefix}[{i}]"
        body = _mapping(item, path, ("name", "when", "allow"))
        if "when" not in body or body["when"] is None:
            raise RouterConfigError(f"{path}.when", "expected a filter (any dialect, e.g. {exact: {dataregulation: "
                                                    "GDPR}}) saying which events the policy applies to")
        try:
            program.add(body["when"], f"{path}.when")
        except FilterError as exc:
            raise RouterConfigError(exc.path, exc.reason) from None
        allow = body.get("allow")
        if isinstance(allow, str):
            allow = [allow]
        if not isinstance(allow, list):
            raise RouterConfigError(f"{path}.allow", f"expected a list of jurisdictions (may be empty: deny), "
                                                     f"got {_kind(allow)}")
        for j, jurisdiction in enumerate(allow):
            if not isinstance(jurisdiction, str) or jurisdiction not in known:
                listed = ", ".join(known) or "none: no destination has a jurisdiction"
                raise RouterConfigError(f"{path}.allow[{j}]",
                                        f"unknown jurisdiction {jurisdiction!r} (destinations have: {listed})")
        name = body.get("name", "")
        if not isinstance(name, str):
            raise RouterConfigError(f"{path}.name", f"expected a string, got {_kind(name)}")
        policies.append(ResidencyPolicy(body["when"], tuple(dict.fromkeys(allow)), name or path))
    return Residency(tuple(policies), unmatched)


def _routes(raw: Any, known: set[str]) -> tuple[Route, ...]:
    if not isinstance(raw, list):
        raise RouterConfigError("routes", f"expected a list of routes, got {_kind(raw)}")
    out: list[Route] = []
    seen: set[str] = set()
    program = FilterProgram()
    for i, item in enumerate(raw):
        path = f"routes[{i}]"
        if not isinstance(item, Mapping):
            raise RouterConfigError(path, f"expected a mapping with name, filter and to, got {_kind(item)}")
        _mapping(item, path, ROUTE_KEYS)
        name = item.get("name", f"route{i}")
        if not isinstance(name, str) or not name:
            raise RouterConfigError(f"{path}.name", "expected a non-empty string")
        if name in seen:
            raise RouterConfigError(f"{path}.name", f"duplicate route name {name!r}")
        seen.add(name)
        spec = item.get("filter")
        if spec is not None:
            try:
                program.add(spec, f"{path}.filter")
            except FilterError as exc:
                raise RouterConfigError(exc.path, exc.reason) from None
        to = item.get("to")
        if isinstance(to, str):
            to = [to]
        if not isinstance(to, list) or not to:
            raise RouterConfigError(f"{path}.to", "expected a non-empty list of destination names")
        for j, dest in enumerate(to):
            if dest not in known:
                listed = ", ".join(sorted(known)) or "none defined"
                raise RouterConfigError(f"{path}.to[{j}]", f"unknown destination {dest!r} (known: {listed})")
            if dest in to[:j]:
                raise RouterConfigError(f"{path}.to[{j}]", f"destination {dest!r} listed twice")
        mode = item.get("mode", "all")
        if mode not in MODES:
            raise RouterConfigError(f"{path}.mode", f"expected one of {', '.join(MODES)}, got {mode!r}")
        w = _mapping(item.get("weights"), f"{path}.weights", ("latency", "cost"))
        c = _mapping(item.get("constraints"), f"{path}.constraints", ("max_rtt_ms",))
        h = _mapping(item.get("hysteresis"), f"{path}.hysteresis", ("margin", "min_dwell_seconds"))
        route_mode: Mode = mode
        out.append(Route(
            name, spec, tuple(to), route_mode,
            priority=_integer(item, "priority", path, 0),
            weights=Weights(_number(w, "latency", f"{path}.weights", 1.0),
                            _number(w, "cost", f"{path}.weights", 0.0)),
            constraints=Constraints(_number(c, "max_rtt_ms", f"{path}.constraints", math.inf, above=True)),
            hysteresis=Hysteresis(_number(h, "margin", f"{path}.hysteresis", 0.1, high=1.0),
                                  _number(h, "min_dwell_seconds", f"{path}.hysteresis", 5.0)),
        ))
    return tuple(out)


def _router(raw: Any) -> tuple[EstimatorSettings, int]:
    body = _mapping(raw, "router", ("estimator", "explain_sample_every"))
    e = _mapping(body.get("estimator"), "router.estimator", ESTIMATOR_KEYS)
    p = "router.estimator"
    d = EstimatorSettings()
    settings = EstimatorSettings(
        decay_seconds=_number(e, "decay_seconds", p, d.decay_seconds, above=True),
        initial_rtt_ms=_number(e, "initial_rtt_ms", p, d.initial_rtt_ms),
        probe_interval_seconds=_number(e, "probe_interval_seconds", p, d.probe_interval_seconds, above=True),
        probe_timeout_seconds=_number(e, "probe_timeout_seconds", p, d.probe_timeout_seconds, above=True),
        eject_after_failures=_integer(e, "eject_after_failures", p, d.eject_after_failures, low=1),
        ejection_seconds=_number(e, "ejection_seconds", p, d.ejection_seconds, above=True),
        max_ejection_seconds=_number(e, "max_ejection_seconds", p, d.max_ejection_seconds, above=True),
        readmit_seconds=_number(e, "readmit_seconds", p, d.readmit_seconds),
        readmit_floor=_number(e, "readmit_floor", p, d.readmit_floor, above=True, high=1.0 + 1e-12),
    )
    return settings, _integer(body, "explain_sample_every", "router", 0, low=0)


# -- the residency coverage check -------------------------------------------------------------------


def check_residency_coverage(config: RoutingConfig) -> None:
    """Raise for the first route that can match an event residency would leave with no destination."""
    policies = config.residency.policies
    if not policies:
        return
    program = FilterProgram()
    route_roots = [program.add(r.filter) for r in config.routes]
    policy_roots = [program.add(p.when) for p in policies]
    nodes = program.freeze()
    policy_terms = [terms(nodes, root) for root in policy_roots]
    places = {d.name: d.jurisdiction for d in config.destinations}
    for i, route in enumerate(config.routes):
        reachable: set[str] = set()
        for name in route.to:
            jurisdiction = places.get(name)
            if jurisdiction:
                reachable.add(jurisdiction)
        _check_route(i, route, reachable, nodes, route_roots[i], policies, policy_terms, places)


def _check_route(i: int, route: Route, reachable: set[str], nodes: FilterNodes, root: int,
                 policies: tuple[ResidencyPolicy, ...], policy_terms: list[list[Term]],
                 places: Mapping[str, str | None]) -> None:
    steps = 0

    def visit(route_term: Term, start: int, chosen: list[int], facts: list[Term], allowed: set[str] | None) -> None:
        nonlocal steps
        for j in range(start, len(policies)):
            if not policies[j].allow:
                continue  # allow: [] is a deliberate denial, not a coverage gap
            narrowed = set(policies[j].allow) if allowed is None else allowed & set(policies[j].allow)
            for term in policy_terms[j]:
                steps += 1
                if steps > MAX_COVERAGE_STEPS:
                    return
                if not jointly_satisfiable(route_term, [*facts, term]):
                    continue
                if not narrowed & reachable:
                    raise _coverage_error(i, route, [*chosen, j], policies, narrowed, places)
                visit(route_term, j + 1, [*chosen, j], [*facts, term], narrowed)

    for route_term in terms(nodes, root):
        visit(route_term, 0, [], [], None)


def _coverage_error(i: int, route: Route, chosen: list[int], policies: tuple[ResidencyPolicy, ...],
                    allowed: set[str], places: Mapping[str, str | None]) -> RouterConfigError:
    labels = [policies[j].name for j in chosen]
    where = ", ".join(f"{name}: {places.get(name) or 'no jurisdiction'}" for name in route.to)
    if len(labels) == 1:
        applies = f"events {labels[0]} applies to, which may only enter {', '.join(sorted(allowed))}"
    elif allowed:
        applies = (f"events {' and '.join(labels)} all apply to, which together may only enter "
                   f"{', '.join(sorted(allowed))}")
    else:
        applies = f"events {' and '.join(labels)} all apply to, which together allow no jurisdiction"
    return RouterConfigError(
        f"routes[{i}]",
        f"route {route.name!r} can match {applies}, and none of its destinations is allowed ({where}); "
        f"such events would be dead-lettered. Make the route's filter provably exclude them (for example "
        f"`not` the policy's condition) or add an allowed destination")
