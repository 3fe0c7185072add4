"""The router's configuration model: destinations, routes, residency policies and estimator settings.

Plain frozen dataclasses, validated by `router/config.py` and compiled into the flat route table by
`router/table.py`. Filters stay in their configuration form (a one-key mapping naming a Subscriptions
API dialect); `router/filters.py` compiles them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Final, Literal

Mode = Literal["best", "all", "failover", "split"]
MODES: Final[tuple[Mode, ...]] = ("best", "all", "failover", "split")
DEFAULT_MODE: Final[Mode] = "all"
"""Every matching route fans out to all its destinations, as the foundation's static routes did."""

Unmatched = Literal["unrestricted", "deny"]
UNMATCHED: Final[tuple[Unmatched, ...]] = ("unrestricted", "deny")

FilterSpec = Any
"""A filter in configuration form: `{"exact": {...}}`, `{"all": [...]}`, `{"sql": "..."}`, ..."""


@dataclass(frozen=True, slots=True)
class Destination:
    """Where events can go. Only `name` and `url` matter to delivery; the rest feeds routing."""

    name: str
    url: str
    cloud: str | None = None
    region: str | None = None
    jurisdiction: str | None = None  # None: unspecified, never satisfies a residency policy
    egress_usd_per_gb: float = 0.0
    usd_per_million: float = 0.0
    weight: float = 1.0  # share of traffic in `split` mode
    max_in_flight: int = 500  # events per publish call in flight to this destination

    @property
    def is_local(self) -> bool:
        return self.url.lower().startswith("local:")


@dataclass(frozen=True, slots=True)
class Weights:
    """Objective weights of a route's score: lower score wins. Both terms are normalised to [0, 1]."""

    latency: float = 1.0
    cost: float = 0.0


@dataclass(frozen=True, slots=True)
class Constraints:
    max_rtt_ms: float = math.inf


@dataclass(frozen=True, slots=True)
class Hysteresis:
    """`best` mode changes destination only when a challenger's score is below the current one's by
    `margin` (a fraction: 0.1 = 10 % better) continuously for `min_dwell_seconds`."""

    margin: float = 0.1
    min_dwell_seconds: float = 5.0


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    filter: FilterSpec  # None matches every event
    to: tuple[str, ...]
    mode: Mode = DEFAULT_MODE
    priority: int = 0
    weights: Weights = Weights()
    constraints: Constraints = Constraints()
    hysteresis: Hysteresis = Hysteresis()


@dataclass(frozen=True, slots=True)
class ResidencyPolicy:
    """Events matching `when` may only enter the jurisdictions in `allow` (an empty tuple: none)."""

    when: FilterSpec
    allow: tuple[str, ...]
    name: str = ""


@dataclass(frozen=True, slots=True)
class Residency:
    policies: tuple[ResidencyPolicy, ...] = ()
    unmatched: Unmatched = "unrestricted"


@dataclass(frozen=True, slots=True)
class EstimatorSettings:
    """Peak-EWMA RTT and outlier ejection (router/estimator.py)."""

    decay_seconds: float = 10.0  # time constant of the slow decay towards lower samples
    initial_rtt_ms: float = 50.0  # prior for a remote destination before its first sample
    probe_interval_seconds: float = 5.0
    probe_timeout_seconds: float = 5.0
    eject_after_failures: int = 5  # consecutive failures (probes or deliveries) before ejection
    ejection_seconds: float = 10.0  # first ejection; doubles for each consecutive re-ejection
    max_ejection_seconds: float = 300.0
    readmit_seconds: float = 30.0  # ramp from `readmit_floor` back to full admission
    readmit_floor: float = 0.1


@dataclass(frozen=True, slots=True)
class RoutingConfig:
    """Everything the router needs, in configuration order."""

    destinations: tuple[Destination, ...] = ()
    routes: tuple[Route, ...] = ()
    residency: Residency = Residency()
    default: str = "default"
    estimator: EstimatorSettings = EstimatorSettings()
    explain_sample_every: int = 0  # log every Nth decision with its explain record; 0: never

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)
