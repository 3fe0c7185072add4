"""The compiled router decision (`umcef._native._router`) decides exactly like the pure reference.

"Exactly": over random tables, events and estimator states (every destination down included) and
over hysteresis sequences, both give the same destinations, routes, reason and hold (`held`), leave the same
hysteresis state behind, and the native CESQL programs give `Expression.matches`' answer on random
expressions and attribute values of every type (the ones outside the native subset included: they
must hand off to the Python closure). Explain records stay pure-only: a native router asked for one
hands the decision to the reference, so the records are the reference's. The residency property (no
decision leaves the allowed jurisdictions) is run against the native decision too.

A missing extension is a failure in CI (CI=true): a skip there would hide a broken build.
"""

from __future__ import annotations

import importlib
import math
import os
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.test_router_decide import allowed_jurisdictions, events, routing_configs
from umcef.fabric import accel
from umcef.fabric.event import Event
from umcef.router.cesql import compile_expression
from umcef.router.decide import Decision, Router, _Active
from umcef.router.estimator import Estimator
from umcef.router.filters import compile_filter
from umcef.router.model import (
    Constraints,
    Destination,
    Hysteresis,
    Residency,
    ResidencyPolicy,
    Route,
    RoutingConfig,
    Weights,
)
from umcef.router.table import TableHolder, compile_table

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def load_native() -> Any:
    """The compiled module; fails the test in CI and skips it (with the reason) elsewhere."""
    try:
        module = importlib.import_module("umcef._native._router")
    except ImportError as exc:
        message = (f"umcef._native._router is not built ({exc}); build it with "
                   "`.venv/bin/pip install -e . --no-build-isolation` (needs Cython and a C compiler)")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    for name in ("NativeTable", "SqlProgram", "compile_sql", "event_size"):
        if not hasattr(module, name):
            message = f"umcef._native._router has no {name}: the extension is stale, rebuild it"
            if IN_CI:
                pytest.fail(message)
            pytest.skip(message)
    return module


@pytest.fixture(scope="module")
def native() -> Any:
    return load_native()


def pair(config: RoutingConfig, module: Any, clock: Any = None) -> tuple[Router, Router]:
    """(pure reference, native twin) over the same configuration, each with its own estimator.

    The native one is built with the module directly, so this runs under UMCEF_PURE=1 too."""
    routers = []
    for use in (None, module):
        estimator = Estimator(config.estimator)
        table = compile_table(config, estimator.slot)
        kwargs = {} if clock is None else {"clock": clock}
        router = Router(table, estimator, native=False, **kwargs)
        if use is not None:
            router._native_module = use
            router.holder = TableHolder(_Active(table, None, use))
            router.decide = use.Decider(router)  # type: ignore[method-assign]
            assert router.holder.active.native is not None
        routers.append(router)
    return routers[0], routers[1]


def same(a: Decision, b: Decision) -> None:
    # explain records are compared by repr: a score can be NaN (an `all` route's down destination)
    assert (a.destinations, a.routes, a.reason, a.held, repr(a.explain)) == (b.destinations, b.routes, b.reason,
                                                                             b.held, repr(b.explain))


def set_state(routers: tuple[Router, ...], name: str, rtt: float, up: bool, admit: float) -> None:
    for router in routers:
        s = router.estimator.slot(name)
        router.estimator.rtt_ms[s] = rtt
        router.estimator.up[s] = int(up)
        router.estimator.admit[s] = admit if up else 0.0


# -- selection --------------------------------------------------------------------------------------


def test_selection_follows_accel(native: Any) -> None:
    config = RoutingConfig((Destination("d", "local://d"),), (), Residency((), "unrestricted"), "d")
    estimator = Estimator()
    router = Router(compile_table(config, estimator.slot), estimator)
    if accel.PURE_REQUESTED:
        assert accel.router_native is None and router.holder.active.native is None
        with pytest.raises(RuntimeError):
            Router(compile_table(config, estimator.slot), estimator, native=True)
    else:
        assert accel.router_native is native and router.holder.active.native is not None
    assert Router(compile_table(config, estimator.slot), estimator, native=False).holder.active.native is None


# -- whole decisions: random tables, events, estimator states -------------------------------------------

SQL_FILTERS = st.sampled_from((
    "type LIKE 'com.%' AND (dataclassification = 'restricted' OR datacategory IN ('phi', 'sensitive'))",
    "NOT EXISTS partitionkey",
    "dataclassification != 'public' AND type <> 'org.c.x'",
    "LENGTH(type) > 12",  # a function call: always the Python closure
    "partitionkey IN ('k1', 'k3') OR dataregulation LIKE 'GD_R'",
    "UPPER(dataclassification) = 'INTERNAL' OR EXISTS datacategory",
))


@st.composite
def rich_configs(draw: st.DrawFn) -> RoutingConfig:
    """The reference's random configurations, with more CESQL (native and fallback) mixed in."""
    config: RoutingConfig = draw(routing_configs())
    routes = []
    for route in config.routes:
        if draw(st.booleans()):
            route = Route(route.name, {"sql": draw(SQL_FILTERS)}, route.to, route.mode, priority=route.priority,
                          weights=route.weights, constraints=route.constraints, hysteresis=route.hysteresis)
        routes.append(route)
    policies = list(config.residency.policies)
    if draw(st.booleans()):
        policies.append(ResidencyPolicy({"sql": draw(SQL_FILTERS)}, tuple(draw(st.lists(
            st.sampled_from(("EU", "US", "APAC", "CH")), max_size=3, unique=True)))))
    return RoutingConfig(config.destinations, tuple(routes), Residency(tuple(policies), config.residency.unmatched),
                         config.default, config.estimator)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=rich_configs(), batch=st.lists(events(), min_size=1, max_size=10), data=st.data())
def test_same_decisions_as_the_reference(native: Any, config: RoutingConfig, batch: list[Event],
                                         data: st.DataObject) -> None:
    clock = [0.0]  # one fake clock for both (decisions without `now` read it)
    pure, twin = pair(config, native, clock=lambda: clock[0])
    names = [d.name for d in config.destinations]
    everything_down = data.draw(st.booleans())
    for step, event in enumerate(batch):
        clock[0] = step * 2.5
        for name in names:
            up = not everything_down and data.draw(st.booleans())
            set_state((pure, twin), name, data.draw(st.floats(0.1, 400)), up,
                      data.draw(st.sampled_from((1.0, 0.5, 0.1))))
        now = data.draw(st.sampled_from((float(step), float(step) * 3, None)))
        size = data.draw(st.sampled_from((None, None, 100)))
        expected = pure.decide(event, now=now, size=size)
        got = twin.decide(event, now=now, size=size)
        same(expected, got)
        assert pure.holder.active.hysteresis == twin.holder.active.hysteresis
        # residency, on the native decision: never a destination outside the allowed jurisdictions
        allowed = allowed_jurisdictions(config, event)
        places = {d.name: d.jurisdiction for d in config.destinations}
        for name in got.destinations:
            assert allowed is None or places[name] in allowed, (name, places[name], allowed, event)
        if not got.destinations:
            assert got.reason
        # explain: the native router hands it to the reference (same state, same records)
        if data.draw(st.booleans()):
            same(pure.decide(event, now=now, size=size, explain=True),
                 twin.decide(event, now=now, size=size, explain=True))
            assert pure.holder.active.hysteresis == twin.holder.active.hysteresis


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=routing_configs(), batch=st.lists(events(), min_size=1, max_size=6), data=st.data())
def test_native_never_leaves_the_allowed_jurisdictions_everything_down(native: Any, config: RoutingConfig,
                                                                         batch: list[Event],
                                                                         data: st.DataObject) -> None:
    pure, twin = pair(config, native)
    for event in batch:
        for d in config.destinations:
            set_state((pure, twin), d.name, data.draw(st.floats(0.1, 400)), False, 1.0)
        got = twin.decide(event, now=0.0)
        same(pure.decide(event, now=0.0), got)
        allowed = allowed_jurisdictions(config, event)
        places = {d.name: d.jurisdiction for d in config.destinations}
        assert all(allowed is None or places[n] in allowed for n in got.destinations)
        matched = [r for r in config.routes if r.filter is None or compile_filter(r.filter)(event.attributes)]
        if any(r.mode != "all" for r in matched) or not matched:
            assert got.reason or got.destinations
        # every choosing route that residency lets reach one of its destinations holds for such a one
        for route in matched:
            if route.mode != "all" and any(allowed is None or places[n] in allowed for n in route.to):
                assert got.held is not None and f"route {route.name!r}: holding for " in got.held
                assert any(n in got.destinations for n in route.to if allowed is None or places[n] in allowed)


# -- hysteresis sequences ----------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(margin=st.sampled_from((0.0, 0.1, 0.3)), dwell=st.sampled_from((0.0, 1.0, 5.0)),
       cost=st.sampled_from((0.0, 0.5)), data=st.data(),
       script=st.lists(st.tuples(st.floats(0.5, 3.0), st.floats(1, 200), st.floats(1, 200), st.booleans(),
                                 st.booleans(), st.sampled_from((1.0, 0.3))), min_size=1, max_size=30))
def test_hysteresis_sequences(native: Any, margin: float, dwell: float, cost: float, data: st.DataObject,
                              script: list[tuple[float, float, float, bool, bool, float]]) -> None:
    dests = (Destination("a", "kafka://a:1/t", jurisdiction="EU", egress_usd_per_gb=0.05),
             Destination("b", "kafka://b:1/t", jurisdiction="EU", usd_per_million=0.3),
             Destination("c", "kafka://c:1/t", jurisdiction="US"),
             Destination("default", "local://default"))
    route = Route("best", {"prefix": {"type": "t."}}, ("a", "b", "c"), "best",
                  weights=Weights(1.0, cost), constraints=Constraints(data.draw(st.sampled_from((math.inf, 150.0)))),
                  hysteresis=Hysteresis(margin, dwell))
    config = RoutingConfig(dests, (route,), Residency((ResidencyPolicy({"exact": {"dataregulation": "GDPR"}},
                                                                       ("EU",)),), "unrestricted"), "default")
    clock = [0.0]
    pure, twin = pair(config, native, clock=lambda: clock[0])
    for dt, rtt_a, rtt_b, a_up, b_up, admit in script:
        clock[0] += dt
        set_state((pure, twin), "a", rtt_a, a_up, admit)
        set_state((pure, twin), "b", rtt_b, b_up, 1.0)
        set_state((pure, twin), "c", 1.0, True, 1.0)
        for attrs in ({}, {"dataregulation": "GDPR"}, {"dataregulation": "GDPR, HIPAA"}):
            event = Event({"specversion": "1.0", "id": "1", "source": "/s", "type": "t.x", **attrs}, b"12345")
            same(pure.decide(event), twin.decide(event))
        assert pure.holder.active.hysteresis == twin.holder.active.hysteresis


def test_swap_carries_state_and_builds_the_twin_off_the_hot_path(native: Any) -> None:
    dests = (Destination("a", "kafka://a:1/t"), Destination("b", "kafka://b:1/t"), Destination("d", "local://d"))
    config = RoutingConfig(dests, (Route("r", None, ("a", "b"), "best", hysteresis=Hysteresis(0.5, 0)),),
                           Residency((), "unrestricted"), "d")
    pure, twin = pair(config, native)
    event = Event({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"})
    set_state((pure, twin), "a", 10, True, 1.0)
    set_state((pure, twin), "b", 20, True, 1.0)
    same(pure.decide(event), twin.decide(event))
    for router in (pure, twin):
        router.swap(compile_table(config, router.estimator.slot))
    assert twin.holder.active.native is not None and pure.holder.active.native is None
    set_state((pure, twin), "b", 8, True, 1.0)  # within the margin: both keep a
    same(pure.decide(event), twin.decide(event))
    assert twin.decide(event).destinations == ("a",)


def test_non_dict_attributes_use_the_reference(native: Any) -> None:
    from types import MappingProxyType

    dests = (Destination("a", "kafka://a:1/t"), Destination("d", "local://d"))
    config = RoutingConfig(dests, (Route("r", {"sql": "type = 't'"}, ("a",), "failover"),),
                           Residency((), "unrestricted"), "d")
    pure, twin = pair(config, native)
    event = Event(MappingProxyType({"specversion": "1.0", "id": "1", "source": "/s", "type": "t"}))  # type: ignore[arg-type]
    same(pure.decide(event), twin.decide(event))


# -- CESQL: native programs against Expression.matches ----------------------------------------------------

NAMES = ("a", "b", "n", "flag", "type")
LITERALS = st.sampled_from(("'x'", "'ab'", "''", "'5'", "'true'", "0", "5", "-3", "2147483647", "TRUE", "FALSE"))
atoms = st.one_of(LITERALS, st.sampled_from(NAMES), st.sampled_from(NAMES).map(lambda n: f"EXISTS {n}"),
                  st.just("EXISTS id"))
PATTERNS = st.sampled_from(("'x%'", "'%b'", "'%a%'", "'a%b'", "'a_'", "'ab'", "'%'", "'\\%x'", "'x_%y'"))


def _expr(children: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    binary = st.sampled_from(("AND", "OR", "=", "!=", "<>", "<", "<=", ">", ">=", "+", "XOR"))
    return st.one_of(
        st.builds(lambda op, x, y: f"({x} {op} {y})", binary, children, children),
        children.map(lambda x: f"(NOT {x})"),
        st.builds(lambda x, p, neg: f"({x} {'NOT ' if neg else ''}LIKE {p})", children, PATTERNS, st.booleans()),
        st.builds(lambda x, ys, neg: f"({x} {'NOT ' if neg else ''}IN ({', '.join(ys)}))", children,
                  st.lists(children, min_size=1, max_size=3), st.booleans()),
        children.map(lambda x: f"LENGTH({x})"),
    )


expressions = st.recursive(atoms, _expr, max_leaves=6)
values = st.one_of(st.sampled_from(("x", "ab", "axb", "", "5", "true", "FALSE", "a", "xy", "%x")),
                   st.integers(-5, 6), st.sampled_from((2**31 - 1, -(2**31), 2**31, -(2**40))),
                   st.booleans(), st.binary(max_size=3), st.none())
attribute_sets = st.dictionaries(st.sampled_from(NAMES), values, max_size=5)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=expressions, attrs=attribute_sets)
def test_cesql_native_matches_the_closure(native: Any, text: str, attrs: dict[str, Any]) -> None:
    expression = compile_expression(text)
    program = native.compile_sql(expression)
    assert program.matches(attrs) == expression.matches(attrs), (text, attrs, program.native)


@pytest.mark.parametrize("text", [
    "type LIKE 'com.example.%' AND dataregulation = 'GDPR'",
    "dataclassification IN ('restricted', 'confidential') OR NOT EXISTS datacategory",
    "count >= 10 AND count < -2 OR flag = TRUE",
    "source <> '/x' AND type LIKE '%order%'",
])
def test_common_expressions_compile_natively(native: Any, text: str) -> None:
    assert native.compile_sql(compile_expression(text)).native


@pytest.mark.parametrize("text", ["count + 1 > 3", "UPPER(type) = 'X'", "a XOR b", "-count = 3"])
def test_other_expressions_use_the_closure(native: Any, text: str) -> None:
    expression = compile_expression(text)
    program = native.compile_sql(expression)
    assert not program.native
    assert program.matches({"count": 5, "type": "x", "a": True, "b": False}) == \
        expression.matches({"count": 5, "type": "x", "a": True, "b": False})


@settings(max_examples=300, deadline=None)
@given(attrs=st.dictionaries(st.sampled_from(("type", "id", "source", "dataregulation", "x")),
                             values, max_size=5),
       data=st.one_of(st.none(), st.binary(max_size=20), st.text(max_size=5), st.just({"k": [1, 2]})))
def test_event_size_matches(native: Any, attrs: dict[str, Any], data: Any) -> None:
    from umcef.router.cost import event_size

    event = Event(attrs, data)
    assert native.event_size(event) == event_size(event)


@settings(max_examples=300, deadline=None)
@given(value=st.one_of(st.text(" ,GDPRHIPA\t\u00a0", max_size=12), st.integers(), st.none()))
def test_regulation_views_match(native: Any, value: Any) -> None:
    from umcef.router.filters import regulation_views

    attrs = {"type": "t", "dataregulation": value, "z": 1}
    assert native.regulation_views(attrs) == regulation_views(attrs)
