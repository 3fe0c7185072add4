"""The router's YAML contract (docs/router.md): parsed into the model, every mistake reported exactly."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from umcef.fabric.config import ConfigError, load

ISSUE_EXAMPLE = """
destinations:
  eu-kafka: {url: "kafka://127.0.0.1:9092/orders", cloud: onprem, region: eu-central-1, jurisdiction: EU, egress_usd_per_gb: 0.02, usd_per_million: 0}
  us-sqs:   {url: "sqs://orders?region=us-east-1", cloud: aws, region: us-east-1, jurisdiction: US, egress_usd_per_gb: 0.09, usd_per_million: 0.40}
residency:
  - when: {exact: {dataregulation: GDPR}}      # any filter dialect, including {sql: "..."}
    allow: [EU]
routes:
  - name: orders
    filter: {prefix: {type: "com.example.order."}}
    to: [eu-kafka, us-sqs]
    mode: best                                   # best | all | failover | split
    weights: {latency: 1.0, cost: 0.2}
"""  # noqa: E501

DESTS = """
destinations:
  eu: {url: "local://eu", jurisdiction: EU}
  eu2: {url: "local://eu2", jurisdiction: EU}
  us: {url: "local://us", jurisdiction: US}
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "umcef.yaml"
    path.write_text(text)
    return path


def test_the_issue_example_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, ISSUE_EXAMPLE), env={})
    routing = cfg.routing
    eu = routing.destination("eu-kafka")
    assert (eu.cloud, eu.region, eu.jurisdiction, eu.egress_usd_per_gb, eu.usd_per_million) == \
        ("onprem", "eu-central-1", "EU", 0.02, 0.0)
    assert routing.destination("us-sqs").usd_per_million == 0.40
    assert routing.destination("default").jurisdiction is None  # the implicit local default
    (policy,) = routing.residency.policies
    assert policy.allow == ("EU",) and policy.when == {"exact": {"dataregulation": "GDPR"}}
    assert routing.residency.unmatched == "unrestricted"
    (route,) = cfg.routes
    assert route.mode == "best" and route.weights.latency == 1.0 and route.weights.cost == 0.2
    assert route.constraints.max_rtt_ms == math.inf and route.priority == 0
    assert route.hysteresis.margin == 0.1 and route.hysteresis.min_dwell_seconds == 5.0


def test_defaults_keep_static_fan_out(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, DESTS + "routes: [{name: r, to: [eu, us]}, {name: s, to: eu}]\n"), env={})
    assert [r.mode for r in cfg.routes] == ["all", "all"]
    assert cfg.routes[1].to == ("eu",)


def test_full_shape(tmp_path: Path) -> None:
    text = DESTS + """
residency:
  unmatched: deny
  policies:
    - {name: gdpr, when: {sql: "dataregulation = 'GDPR'"}, allow: [EU]}
    - {when: {exact: {dataclassification: public}}, allow: [EU, US]}
routes:
  - name: r
    priority: 5
    filter: {all: [{prefix: {type: a.}}, {not: {sql: "dataregulation LIKE '%GDPR%'"}}]}
    to: [us, eu]
    mode: failover
    weights: {latency: 0.5, cost: 2}
    constraints: {max_rtt_ms: 150}
    hysteresis: {margin: 0.2, min_dwell_seconds: 0}
router:
  explain_sample_every: 100
  estimator: {decay_seconds: 3, eject_after_failures: 2, readmit_floor: 0.5}
"""
    cfg = load(write(tmp_path, text), env={"UMCEF_ROUTER__ESTIMATOR__INITIAL_RTT_MS": "20"})
    routing = cfg.routing
    assert routing.residency.unmatched == "deny"
    assert [p.name for p in routing.residency.policies] == ["gdpr", "residency.policies[1]"]
    (route,) = routing.routes
    assert (route.priority, route.mode, route.to) == (5, "failover", ("us", "eu"))
    assert route.weights.cost == 2.0 and route.constraints.max_rtt_ms == 150.0
    assert route.hysteresis.margin == 0.2 and route.hysteresis.min_dwell_seconds == 0.0
    assert routing.explain_sample_every == 100
    assert routing.estimator.decay_seconds == 3.0 and routing.estimator.eject_after_failures == 2
    assert routing.estimator.readmit_floor == 0.5 and routing.estimator.initial_rtt_ms == 20.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("routes: [{name: r, to: [nope]}]", "umcef.yaml: routes[0].to[0]: unknown destination 'nope' (known: default)"),
        (DESTS + "routes: [{name: r, to: [eu, eu]}]", "routes[0].to[1]: destination 'eu' listed twice"),
        (DESTS + "routes: [{name: r, to: [eu], mode: fastest}]",
         "routes[0].mode: expected one of best, all, failover, split, got 'fastest'"),
        (DESTS + "routes: [{name: r, to: [eu], wieghts: {}}]", "routes[0].wieghts: unknown key; expected one of"),
        (DESTS + "routes: [{name: r, to: [eu], weights: {latency: -1}}]",
         "routes[0].weights.latency: expected a number at least 0, got -1"),
        (DESTS + "routes: [{name: r, to: [eu], weights: {speed: 1}}]",
         "routes[0].weights.speed: unknown key; expected one of latency, cost"),
        (DESTS + "routes: [{name: r, to: [eu], constraints: {max_rtt_ms: 0}}]",
         "routes[0].constraints.max_rtt_ms: expected a number above 0, got 0"),
        (DESTS + "routes: [{name: r, to: [eu], hysteresis: {margin: 1.5}}]",
         "routes[0].hysteresis.margin: expected a number at least 0 and below 1, got 1.5"),
        (DESTS + "routes: [{name: r, to: [eu], priority: high}]",
         "routes[0].priority: expected an integer, got a string 'high'"),
        (DESTS + "routes: [{name: r, to: [eu], filter: {sql: \"type = = 'x'\"}}]",
         "routes[0].filter.sql: CESQL syntax error at position 7 (line 1, column 8): expected an expression"),
        (DESTS + "routes: [{name: r, to: [eu], filter: {any: [{sql: \"type LIKE\"}]}}]",
         "routes[0].filter.any[0].sql: CESQL syntax error at position 9"),
        ("destinations: {a: {url: 'local://a', jurisdication: EU}}",
         "destinations.a.jurisdication: unknown key; expected one of url, options, cloud"),
        ("destinations: {a: {url: 'local://a', egress_usd_per_gb: cheap}}",
         "destinations.a.egress_usd_per_gb: expected a number, got a string 'cheap'"),
        ("destinations: {a: {url: 'local://a', weight: 0}}", "destinations.a.weight: expected a number above 0"),
        ("destinations: {_a: 'local://a'}", "destinations._a: destination names starting with '_' are reserved"),
        (DESTS + "residency: [{when: {exact: {x: y}}, allow: [Eu]}]",
         "residency[0].allow[0]: unknown jurisdiction 'Eu' (destinations have: EU, US)"),
        (DESTS + "residency: [{allow: [EU]}]", "residency[0].when: expected a filter"),
        (DESTS + "residency: [{when: {sql: 'a ='}, allow: [EU]}]", "residency[0].when.sql: CESQL syntax error"),
        (DESTS + "residency: [{when: {exact: {x: y}}, allow: EU, deny: [US]}]",
         "residency[0].deny: unknown key; expected one of name, when, allow"),
        (DESTS + "residency: {unmatched: maybe}", "residency.unmatched: expected one of unrestricted, deny"),
        (DESTS + "residency: {policies: {when: x}}", "residency.policies: expected a list of policies"),
        (DESTS + "router: {estimator: {decay: 1}}", "router.estimator.decay: unknown key"),
        (DESTS + "router: {explain_sample_every: -1}",
         "router.explain_sample_every: expected an integer of at least 0, got -1"),
    ],
)
def test_mistakes_are_reported_exactly(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env={})
    assert message in str(info.value)


GDPR_EU = "residency: [{when: {exact: {dataregulation: GDPR}}, allow: [EU]}]\n"


@pytest.mark.parametrize(
    "route",
    [
        "{name: r, to: [us]}",
        "{name: r, filter: {prefix: {type: com.}}, to: [us]}",
        "{name: r, filter: {not: {exact: {dataregulation: GDPR}}}, to: [us]}",  # "GDPR,HIPAA" still matches
        "{name: r, filter: {sql: \"dataregulation LIKE 'GDPR%'\"}, to: [us]}",
        "{name: r, filter: {exact: {dataregulation: GDPR}}, to: [us], mode: best}",
    ],
)
def test_residency_coverage_gap_is_a_load_error(tmp_path: Path, route: str) -> None:
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, DESTS + GDPR_EU + f"routes: [{route}]\n"), env={})
    message = str(info.value)
    assert "umcef.yaml: routes[0]: route 'r' can match events residency[0] applies to, which may only enter EU" \
        in message
    assert "none of its destinations is allowed (us: US)" in message


@pytest.mark.parametrize(
    "route",
    [
        "{name: r, to: [us, eu]}",  # GDPR events can still reach eu
        "{name: r, filter: {exact: {dataregulation: HIPAA}}, to: [us]}",
        "{name: r, filter: {sql: \"dataregulation IN ('HIPAA', 'PCI-DSS')\"}, to: [us]}",
        "{name: r, filter: {not: {sql: \"dataregulation LIKE '%GDPR%'\"}}, to: [us]}",
        "{name: r, filter: {all: [{prefix: {type: a.}}, {not: {sql: \"dataregulation LIKE '%GDPR%'\"}}]}, to: [us]}",
    ],
)
def test_provably_disjoint_or_covered_routes_load(tmp_path: Path, route: str) -> None:
    load(write(tmp_path, DESTS + GDPR_EU + f"routes: [{route}]\n"), env={})


def test_policies_that_together_allow_nothing(tmp_path: Path) -> None:
    text = DESTS + """
residency:
  - {when: {exact: {dataclassification: restricted}}, allow: [EU]}
  - {when: {exact: {datacategory: us-only}}, allow: [US]}
routes: [{name: r, to: [eu, us]}]
"""
    with pytest.raises(ConfigError) as info:
        load(write(tmp_path, text), env={})
    assert "routes[0]: route 'r' can match events residency[0] and residency[1] all apply to, which together " \
           "allow no jurisdiction" in str(info.value)


def test_deliberate_denials_are_not_gaps(tmp_path: Path) -> None:
    text = DESTS + """
residency:
  unmatched: deny
  policies:
    - {when: {exact: {dataclassification: secret}}, allow: []}
    - {when: {exact: {dataclassification: public}}, allow: [US]}
routes: [{name: r, filter: {exact: {dataclassification: public}}, to: [us]}]
"""
    cfg = load(write(tmp_path, text), env={})
    assert cfg.routing.residency.policies[0].allow == ()
