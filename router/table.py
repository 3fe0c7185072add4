"""The compiled route table: flat, immutable, and swapped atomically.

Everything the decision needs is laid out as parallel tuples of ints and floats indexed by a
destination index `d`, a route index `r`, a filter node index or a policy index, with strings kept in
side tables. The Cython twin compiles the same table into C arrays; the pure-Python reference adds one
derived field per filter root (a closure built from the same nodes). docs/router.md shows the layout.

Jurisdictions are bits: `dest_jmask[d]` has the bit of the destination's jurisdiction (a destination
without one gets the bit of the pseudo-jurisdiction ""); a residency policy's `policy_allow[p]` is the
OR of the bits it allows. An event's allowed mask is the AND of the masks of every policy it matches
(or `unmatched_mask` when it matches none); destination `d` is allowed iff `dest_jmask[d] & allowed`.

Routes are sorted by priority (higher first, then file order); index `default_route` (the last) is the
pseudo-route "no route matched" whose only destination is the configured default. Route `r` lists
its destinations in `route_dests[route_start[r] : route_start[r] + route_count[r]]` in the order
written (failover order).

Dispatch: routes whose filter requires `type == v` are found in `type_exact[v]`, those requiring
`type` to start with `p` in `type_prefix[p]` (probed once per distinct prefix length), every other
route is in `residual_mask`. These are bitmasks over route indexes (Python ints), so the candidate
routes of an event are `residual | exact hit | prefix hits`, visited lowest bit (highest priority)
first; the full filter is still evaluated for each candidate.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Generic, TypeVar

from umcef.router import cost
from umcef.router.filters import FilterNodes, FilterProgram, Predicate, predicate, type_guard
from umcef.router.model import RoutingConfig

MODE_ALL: Final = 0
MODE_BEST: Final = 1
MODE_FAILOVER: Final = 2
MODE_SPLIT: Final = 3
MODE_CODES: Final = {"all": MODE_ALL, "best": MODE_BEST, "failover": MODE_FAILOVER, "split": MODE_SPLIT}
MODE_NAMES: Final = ("all", "best", "failover", "split")
NO_FILTER: Final = -1


@dataclass(frozen=True, slots=True)
class RouteTable:
    # jurisdictions: bit i <-> jurisdictions[i] ("" = unspecified)
    jurisdictions: tuple[str, ...]
    all_mask: int
    # destinations, by index d
    dest_names: tuple[str, ...]
    dest_jmask: tuple[int, ...]
    dest_slot: tuple[int, ...]  # estimator slot
    dest_usd_per_byte: tuple[float, ...]
    dest_usd_per_request: tuple[float, ...]
    dest_weight: tuple[float, ...]
    dest_index: dict[str, int]
    # filters: one flat node program for every route and policy
    nodes: FilterNodes
    # routes, by index r (priority order); the last is the default pseudo-route
    route_names: tuple[str, ...]
    route_filter: tuple[int, ...]  # root node, NO_FILTER for "matches everything"
    route_mode: tuple[int, ...]
    route_start: tuple[int, ...]
    route_count: tuple[int, ...]
    route_dests: tuple[int, ...]
    route_w_latency: tuple[float, ...]
    route_w_cost: tuple[float, ...]
    route_max_rtt_ms: tuple[float, ...]  # inf: no constraint
    route_margin: tuple[float, ...]
    route_dwell_s: tuple[float, ...]
    default_route: int
    # dispatch on `type`: route bitmasks
    type_exact: dict[str, int]
    type_prefix: dict[str, int]
    prefix_lengths: tuple[int, ...]  # ascending
    residual_mask: int
    # residency, by policy index p
    policy_filter: tuple[int, ...]
    policy_allow: tuple[int, ...]
    policy_names: tuple[str, ...]
    unmatched_mask: int
    # derived for the pure-Python reference: closures over the same nodes
    route_pred: tuple[Predicate, ...]
    policies: tuple[tuple[Predicate, int], ...]  # (predicate, allow mask) per policy

    @property
    def route_count_total(self) -> int:
        return len(self.route_names)

    def jurisdiction_names(self, mask: int) -> tuple[str, ...]:
        return tuple(j for i, j in enumerate(self.jurisdictions) if mask >> i & 1)


def compile_table(config: RoutingConfig, slot: Callable[[str], int]) -> RouteTable:
    """Compile a validated configuration. `slot` maps a destination name to its estimator slot."""
    jurisdictions: list[str] = []

    def bit(name: str) -> int:
        if name not in jurisdictions:
            jurisdictions.append(name)
        return 1 << jurisdictions.index(name)

    dests = config.destinations
    dest_index = {d.name: i for i, d in enumerate(dests)}
    dest_jmask = tuple(bit(d.jurisdiction or "") for d in dests)
    policy_allow = tuple(_mask(bit, p.allow) for p in config.residency.policies)
    all_mask = (1 << len(jurisdictions)) - 1

    program = FilterProgram()
    ordered = sorted(enumerate(config.routes), key=lambda item: (-item[1].priority, item[0]))
    names: list[str] = []
    filters: list[int] = []
    modes: list[int] = []
    starts: list[int] = []
    counts: list[int] = []
    route_dests: list[int] = []
    w_lat: list[float] = []
    w_cost: list[float] = []
    max_rtt: list[float] = []
    margins: list[float] = []
    dwells: list[float] = []
    for i, route in ordered:
        names.append(route.name)
        filters.append(NO_FILTER if route.filter is None else program.add(route.filter, f"routes[{i}].filter"))
        modes.append(MODE_CODES[route.mode])
        starts.append(len(route_dests))
        counts.append(len(route.to))
        for name in route.to:
            if name not in dest_index:
                raise ValueError(f"routes[{i}]: unknown destination {name!r}")
            route_dests.append(dest_index[name])
        w_lat.append(route.weights.latency)
        w_cost.append(route.weights.cost)
        max_rtt.append(route.constraints.max_rtt_ms)
        margins.append(route.hysteresis.margin)
        dwells.append(route.hysteresis.min_dwell_seconds)
    if config.default not in dest_index:
        raise ValueError(f"default destination {config.default!r} is not a destination")
    default_route = len(names)
    names.append("")
    filters.append(NO_FILTER)
    modes.append(MODE_ALL)
    starts.append(len(route_dests))
    counts.append(1)
    route_dests.append(dest_index[config.default])
    w_lat.append(1.0)
    w_cost.append(0.0)
    max_rtt.append(math.inf)
    margins.append(0.0)
    dwells.append(0.0)

    policy_filter = tuple(program.add(p.when, f"residency[{i}].when") for i, p in enumerate(config.residency.policies))
    nodes = program.freeze()

    type_exact: dict[str, int] = {}
    type_prefix: dict[str, int] = {}
    residual = 0
    for r in range(default_route):
        guard = None if filters[r] == NO_FILTER else type_guard(nodes, filters[r])
        if guard is None:
            residual |= 1 << r
        elif guard[0] == "exact":
            type_exact[guard[1]] = type_exact.get(guard[1], 0) | 1 << r
        else:
            type_prefix[guard[1]] = type_prefix.get(guard[1], 0) | 1 << r

    def always(attrs: object) -> bool:
        return True

    route_pred = tuple(always if f == NO_FILTER else predicate(nodes, f) for f in filters)
    policies = tuple((predicate(nodes, f), allow) for f, allow in zip(policy_filter, policy_allow, strict=True))
    return RouteTable(
        jurisdictions=tuple(jurisdictions),
        all_mask=all_mask,
        dest_names=tuple(d.name for d in dests),
        dest_jmask=dest_jmask,
        dest_slot=tuple(slot(d.name) for d in dests),
        dest_usd_per_byte=tuple(cost.per_byte(d.egress_usd_per_gb) for d in dests),
        dest_usd_per_request=tuple(cost.per_request(d.usd_per_million) for d in dests),
        dest_weight=tuple(d.weight for d in dests),
        dest_index=dest_index,
        nodes=nodes,
        route_names=tuple(names),
        route_filter=tuple(filters),
        route_mode=tuple(modes),
        route_start=tuple(starts),
        route_count=tuple(counts),
        route_dests=tuple(route_dests),
        route_w_latency=tuple(w_lat),
        route_w_cost=tuple(w_cost),
        route_max_rtt_ms=tuple(max_rtt),
        route_margin=tuple(margins),
        route_dwell_s=tuple(dwells),
        default_route=default_route,
        type_exact=type_exact,
        type_prefix=type_prefix,
        prefix_lengths=tuple(sorted({len(p) for p in type_prefix})),
        residual_mask=residual,
        policy_filter=policy_filter,
        policy_allow=policy_allow,
        policy_names=tuple(p.name or f"residency[{i}]" for i, p in enumerate(config.residency.policies)),
        unmatched_mask=0 if config.residency.unmatched == "deny" else all_mask,
        route_pred=route_pred,
        policies=policies,
    )


def _mask(bit: Callable[[str], int], names: tuple[str, ...]) -> int:
    mask = 0
    for name in names:
        mask |= bit(name)
    return mask


T = TypeVar("T")


class TableHolder(Generic[T]):
    """Holds the active table (with whatever per-table state travels with it) behind one reference.

    `swap` replaces the reference in one assignment: a decision reads `active` once at its start and
    finishes on that object even if a new table is swapped in meanwhile (from another thread, or by
    the control plane between two awaits). Tables are compiled before `swap`, off the hot path."""

    __slots__ = ("active", "generation")

    def __init__(self, active: T) -> None:
        self.active = active
        self.generation = 0

    def swap(self, active: T) -> T:
        old = self.active
        self.active = active
        self.generation += 1
        return old
