"""The pure-Python reference decision: `Router.decide(event) -> Decision`.

For every route whose filter matches (all of them fan out, in priority order; none -> the default):

1. **Hard constraints.** Residency first: the event's allowed jurisdictions are the intersection of
   the `allow` lists of every residency policy it matches (or, when it matches none, everything or
   nothing per `residency.unmatched`); a destination outside them is out, always. Then, except in
   `all` mode, an ejected destination is out and one whose RTT exceeds the route's `max_rtt_ms` is
   out. Residency is never relaxed: when it allows none of the route's destinations the route chooses
   nothing and the decision carries the reason (the pipeline dead-letters the event with it). When
   residency allows some but health / RTT exclude all of them, a choosing route **holds** (below).
2. **Mode.** `all`: every destination residency allows (health and RTT do not remove a fan-out
   subscriber: the spool holds its events while it is down). `failover`: the first candidate in the
   order written. `split`: one candidate drawn by weight (destination `weight` x admission) with a
   hash of `partitionkey` (else `id`), so one key keeps one destination. `best`: the lowest score.
3. **Score** (`best`, and every explain record): with `lat = rtt_ms / admit` and
   `cost = size x usd_per_byte + usd_per_request`, each normalised by its maximum over the candidates,
   `score = w_latency x lat / max_lat + w_cost x cost / max_cost` (a zero maximum contributes 0).
   Ties go to the destination written first.
4. **Hysteresis** (`best`): the current choice stays unless a challenger scores below
   `current x (1 - margin)` on every decision for `min_dwell_seconds`; a current choice that fails a
   hard constraint is replaced at once. State is kept per route and per allowed-jurisdiction mask.
5. **Holding** (`best`, `failover`, `split`, when residency allows destinations but none is healthy
   within `max_rtt_ms`): the route still chooses one *allowed* destination, so the event is spooled there
   and waits like the events already spooled for it (the delivery worker's failover re-decides it, moves
   it when another allowed destination is healthy, or dead-letters it after `max_age_seconds`). The pool
   is the allowed destinations that are up (only too slow) if any, else every allowed one; in it
   `failover` takes the first in written order, `split` draws by weight (x admission when up) with the
   same hash, `best` keeps its current choice when it is in the pool, else takes the lowest score (an
   ejected destination's latency is its last RTT). The decision says so in `held` (not `reason`: the
   pipeline does not dead-letter it), and the hysteresis state is not changed.

Decisions are cached immutable objects on the common paths (one route, one destination, or a fan-out
per allowed mask), so a decision usually allocates nothing but the event's own lookups.
"""

from __future__ import annotations

import logging
import math
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import orjson

from umcef.fabric import accel
from umcef.fabric.bindings.http import attribute_to_string
from umcef.fabric.event import Event
from umcef.router.cost import event_size
from umcef.router.estimator import Estimator
from umcef.router.filters import LIST_ATTRIBUTE, regulation_views
from umcef.router.table import (
    MODE_ALL,
    MODE_FAILOVER,
    MODE_NAMES,
    MODE_SPLIT,
    RouteTable,
    TableHolder,
)

log = logging.getLogger("umcef.router")
decisions_log = logging.getLogger("umcef.router.decisions")


@dataclass(frozen=True, slots=True)
class Candidate:
    destination: str
    score: float | None  # None when excluded
    excluded: str | None  # why a hard constraint removed it


@dataclass(frozen=True, slots=True)
class RouteExplain:
    route: str | None  # None: no route matched, the default destination
    mode: str
    destinations: tuple[str, ...]
    candidates: tuple[Candidate, ...]
    allowed: tuple[str, ...] | None  # jurisdictions residency allows; None: unrestricted
    policies: tuple[str, ...]  # residency policies the event matched
    reason: str | None  # why this route chose nothing
    held: str | None = None  # set: the route is holding the event for `destinations` (none is healthy)


@dataclass(frozen=True, slots=True)
class Decision:
    destinations: tuple[str, ...]
    routes: tuple[str, ...]  # matched routes in priority order; () when the default was used
    reason: str | None = None  # set when a matched route (or the default) could not route the event
    explain: tuple[RouteExplain, ...] | None = None
    # set when a choosing route holds the event for an allowed destination although none is healthy
    # (residency allows some; health / max RTT exclude all): spooled there to wait, not dead-lettered
    held: str | None = None

    @property
    def dead_letter(self) -> bool:
        return self.reason is not None


class _Active:
    """A table plus the state that travels with it: hysteresis and the cached decisions."""

    __slots__ = ("all_cache", "hysteresis", "native", "single", "table")

    def __init__(self, table: RouteTable, hysteresis: dict[int, list[float]] | None = None,
                 native: ModuleType | None = None) -> None:
        self.table = table
        # The compiled twin of this table (umcef._native._router), built here, off the hot path, before
        # the swap that activates it; None: the pure reference decides.
        self.native: Any = None
        if native is not None:
            try:
                self.native = native.NativeTable(table)
            except ValueError:  # a table the twin does not handle (> 64 jurisdictions): pure path
                self.native = None
        self.hysteresis: dict[int, list[float]] = hysteresis if hysteresis is not None else {}
        names = table.route_names
        routes_of = [() if r == table.default_route else (names[r],) for r in range(len(names))]
        single: list[Decision] = []
        for r in range(len(names)):
            start = table.route_start[r]
            for k in range(start, start + table.route_count[r]):
                single.append(Decision((table.dest_names[table.route_dests[k]],), routes_of[r]))
        self.single = tuple(single)  # by position k in route_dests
        self.all_cache: tuple[dict[int, Decision], ...] = tuple({} for _ in names)


class Router:
    """Routes events with the active table and the estimator's live RTT/health state."""

    def __init__(self, table: RouteTable, estimator: Estimator, *, clock: Callable[[], float] = time.monotonic,
                 sample_every: int = 0, native: bool | None = None) -> None:
        """`native`: None uses the compiled decision when it is built (`fabric.accel`, `UMCEF_PURE=1`
        forces pure); False always decides with the pure reference; True requires the compiled one."""
        self.estimator = estimator
        self.clock = clock
        self.sample_every = sample_every
        if native is True and accel.router_native is None:
            raise RuntimeError("umcef._native._router is not built (or UMCEF_PURE=1)")
        self._native_module = None if native is False else accel.router_native
        self.holder: TableHolder[_Active] = TableHolder(_Active(table, None, self._native_module))
        if self._native_module is not None:
            # the compiled entry point (same contract as the method below, without its Python frame)
            self.decide = self._native_module.Decider(self)  # type: ignore[method-assign]
        self._count = 0

    @property
    def table(self) -> RouteTable:
        return self.holder.active.table

    def swap(self, table: RouteTable) -> RouteTable:
        """Install a table compiled off the hot path; hysteresis carries over by route/destination name."""
        old = self.holder.active
        return self.holder.swap(_Active(table, _carry_over(old, table), self._native_module)).table

    # -- the pipeline's entry point -----------------------------------------------------------------

    def route(self, event: Event) -> Decision:
        """`decide` for the pipeline: samples explain records to the log, and turns a router bug into a
        dead-letter with the reason instead of failing the publish."""
        self._count += 1
        try:
            if self.sample_every and self._count % self.sample_every == 0:
                decision = self.decide(event, explain=True)
                record = {"id": event.attributes.get("id"), "source": event.attributes.get("source"),
                          **explain_object(decision)}  # which event: a sample is read on its own
                decisions_log.info("%s", orjson.dumps(record).decode())
                return decision
            return self.decide(event)
        except Exception as exc:
            log.exception("router failed on event %r", event.attributes.get("id"))
            return Decision((), (), f"router error: {type(exc).__name__}: {exc}")

    # -- the decision -----------------------------------------------------------------------------

    def decide(self, event: Event, *, explain: bool = False, now: float | None = None,
               size: int | None = None) -> Decision:
        act = self.holder.active  # read once: a concurrent swap does not affect this decision
        native = act.native
        if native is not None and not explain:  # explain records are made by the pure reference only
            return native.decide(self, act, event, now, size)  # type: ignore[no-any-return]
        return self._decide(act, event, explain, now, size)

    def _decide(self, act: _Active, event: Event, explain: bool, now: float | None, size: int | None) -> Decision:
        """The pure-Python reference decision (the compiled twin must give the same answers)."""
        t = act.table
        attrs = event.attributes
        m = t.residual_mask
        kind = attrs.get("type")
        if kind.__class__ is str:
            hit = t.type_exact.get(kind)
            if hit is not None:
                m |= hit
            if t.prefix_lengths:
                prefixes = t.type_prefix
                n = len(kind)
                for length in t.prefix_lengths:
                    if length > n:
                        break
                    hit = prefixes.get(kind[:length])
                    if hit is not None:
                        m |= hit
        preds = t.route_pred
        first = -1
        others: list[int] | None = None
        while m:
            low = m & -m
            r = low.bit_length() - 1
            m ^= low
            if preds[r](attrs):
                if first < 0:
                    first = r
                elif others is None:
                    others = [r]
                else:
                    others.append(r)
        if first < 0:
            first = t.default_route
        allowed = self._allowed(t, attrs)
        if others is None and not explain:
            return self._route(act, first, allowed, event, now, size)
        matched = [first] if others is None else [first, *others]
        results = [self._route(act, r, allowed, event, now, size) for r in matched]
        records = tuple(self._explain(t, r, allowed, event, res) for r, res in zip(matched, results, strict=True)) \
            if explain else None
        if len(results) == 1:
            only = results[0]
            return Decision(only.destinations, only.routes, only.reason, records, only.held)
        chosen: list[str] = []
        for res in results:
            chosen.extend(d for d in res.destinations if d not in chosen)
        reasons = [res.reason for res in results if res.reason is not None]
        held = [res.held for res in results if res.held is not None]
        return Decision(tuple(chosen), tuple(t.route_names[r] for r in matched), "; ".join(reasons) or None, records,
                        "; ".join(held) or None)

    def _allowed(self, t: RouteTable, attrs: Mapping[str, Any]) -> int:
        """The jurisdiction mask residency allows this event."""
        policies = t.policies
        if not policies:
            return t.unmatched_mask
        mask = t.all_mask
        hit = False
        reg = attrs.get(LIST_ATTRIBUTE)
        views = None if reg is None else regulation_views(attrs)
        if views is None:
            for pred, allow in policies:
                if pred(attrs):
                    mask &= allow
                    hit = True
        else:
            for view in views:
                for pred, allow in policies:
                    if pred(view):
                        mask &= allow
                        hit = True
        return mask if hit else t.unmatched_mask

    def _route(self, act: _Active, r: int, allowed: int, event: Event, now: float | None,
               size: int | None) -> Decision:
        t = act.table
        mode = t.route_mode[r]
        start = t.route_start[r]
        end = start + t.route_count[r]
        dests = t.route_dests
        jmask = t.dest_jmask
        if mode == MODE_ALL:
            cache = act.all_cache[r]
            cached = cache.get(allowed)
            if cached is None:
                names = tuple(t.dest_names[dests[k]] for k in range(start, end) if jmask[dests[k]] & allowed)
                if not names:  # not cached: the reason names the policies this event matched
                    return self._unroutable(t, r, allowed, event.attributes)
                cached = act.single[start] if len(names) == 1 and end - start == 1 \
                    else Decision(names, act.single[start].routes)
                cache[allowed] = cached
            return cached
        est = self.estimator
        rtt = est.rtt_ms
        up = est.up
        admit = est.admit
        slots = t.dest_slot
        max_rtt = t.route_max_rtt_ms[r]
        if mode == MODE_FAILOVER:
            for k in range(start, end):
                d = dests[k]
                if jmask[d] & allowed:
                    s = slots[d]
                    if up[s] and rtt[s] <= max_rtt:
                        return act.single[k]
            return self._hold(act, r, allowed, event, size)
        if mode == MODE_SPLIT:
            total = 0.0
            for k in range(start, end):
                d = dests[k]
                if jmask[d] & allowed:
                    s = slots[d]
                    if up[s] and rtt[s] <= max_rtt:
                        total += t.dest_weight[d] * admit[s]
            if total <= 0.0:
                return self._hold(act, r, allowed, event, size)
            point = split_point(event.attributes) * total
            acc = 0.0
            last = -1
            for k in range(start, end):
                d = dests[k]
                if jmask[d] & allowed:
                    s = slots[d]
                    if up[s] and rtt[s] <= max_rtt:
                        acc += t.dest_weight[d] * admit[s]
                        last = k
                        if point < acc:
                            return act.single[k]
            return act.single[last]  # rounding at the very top of the range
        # MODE_BEST
        w_lat = t.route_w_latency[r]
        w_cost = t.route_w_cost[r]
        per_byte = t.dest_usd_per_byte
        per_request = t.dest_usd_per_request
        count = 0
        only = -1
        max_lat = 0.0
        max_cost = 0.0
        for k in range(start, end):
            d = dests[k]
            if jmask[d] & allowed:
                s = slots[d]
                if up[s] and rtt[s] <= max_rtt:
                    count += 1
                    only = k
                    lat = rtt[s] / admit[s]
                    if lat > max_lat:
                        max_lat = lat
                    if w_cost > 0.0:
                        if size is None:
                            size = event_size(event)
                        c = size * per_byte[d] + per_request[d]
                        if c > max_cost:
                            max_cost = c
        if count == 0:
            return self._hold(act, r, allowed, event, size)
        nbytes = 0 if size is None else size
        key = allowed * len(t.route_names) + r
        state = act.hysteresis.get(key)
        if state is None:
            state = act.hysteresis[key] = [-1.0, -1.0, 0.0]  # current k, challenger k, challenger since
        if count == 1:
            state[0] = only
            state[1] = -1.0
            return act.single[only]
        current = state[0]
        best = -1
        best_score = math.inf
        current_score = -1.0
        lat_scale = w_lat / max_lat if max_lat > 0.0 else 0.0
        cost_scale = w_cost / max_cost if max_cost > 0.0 else 0.0
        for k in range(start, end):
            d = dests[k]
            if jmask[d] & allowed:
                s = slots[d]
                if up[s] and rtt[s] <= max_rtt:
                    score = rtt[s] / admit[s] * lat_scale
                    if cost_scale:
                        score += (nbytes * per_byte[d] + per_request[d]) * cost_scale
                    if score < best_score:
                        best_score = score
                        best = k
                    if k == current:
                        current_score = score
        if current_score < 0.0:  # no current choice, or it failed a hard constraint: switch at once
            state[0] = best
            state[1] = -1.0
            return act.single[best]
        if best == current or not best_score < current_score * (1.0 - t.route_margin[r]):
            state[1] = -1.0
            return act.single[int(current)]
        dwell = t.route_dwell_s[r]
        if dwell > 0.0:
            if now is None:
                now = self.clock()
            if state[1] != best:
                state[1] = best
                state[2] = now
                return act.single[int(current)]
            if now - state[2] < dwell:
                return act.single[int(current)]
        state[0] = best
        state[1] = -1.0
        return act.single[best]

    # -- reasons and explain records (off the hot path) --------------------------------------------

    def matched_policies(self, t: RouteTable, attrs: Mapping[str, Any]) -> tuple[str, ...]:
        views: Sequence[Mapping[str, Any]] = regulation_views(attrs) or (attrs,)
        return tuple(name for (pred, _allow), name in zip(t.policies, t.policy_names, strict=True)
                     if any(pred(v) for v in views))

    def _residency_text(self, t: RouteTable, allowed: int, attrs: Mapping[str, Any]) -> str:
        if allowed == t.all_mask:
            return "residency unrestricted"
        policies = self.matched_policies(t, attrs)
        if not policies:
            return "the event matches no residency policy and unmatched events are denied"
        names = [j for j in t.jurisdiction_names(allowed) if j]
        where = "allows only " + ", ".join(names) if names else "allows no jurisdiction"
        return f"residency {where} ({', '.join(policies)})"

    def _exclusion(self, t: RouteTable, r: int, d: int, allowed: int) -> str | None:
        if not t.dest_jmask[d] & allowed:
            jurisdiction = t.jurisdictions[t.dest_jmask[d].bit_length() - 1] or "no jurisdiction"
            return f"residency: {jurisdiction} not allowed"
        if t.route_mode[r] == MODE_ALL:
            return None
        s = t.dest_slot[d]
        if not self.estimator.up[s]:
            return self.estimator.describe_down(s)
        rtt = self.estimator.rtt_ms[s]
        if rtt > t.route_max_rtt_ms[r]:
            return f"rtt {rtt:.1f} ms > max_rtt_ms {t.route_max_rtt_ms[r]:g}"
        return None

    @staticmethod
    def _label(t: RouteTable, r: int) -> str:
        return "no route matched (default destination)" if r == t.default_route else f"route {t.route_names[r]!r}"

    def _unavailable(self, t: RouteTable, r: int, allowed: int) -> str:
        start = t.route_start[r]
        why = "; ".join(f"{t.dest_names[t.route_dests[k]]}: {self._exclusion(t, r, t.route_dests[k], allowed)}"
                        for k in range(start, start + t.route_count[r]))
        return f"every destination residency allows is unavailable ({why})"

    def _unroutable(self, t: RouteTable, r: int, allowed: int, attrs: Mapping[str, Any]) -> Decision:
        start = t.route_start[r]
        ks = range(start, start + t.route_count[r])
        label = self._label(t, r)
        residency = self._residency_text(t, allowed, attrs)
        if allowed == 0:
            reason = f"{label}: {residency}"
        elif not any(t.dest_jmask[t.route_dests[k]] & allowed for k in ks):
            places = ", ".join(f"{t.dest_names[t.route_dests[k]]}: "
                               f"{t.jurisdictions[t.dest_jmask[t.route_dests[k]].bit_length() - 1] or 'none'}"
                               for k in ks)
            reason = f"{label}: {residency}, and none of its destinations is there ({places})"
        else:
            reason = f"{label}: {self._unavailable(t, r, allowed)}"
        return Decision((), () if r == t.default_route else (t.route_names[r],), reason)

    def _hold(self, act: _Active, r: int, allowed: int, event: Event, size: int | None) -> Decision:
        """A choosing route none of whose allowed destinations is healthy (within `max_rtt_ms`): hold the
        event for one allowed destination (see the module docstring, 5.), or, when residency allows none
        of them, choose nothing (`_unroutable`). Off the hot path; the compiled twin calls this too."""
        t = act.table
        start = t.route_start[r]
        ks = [k for k in range(start, start + t.route_count[r]) if t.dest_jmask[t.route_dests[k]] & allowed]
        if not ks:
            return self._unroutable(t, r, allowed, event.attributes)
        est = self.estimator
        slots = t.dest_slot
        live = [k for k in ks if est.up[slots[t.route_dests[k]]]]  # up, only slower than max_rtt_ms
        pool = live or ks
        mode = t.route_mode[r]
        if mode == MODE_FAILOVER:
            k = pool[0]
        elif mode == MODE_SPLIT:
            weights = [t.dest_weight[t.route_dests[k]] * (est.admit[slots[t.route_dests[k]]] if live else 1.0)
                       for k in pool]
            total = sum(weights)
            k = pool[-1]
            if total > 0.0:
                point = split_point(event.attributes) * total
                acc = 0.0
                for k_, w in zip(pool, weights, strict=True):
                    acc += w
                    if point < acc:
                        k = k_
                        break
        else:  # MODE_BEST: the current choice if it is in the pool, else the lowest score
            state = act.hysteresis.get(allowed * len(t.route_names) + r)
            current = -1 if state is None else int(state[0])
            k = current if current in pool else self._lowest(t, r, pool, event, size)
        name = t.dest_names[t.route_dests[k]]
        held = f"{self._label(t, r)}: holding for {name}: {self._unavailable(t, r, allowed)}"
        return Decision((name,), act.single[k].routes, None, None, held)

    def _lowest(self, t: RouteTable, r: int, pool: list[int], event: Event, size: int | None) -> int:
        """The lowest `best` score in `pool` (ties: written first); an ejected destination (admission 0)
        counts with its last RTT."""
        est = self.estimator
        lats = []
        costs = []
        w_cost = t.route_w_cost[r]
        if w_cost > 0.0 and size is None:
            size = event_size(event)
        for k in pool:
            d = t.route_dests[k]
            s = t.dest_slot[d]
            a = est.admit[s]
            lats.append(est.rtt_ms[s] / a if a > 0.0 else est.rtt_ms[s])
            costs.append((size or 0) * t.dest_usd_per_byte[d] + t.dest_usd_per_request[d] if w_cost > 0.0 else 0.0)
        max_lat = max(lats)
        max_cost = max(costs)
        lat_scale = t.route_w_latency[r] / max_lat if max_lat > 0.0 else 0.0
        cost_scale = w_cost / max_cost if max_cost > 0.0 else 0.0
        best = pool[0]
        best_score = math.inf
        for k, lat, cost in zip(pool, lats, costs, strict=True):
            score = lat * lat_scale + cost * cost_scale
            if score < best_score:
                best_score = score
                best = k
        return best

    def _explain(self, t: RouteTable, r: int, allowed: int, event: Event, result: Decision) -> RouteExplain:
        start = t.route_start[r]
        ks = range(start, start + t.route_count[r])
        excluded = {k: self._exclusion(t, r, t.route_dests[k], allowed) for k in ks}
        live = [k for k in ks if excluded[k] is None]
        est = self.estimator
        lats = {k: est.rtt_ms[t.dest_slot[t.route_dests[k]]] / est.admit[t.dest_slot[t.route_dests[k]]]
                if est.admit[t.dest_slot[t.route_dests[k]]] > 0 else math.inf for k in live}
        size = event_size(event) if t.route_w_cost[r] > 0.0 else 0
        costs = {k: size * t.dest_usd_per_byte[t.route_dests[k]] + t.dest_usd_per_request[t.route_dests[k]]
                 for k in live}
        max_lat = max(lats.values(), default=0.0)
        max_cost = max(costs.values(), default=0.0)
        lat_scale = t.route_w_latency[r] / max_lat if max_lat > 0.0 else 0.0
        cost_scale = t.route_w_cost[r] / max_cost if max_cost > 0.0 else 0.0
        candidates = tuple(
            Candidate(t.dest_names[t.route_dests[k]],
                      None if excluded[k] is not None else lats[k] * lat_scale + costs[k] * cost_scale,
                      excluded[k])
            for k in ks)
        allowed_names = None if allowed == t.all_mask else t.jurisdiction_names(allowed)
        return RouteExplain(None if r == t.default_route else t.route_names[r], MODE_NAMES[t.route_mode[r]],
                            result.destinations, candidates, allowed_names,
                            self.matched_policies(t, event.attributes), result.reason, result.held)

    # -- delivery-time re-check -------------------------------------------------------------------------

    def residency_violation(self, event: Event, destination: str) -> str | None:
        """Why `destination` may not receive `event` under the active table's residency, else None.

        Delivery calls this again just before publishing, so an event spooled under an older table
        never leaves for a jurisdiction the current policy forbids."""
        t = self.holder.active.table
        d = t.dest_index.get(destination)
        allowed = self._allowed(t, event.attributes)
        if d is not None and t.dest_jmask[d] & allowed:
            return None
        jurisdiction = "unknown" if d is None else t.jurisdictions[t.dest_jmask[d].bit_length() - 1] or "none"
        return f"residency: {destination} (jurisdiction {jurisdiction}) is not allowed; " \
               f"{self._residency_text(t, allowed, event.attributes)}"


def split_point(attrs: Mapping[str, Any]) -> float:
    """A stable point in [0, 1) for the event: CRC-32 of `partitionkey` (else `id`), UTF-8."""
    key = attrs.get("partitionkey")
    if key is None:
        key = attrs.get("id", "")
    raw = key if isinstance(key, bytes) else attribute_to_string(key).encode("utf-8")
    return zlib.crc32(raw) / 4294967296.0


def explain_object(decision: Decision) -> dict[str, Any]:
    """The `route explain --json` object: `{"route", "destinations", "candidates"}` of the first matched
    route (or the default: route null), `destinations` being the whole decision's. When several routes
    matched, `routes` lists the same object for each of them. A route holding the event (no allowed
    destination is healthy, docs/router.md) adds `held`: for which destination, and why."""
    records = decision.explain or ()

    def one(rec: RouteExplain, destinations: tuple[str, ...]) -> dict[str, Any]:
        out: dict[str, Any] = {"route": rec.route, "destinations": list(destinations),
                               "candidates": [{"destination": c.destination,
                                               "score": None if c.score is None else round(c.score, 6),
                                               "excluded": c.excluded} for c in rec.candidates]}
        if rec.held is not None:
            out["held"] = rec.held
        return out

    if not records:
        return {"route": None, "destinations": list(decision.destinations), "candidates": []}
    out = one(records[0], decision.destinations)
    if len(records) > 1:
        out["routes"] = [one(rec, rec.destinations) for rec in records]
    return out


def _carry_over(old: _Active, new: RouteTable) -> dict[int, list[float]]:
    """Keep `best` routes' current choices across a swap when route and destination names still match."""
    t = old.table
    n_old = len(t.route_names)
    by_name = {name: r for r, name in enumerate(new.route_names) if r != new.default_route}
    out: dict[int, list[float]] = {}
    for key, state in old.hysteresis.items():
        r_old, mask_old = key % n_old, key // n_old
        r_new = by_name.get(t.route_names[r_old])
        if r_new is None or state[0] < 0:
            continue
        name = t.dest_names[t.route_dests[int(state[0])]]
        start = new.route_start[r_new]
        ks = [k for k in range(start, start + new.route_count[r_new]) if new.dest_names[new.route_dests[k]] == name]
        mask = 0
        for j in t.jurisdiction_names(mask_old):
            if j in new.jurisdictions:
                mask |= 1 << new.jurisdictions.index(j)
        if ks:
            out[mask * len(new.route_names) + r_new] = [float(ks[0]), -1.0, 0.0]
    return out
