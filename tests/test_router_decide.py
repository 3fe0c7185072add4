"""The reference decision: static fan-out compatibility, modes, residency as a hard rule, hysteresis,
atomic table swaps, and a property test that no decision ever leaves the allowed jurisdictions."""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from umcef.fabric import config as config_mod
from umcef.fabric.event import Event
from umcef.router.decide import Decision, Router, explain_object
from umcef.router.estimator import Estimator
from umcef.router.filters import compile_filter, regulation_entries
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
from umcef.router.table import compile_table


def make_router(raw: dict[str, Any]) -> Router:
    routing = config_mod.from_mapping(raw, "test").routing
    estimator = Estimator(routing.estimator)
    return Router(compile_table(routing, estimator.slot), estimator)


def ev(type_: str = "com.example.order.placed", **extra: Any) -> Event:
    return Event({"specversion": "1.0", "id": extra.pop("id", "1"), "source": "/shop", "type": type_, **extra},
                 {"orderId": 1})


THREE = {"eu": {"url": "kafka://eu:9092/t", "jurisdiction": "EU"},
         "eu2": {"url": "kafka://eu2:9092/t", "jurisdiction": "EU", "egress_usd_per_gb": 0.09},
         "us": {"url": "sqs://q?region=us-east-1", "jurisdiction": "US", "usd_per_million": 0.4}}


# -- the foundation's static routes keep working ---------------------------------------------------------


def test_static_fan_out_union_and_default() -> None:
    router = make_router({
        "destinations": {"orders": "local://orders", "audit": "local://audit"},
        "routes": [{"name": "orders", "filter": {"prefix": {"type": "com.example.order."}}, "to": ["orders", "audit"]},
                   {"name": "eu", "filter": {"exact": {"region": "eu"}}, "to": ["audit"]}],
    })
    assert router.decide(ev()).destinations == ("orders", "audit")
    both = router.decide(ev(region="eu"))
    assert both.destinations == ("orders", "audit") and both.routes == ("orders", "eu") and both.reason is None
    assert router.decide(ev("com.example.customer.created", region="eu")).destinations == ("audit",)
    fallback = router.decide(ev("com.example.customer.created"))
    assert fallback.destinations == ("default",) and fallback.routes == () and not fallback.dead_letter


def test_priority_orders_the_fan_out() -> None:
    router = make_router({
        "destinations": {"a": "local://a", "b": "local://b"},
        "routes": [{"name": "low", "to": ["a"]}, {"name": "high", "priority": 10, "to": ["b"]}],
    })
    decision = router.decide(ev())
    assert decision.routes == ("high", "low") and decision.destinations == ("b", "a")


def test_common_paths_return_cached_decisions() -> None:
    router = make_router({"destinations": THREE, "routes": [
        {"name": "fan", "filter": {"exact": {"type": "t.fan"}}, "to": ["eu", "us"]},
        {"name": "best", "filter": {"exact": {"type": "t.best"}}, "to": ["eu", "us"], "mode": "best"}]})
    assert router.decide(ev("t.fan", id="1")) is router.decide(ev("t.fan", id="2"))
    assert router.decide(ev("t.best", id="1")) is router.decide(ev("t.best", id="2"))


# -- modes ------------------------------------------------------------------------------------------------


def test_best_picks_lowest_rtt_and_cost_breaks_even() -> None:
    router = make_router({"destinations": THREE, "routes": [
        {"name": "r", "to": ["eu", "eu2", "us"], "mode": "best", "hysteresis": {"min_dwell_seconds": 0}}]})
    est = router.estimator
    for name, ms in (("eu", 30.0), ("eu2", 10.0), ("us", 20.0)):
        est.assume_rtt(name, ms)
    assert router.decide(ev(), now=0).destinations == ("eu2",)
    cost = make_router({"destinations": THREE, "routes": [
        {"name": "r", "to": ["eu2", "eu"], "mode": "best", "weights": {"latency": 0.0, "cost": 1.0}}]})
    assert cost.decide(ev(), now=0).destinations == ("eu",)  # eu2 costs egress, eu is free


def test_failover_takes_first_healthy_in_order() -> None:
    router = make_router({"destinations": THREE,
                          "routes": [{"name": "r", "to": ["us", "eu", "eu2"], "mode": "failover"}]})
    assert router.decide(ev()).destinations == ("us",)
    router.estimator.assume_down("us")
    assert router.decide(ev()).destinations == ("eu",)
    assert router.decide(ev(dataregulation="GDPR")).destinations == ("eu",)


def test_split_is_weighted_and_sticky_per_partition_key() -> None:
    dests = {"a": {"url": "local://a", "weight": 3}, "b": {"url": "local://b", "weight": 1}}
    router = make_router({"destinations": dests, "routes": [{"name": "r", "to": ["a", "b"], "mode": "split"}]})
    picks = [router.decide(ev(id=str(i))).destinations[0] for i in range(4000)]
    assert 0.70 < picks.count("a") / len(picks) < 0.80
    keyed = {router.decide(ev(id=str(i), partitionkey="customer-7")).destinations for i in range(50)}
    assert len(keyed) == 1


def test_max_rtt_excludes_outside_all_mode_and_a_route_with_nothing_left_holds() -> None:
    router = make_router({"destinations": THREE, "routes": [
        {"name": "r", "to": ["eu", "us"], "mode": "best", "constraints": {"max_rtt_ms": 100}}]})
    router.estimator.assume_rtt("eu", 150)
    router.estimator.assume_rtt("us", 90)
    assert router.decide(ev(), now=0).destinations == ("us",)  # eu is out although written first
    router.estimator.assume_rtt("us", 120)
    decision = router.decide(ev(), now=0)
    # nothing within max_rtt_ms: held for the best-scoring allowed destination, not dead-lettered
    assert decision.destinations == ("us",) and not decision.dead_letter and decision.reason is None
    assert decision.held == ("route 'r': holding for us: every destination residency allows is unavailable "
                             "(eu: rtt 150.0 ms > max_rtt_ms 100; us: rtt 120.0 ms > max_rtt_ms 100)")


def test_all_mode_keeps_down_subscribers() -> None:
    router = make_router({"destinations": THREE, "routes": [{"name": "r", "to": ["eu", "us"]}]})
    router.estimator.assume_down("us")
    assert router.decide(ev()).destinations == ("eu", "us")  # the spool holds us's copy until it is back


# -- residency ----------------------------------------------------------------------------------------------

RESIDENT = {
    "destinations": THREE,
    "residency": [{"when": {"exact": {"dataregulation": "GDPR"}}, "allow": ["EU"]},
                  {"when": {"sql": "dataclassification = 'restricted'"}, "allow": ["EU", "US"]}],
    "routes": [{"name": "best", "filter": {"exact": {"type": "t.best"}}, "to": ["us", "eu"], "mode": "best"},
               {"name": "fan", "filter": {"exact": {"type": "t.fan"}}, "to": ["us", "eu", "eu2"]},
               {"name": "failover", "filter": {"exact": {"type": "t.failover"}}, "to": ["us", "eu"],
                "mode": "failover"},
               {"name": "split", "filter": {"exact": {"type": "t.split"}}, "to": ["us", "eu"], "mode": "split"}],
}


@pytest.mark.parametrize("kind", ["t.best", "t.fan", "t.failover", "t.split"])
def test_gdpr_never_leaves_the_eu(kind: str) -> None:
    router = make_router(RESIDENT)
    router.estimator.assume_rtt("us", 1)
    router.estimator.assume_rtt("eu", 500)
    for reg in ("GDPR", "HIPAA,GDPR", " GDPR "):
        decision = router.decide(ev(kind, dataregulation=reg), now=0)
        assert decision.destinations and set(decision.destinations) <= {"eu", "eu2"}, (reg, decision)


def test_all_allowed_destinations_down_holds_for_an_allowed_one() -> None:
    router = make_router(RESIDENT)
    router.estimator.assume_down("eu")
    for kind in ("t.best", "t.failover", "t.split"):
        decision = router.decide(ev(kind, dataregulation="GDPR"), now=0)
        # held for eu (spooled there, it waits): never us, and not dead-lettered at ingress
        assert decision.destinations == ("eu",) and not decision.dead_letter, decision
        assert decision.routes == (kind[2:],)
        assert decision.held == (f"route {kind[2:]!r}: holding for eu: every destination residency allows is "
                                 "unavailable (us: residency: US not allowed; eu: down (ejected: assumed down))")
        # without the regulation the event is unrestricted and fails over
        unrestricted = router.decide(ev(kind), now=0)
        assert unrestricted.destinations == ("us",) and unrestricted.held is None
    router.estimator.assume_down("us")  # everything down: unrestricted events are held too
    held = router.decide(ev("t.failover"), now=0)
    assert held.destinations == ("us",) and held.held is not None and held.reason is None


def test_residency_is_never_relaxed_by_holding() -> None:
    # a route none of whose destinations residency allows refuses, healthy or not (compiled directly: the
    # load-time coverage check rejects such a configuration)
    config = RoutingConfig(
        (Destination("eu", "kafka://eu:1/t", jurisdiction="EU"), Destination("us", "kafka://us:1/t", jurisdiction="US"),
         Destination("default", "local://default")),
        tuple(Route(f"r-{mode}", None, ("us",), mode) for mode in ("best", "failover", "split")),
        Residency((ResidencyPolicy({"exact": {"dataregulation": "GDPR"}}, ("EU",), "gdpr"),)), "default")
    for down in (False, True):
        estimator = Estimator()
        router = Router(compile_table(config, estimator.slot), estimator)
        if down:
            estimator.assume_down("us")
        decision = router.decide(ev(dataregulation="GDPR"), now=0)
        assert decision.destinations == () and decision.held is None and decision.dead_letter
        assert decision.reason is not None and decision.reason.startswith(
            "route 'r-best': residency allows only EU (gdpr), and none of its destinations is there (us: US)")


HOLD = {"a": {"url": "kafka://a:1/t", "jurisdiction": "EU", "weight": 3},
        "b": {"url": "kafka://b:1/t", "jurisdiction": "EU", "weight": 1},
        "c": {"url": "kafka://c:1/t", "jurisdiction": "EU", "egress_usd_per_gb": 0.5},
        "x": {"url": "kafka://x:1/t", "jurisdiction": "US"}}
GDPR = [{"when": {"exact": {"dataregulation": "GDPR"}}, "allow": ["EU"], "name": "gdpr"}]


def test_failover_holds_for_the_first_allowed_destination_preferring_one_that_is_up() -> None:
    router = make_router({"destinations": HOLD, "residency": GDPR, "routes": [
        {"name": "r", "to": ["x", "a", "b"], "mode": "failover", "constraints": {"max_rtt_ms": 100}}]})
    est = router.estimator
    for name in ("x", "a", "b"):
        est.assume_down(name)
    assert router.decide(ev(dataregulation="GDPR")).destinations == ("a",)  # first allowed, written order
    assert router.decide(ev()).destinations == ("x",)  # unrestricted: first written
    est.assume_up("b")
    est.assume_rtt("b", 300)  # up, only too slow: preferred over a, which is down
    decision = router.decide(ev(dataregulation="GDPR"))
    assert decision.destinations == ("b",) and decision.held is not None
    assert "a: down (ejected: assumed down); b: rtt 300.0 ms > max_rtt_ms 100" in decision.held
    est.assume_rtt("b", 50)
    healthy = router.decide(ev(dataregulation="GDPR"))
    assert healthy.destinations == ("b",) and healthy.held is None


def test_split_holds_by_weight_and_key_among_the_allowed() -> None:
    router = make_router({"destinations": HOLD, "residency": GDPR, "routes": [
        {"name": "r", "to": ["x", "a", "b"], "mode": "split"}]})
    for name in ("x", "a", "b"):
        router.estimator.assume_down(name)
    picks = [router.decide(ev(id=str(i), dataregulation="GDPR")) for i in range(2000)]
    assert all(p.held is not None and p.destinations in (("a",), ("b",)) for p in picks)
    share = sum(p.destinations == ("a",) for p in picks) / len(picks)
    assert 0.68 < share < 0.82  # weights 3 : 1, health ignored
    keyed = {router.decide(ev(id=str(i), partitionkey="k7", dataregulation="GDPR")).destinations for i in range(50)}
    assert len(keyed) == 1


def test_best_holds_for_its_current_choice_else_the_lowest_score() -> None:
    router = make_router({"destinations": HOLD, "residency": GDPR, "routes": [
        {"name": "r", "to": ["x", "a", "c"], "mode": "best", "weights": {"latency": 1.0, "cost": 1.0}}]})
    est = router.estimator
    est.assume_rtt("a", 40)
    est.assume_rtt("c", 10)
    assert router.decide(ev(dataregulation="GDPR"), now=0).destinations == ("a",)  # c costs egress
    state = {k: list(v) for k, v in router.holder.active.hysteresis.items()}
    est.assume_down("a")
    est.assume_down("c")
    est.assume_down("x")
    held = router.decide(ev(dataregulation="GDPR"), now=1)
    assert held.destinations == ("a",) and held.held is not None  # the current choice
    assert router.holder.active.hysteresis == state  # holding does not change the hysteresis state
    fresh = make_router({"destinations": HOLD, "residency": GDPR, "routes": [
        {"name": "r", "to": ["x", "c", "a"], "mode": "best", "weights": {"latency": 1.0, "cost": 0.0}}]})
    fresh.estimator.assume_rtt("a", 40)
    fresh.estimator.assume_rtt("c", 10)
    for name in ("x", "a", "c"):
        fresh.estimator.assume_down(name)
    decision = fresh.decide(ev(dataregulation="GDPR"), now=0)  # no current choice: the lowest last RTT
    assert decision.destinations == ("c",) and decision.held is not None
    assert fresh.holder.active.hysteresis == {}


def test_a_multi_route_decision_joins_holds_and_reasons() -> None:
    router = make_router({"destinations": HOLD, "residency": GDPR, "routes": [
        {"name": "one", "to": ["x", "a"], "mode": "failover"},
        {"name": "two", "to": ["b"], "mode": "best"}]})
    for name in ("x", "a", "b"):
        router.estimator.assume_down(name)
    for explain in (False, True):
        decision = router.decide(ev(dataregulation="GDPR"), now=0, explain=explain)
        assert decision.destinations == ("a", "b") and decision.reason is None
        assert decision.held is not None and decision.held.startswith("route 'one': holding for a: ")
        assert "; route 'two': holding for b: every destination residency allows is unavailable (b: down" \
            in decision.held


def test_policies_intersect() -> None:
    router = make_router(RESIDENT)
    decision = router.decide(ev("t.fan", dataregulation="GDPR", dataclassification="restricted"))
    assert decision.destinations == ("eu", "eu2")
    assert router.decide(ev("t.fan", dataclassification="restricted")).destinations == ("us", "eu", "eu2")


def test_unmatched_deny_and_the_default_destination() -> None:
    router = make_router({
        "destinations": {"eu": {"url": "local://eu", "jurisdiction": "EU"}},
        "residency": {"unmatched": "deny",
                      "policies": [{"when": {"exact": {"dataregulation": "GDPR"}}, "allow": ["EU"]}]},
        "routes": [{"name": "orders", "filter": {"prefix": {"type": "com.example.order."}}, "to": ["eu"]}],
    })
    assert router.decide(ev(dataregulation="GDPR")).destinations == ("eu",)
    denied = router.decide(ev())
    assert denied.destinations == () and denied.reason == (
        "route 'orders': the event matches no residency policy and unmatched events are denied")
    fallback = router.decide(ev("com.example.other", dataregulation="GDPR"))
    assert fallback.destinations == () and fallback.reason == (
        "no route matched (default destination): residency allows only EU (residency.policies[0]), and none of "
        "its destinations is there (default: none)")


def test_unroutable_reasons_name_the_policies_each_event_matched() -> None:
    config = RoutingConfig(
        (Destination("eu", "kafka://eu:1/t", jurisdiction="EU"), Destination("us", "kafka://us:1/t", jurisdiction="US"),
         Destination("default", "local://default")),
        (Route("r", None, ("us",)),),  # not loadable from YAML (coverage check), compiled directly
        Residency((ResidencyPolicy({"exact": {"dataregulation": "GDPR"}}, ("EU",), "gdpr"),
                   ResidencyPolicy({"exact": {"dataclassification": "restricted"}}, ("EU",), "restricted"))),
        "default")
    estimator = Estimator()
    router = Router(compile_table(config, estimator.slot), estimator)
    first = router.decide(ev(dataregulation="GDPR"))
    second = router.decide(ev(dataclassification="restricted"))
    assert first.reason == "route 'r': residency allows only EU (gdpr), and none of its destinations is there (us: US)"
    assert second.reason is not None and "(restricted)" in second.reason


def test_residency_violation_recheck() -> None:
    router = make_router(RESIDENT)
    assert router.residency_violation(ev(dataregulation="GDPR"), "eu") is None
    assert router.residency_violation(ev(dataregulation="GDPR"), "us") == (
        "residency: us (jurisdiction US) is not allowed; residency allows only EU (residency[0])")
    assert router.residency_violation(ev(), "us") is None


# -- hysteresis ---------------------------------------------------------------------------------------------


def run_script(router: Router, script: list[tuple[float, float, float]]) -> list[str]:
    """(time, rtt of a, rtt of b) -> the destination chosen at each step."""
    out = []
    for now, a, b in script:
        router.estimator.assume_rtt("a", a)
        router.estimator.assume_rtt("b", b)
        out.append(router.decide(ev(), now=now).destinations[0])
    return out


def two(margin: float, dwell: float) -> Router:
    dests = {"a": "kafka://a:1/t", "b": "kafka://b:1/t"}
    return make_router({"destinations": dests, "routes": [
        {"name": "r", "to": ["a", "b"], "mode": "best", "hysteresis": {"margin": margin, "min_dwell_seconds": dwell}}]})


def test_noise_within_the_margin_does_not_flap() -> None:
    noisy = [(float(t), 10.0, 9.5 if t % 2 else 10.5) for t in range(60)]
    assert set(run_script(two(0.1, 5), noisy)) == {"a"}
    flips = run_script(two(0.0, 0), noisy)
    assert sum(x != y for x, y in itertools.pairwise(flips)) > 50  # no hysteresis: it flaps


def test_alternating_leader_does_not_flap_within_dwell() -> None:
    script = [(float(t), 10.0 if (t // 3) % 2 else 20.0, 20.0 if (t // 3) % 2 else 10.0) for t in range(60)]
    choices = run_script(two(0.1, 5), script)
    assert sum(x != y for x, y in itertools.pairwise(choices)) == 0


def test_switch_after_margin_holds_for_the_dwell() -> None:
    script = [(0.0, 10, 20), (1.0, 10, 9.5), (2.0, 10, 5), (4.0, 10, 5), (6.9, 10, 5), (7.0, 10, 5), (8.0, 10, 9.8)]
    assert run_script(two(0.1, 5), script) == ["a", "a", "a", "a", "a", "b", "b"]
    # a challenger that stops being better by the margin restarts the clock
    script = [(0.0, 10, 20), (1.0, 10, 5), (3.0, 10, 9.5), (5.0, 10, 5), (7.0, 10, 5), (10.0, 10, 5)]
    assert run_script(two(0.1, 5), script) == ["a", "a", "a", "a", "a", "b"]


def test_a_current_choice_that_fails_a_hard_constraint_is_replaced_at_once() -> None:
    router = two(0.1, 60)
    assert run_script(router, [(0.0, 10, 20)]) == ["a"]
    router.estimator.assume_down("a")
    assert run_script(router, [(0.5, 10, 20)]) == ["b"]
    router.estimator.assume_up("a")  # back, and better: the dwell applies again
    assert run_script(router, [(1.0, 5, 20), (30.0, 5, 20), (61.5, 5, 20)]) == ["b", "b", "a"]


# -- atomic table swap ---------------------------------------------------------------------------------------


def test_a_decision_in_flight_finishes_on_the_old_table() -> None:
    router = make_router({"destinations": {"old": "local://old", "new": "local://new"},
                          "routes": [{"name": "r", "filter": {"exact": {"type": "t"}}, "to": ["old"]}]})
    new_table = make_router({"destinations": {"old": "local://old", "new": "local://new"},
                             "routes": [{"name": "r", "filter": {"exact": {"type": "t"}}, "to": ["new"]}]}).table
    real = router.table.route_pred[0]

    def swapping(attrs: Any) -> bool:
        router.swap(new_table)  # the control plane swaps while this decision is evaluating filters
        return real(attrs)

    old = router.table
    router.holder.active.table = dataclasses.replace(old, route_pred=(swapping, *old.route_pred[1:]))
    assert router.decide(ev("t")).destinations == ("old",)
    assert router.table is new_table
    assert router.decide(ev("t")).destinations == ("new",)
    assert router.holder.generation == 1


def test_swap_carries_the_current_best_choice_over() -> None:
    router = two(0.1, 5)
    assert run_script(router, [(0.0, 10, 20)]) == ["a"]
    router.swap(two(0.1, 5).table)
    assert run_script(router, [(1.0, 10, 8)]) == ["a"]  # still a: b must hold its lead for the dwell


# -- explain ---------------------------------------------------------------------------------------------------


def test_explain_record_and_json_shape() -> None:
    router = make_router(RESIDENT)
    router.estimator.assume_rtt("us", 10)
    router.estimator.assume_rtt("eu", 40)
    decision = router.decide(ev("t.best"), explain=True, now=0)
    assert explain_object(decision) == {
        "route": "best", "destinations": ["us"],
        "candidates": [{"destination": "us", "score": 0.25, "excluded": None},
                       {"destination": "eu", "score": 1.0, "excluded": None}]}
    gdpr = router.decide(ev("t.best", dataregulation="GDPR"), explain=True, now=0)
    assert explain_object(gdpr)["candidates"] == [
        {"destination": "us", "score": None, "excluded": "residency: US not allowed"},
        {"destination": "eu", "score": 1.0, "excluded": None}]
    assert gdpr.explain is not None and gdpr.explain[0].allowed == ("EU",)
    assert gdpr.explain[0].policies == ("residency[0]",)


# -- property: residency is never violated ------------------------------------------------------------------

JURISDICTIONS = ("EU", "US", "APAC", "CH")
REGULATIONS = ("GDPR", "HIPAA", "PCI-DSS", "CCPA")
CLASSES = ("public", "internal", "confidential", "restricted")
TYPES = ("com.a.created", "com.a.deleted", "com.b.created", "org.c.x")

value_filters = st.one_of(
    st.builds(lambda v: {"exact": {"dataregulation": v}}, st.sampled_from(REGULATIONS)),
    st.builds(lambda v: {"exact": {"dataclassification": v}}, st.sampled_from(CLASSES)),
    st.builds(lambda v: {"sql": f"dataclassification = '{v}'"}, st.sampled_from(CLASSES)),
    st.builds(lambda v: {"sql": f"dataregulation LIKE '%{v}%'"}, st.sampled_from(REGULATIONS)),
    st.builds(lambda v: {"prefix": {"type": v}}, st.sampled_from(("com.", "com.a.", "org."))),
    st.builds(lambda v: {"exact": {"type": v}}, st.sampled_from(TYPES)),
    st.builds(lambda v: {"sql": f"type LIKE '{v}%' AND EXISTS datacategory"}, st.sampled_from(("com.", "org."))),
)
filters = st.recursive(value_filters, lambda inner: st.one_of(
    st.builds(lambda xs: {"all": xs}, st.lists(inner, min_size=1, max_size=3)),
    st.builds(lambda xs: {"any": xs}, st.lists(inner, min_size=1, max_size=3)),
    st.builds(lambda x: {"not": x}, inner)), max_leaves=5)


@st.composite
def routing_configs(draw: st.DrawFn) -> RoutingConfig:
    n = draw(st.integers(1, 6))
    dests = [Destination(f"d{i}", f"kafka://d{i}:1/t", jurisdiction=draw(st.sampled_from((*JURISDICTIONS, None))),
                         egress_usd_per_gb=draw(st.floats(0, 0.2)), usd_per_million=draw(st.floats(0, 1)),
                         weight=draw(st.floats(0.1, 5))) for i in range(n)]
    dests.append(Destination("default", "local://default", jurisdiction=draw(st.sampled_from((*JURISDICTIONS, None)))))
    policies = tuple(ResidencyPolicy(draw(filters), tuple(draw(st.lists(st.sampled_from(JURISDICTIONS), max_size=3,
                                                                          unique=True))))
                     for _ in range(draw(st.integers(0, 4))))
    routes = []
    for r in range(draw(st.integers(1, 5))):
        to = draw(st.lists(st.sampled_from([d.name for d in dests[:-1]]), min_size=1, max_size=n, unique=True))
        routes.append(Route(
            f"r{r}", draw(st.one_of(st.none(), filters)), tuple(to), draw(st.sampled_from(("best", "all", "failover",
                                                                                              "split"))),
            priority=draw(st.integers(0, 3)),
            weights=Weights(draw(st.floats(0, 2)), draw(st.floats(0, 2))),
            constraints=Constraints(draw(st.sampled_from((math.inf, 50.0, 200.0)))),
            hysteresis=Hysteresis(draw(st.floats(0, 0.5)), draw(st.sampled_from((0.0, 1.0, 5.0)))),
        ))
    unmatched = draw(st.sampled_from(("unrestricted", "deny")))
    return RoutingConfig(tuple(dests), tuple(routes), Residency(policies, unmatched), "default")


@st.composite
def events(draw: st.DrawFn) -> Event:
    attrs: dict[str, Any] = {"specversion": "1.0", "id": draw(st.text("abc123", min_size=1, max_size=4)),
                             "source": "/s", "type": draw(st.sampled_from(TYPES))}
    if draw(st.booleans()):
        regs = draw(st.lists(st.sampled_from(REGULATIONS), min_size=1, max_size=3))
        attrs["dataregulation"] = draw(st.sampled_from((",", ", ", " , "))).join(regs)
    for name, values in (("dataclassification", CLASSES), ("datacategory", ("sensitive", "phi"))):
        if draw(st.booleans()):
            attrs[name] = draw(st.sampled_from(values))
    if draw(st.booleans()):
        attrs["partitionkey"] = draw(st.sampled_from(("k1", "k2", "k3")))
    return Event(attrs, draw(st.one_of(st.none(), st.binary(max_size=64))))


def allowed_jurisdictions(config: RoutingConfig, event: Event) -> set[str | None] | None:
    """The oracle, written from the spec rather than from the table: None means unrestricted."""
    reg = event.attributes.get("dataregulation")
    views = [event.attributes]
    if isinstance(reg, str) and ("," in reg or reg != reg.strip()):
        views = [{**event.attributes, "dataregulation": e} for e in regulation_entries(reg)]
    allowed: set[str | None] | None = None
    for policy in config.residency.policies:
        if any(compile_filter(policy.when)(v) for v in views):
            allowed = set(policy.allow) if allowed is None else allowed & set(policy.allow)
    if allowed is None and config.residency.unmatched == "deny":
        return set()
    return allowed


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=routing_configs(), batch=st.lists(events(), min_size=1, max_size=8), data=st.data())
def test_no_decision_ever_leaves_the_allowed_jurisdictions(config: RoutingConfig, batch: list[Event],
                                                           data: st.DataObject) -> None:
    routers = []
    for _ in range(2):  # one decides plainly, its twin with explain records: same state, same answers
        estimator = Estimator(config.estimator)
        routers.append(Router(compile_table(config, estimator.slot), estimator))
    names = [d.name for d in config.destinations]
    everything_down = data.draw(st.booleans())
    for step, event in enumerate(batch):
        for name in names:
            rtt = data.draw(st.floats(0.1, 400))
            up = not everything_down and data.draw(st.booleans())
            admit = data.draw(st.sampled_from((1.0, 0.5, 0.1)))
            for router in routers:
                s = router.estimator.slot(name)
                router.estimator.rtt_ms[s] = rtt
                router.estimator.up[s] = int(up)
                router.estimator.admit[s] = admit if up else 0.0
        plain: Decision = routers[0].decide(event, now=float(step))
        explained = routers[1].decide(event, now=float(step), explain=True)
        assert plain.destinations == explained.destinations and plain.reason == explained.reason
        assert plain.held == explained.held
        assert routers[0].holder.active.hysteresis == routers[1].holder.active.hysteresis
        allowed = allowed_jurisdictions(config, event)
        places = {d.name: d.jurisdiction for d in config.destinations}
        for name in plain.destinations:
            assert allowed is None or places[name] in allowed, (name, places[name], allowed, event)
        if not plain.destinations:
            assert plain.reason
        matched = [r for r in config.routes if r.filter is None or compile_filter(r.filter)(event.attributes)]
        reachable = {n for r in matched for n in r.to} if matched else {"default"}
        assert set(plain.destinations) <= reachable
        assert explained.explain is not None
        for record in explained.explain:
            for candidate in record.candidates:
                if allowed is not None and places[candidate.destination] not in allowed:
                    assert candidate.excluded is not None and candidate.excluded.startswith("residency:")
                assert (candidate.score is None) == (candidate.excluded is not None)
            # holding: a choosing route with an allowed destination always names one (and only an allowed
            # one), holds exactly when none is healthy, and never carries a dead-letter reason then
            allowed_here = [c for c in record.candidates if not (c.excluded or "").startswith("residency:")]
            if record.mode == "all" or not allowed_here:
                assert record.held is None
                continue
            assert len(record.destinations) == 1 and record.reason is None, record
            assert record.destinations[0] in {c.destination for c in allowed_here}
            healthy = [c for c in allowed_here if c.excluded is None]
            assert (record.held is None) == bool(healthy), record
            if record.held is not None:
                assert record.held.startswith(f"route {record.route!r}: holding for {record.destinations[0]}: ")
                assert record.destinations[0] in plain.destinations and plain.held is not None
            if everything_down:
                assert record.held is not None
