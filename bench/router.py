"""Router decision speed: the compiled decision (`umcef._native._router`) vs the pure-Python reference.

    python bench/router.py            # full run (about a minute)
    python bench/router.py --quick    # fewer repeats and events, for a smoke test

Tables of 10, 100, 1,000 and 10,000 routes with realistic filters, a quarter each: `prefix` on
`type`, `exact` on `type`, `all(prefix type, exact source)` and CESQL
`type LIKE 'p%' AND (dataclassification <> 'public' OR EXISTS partitionkey)`; 3 destinations per route
(EU, US, APAC; egress and request prices); two residency policies (`exact dataregulation GDPR` -> EU,
CESQL `dataclassification = 'restricted'` -> EU, CH). Mode `best` with latency + cost scoring and
hysteresis (the target's case), plus one mixed-mode row (best/all/failover/split) at 100 routes.
Events: 1,000 (200 with --quick), each matching one route (1 in 20 none: the default), a third with
`dataregulation` (some of them lists: "GDPR, HIPAA"), some `dataclassification`, some `partitionkey`.
Both implementations decide the same events in the same run, through `Router.decide`, and must give
the same destinations (checked). Also CESQL: ns per `matches` of a few expressions, native program
vs the compiled Python closure. Writes bench/results/router.json and router.png.

Method: each measurement loops over the events (several passes, ~40 ms), repeated (7 times, 3 with
--quick) with the garbage collector off; the figure is the best repeat (median in the JSON).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

from _plot import write_results

from umcef.fabric import accel
from umcef.fabric.event import Event
from umcef.router.cesql import compile_expression
from umcef.router.decide import Router, _Active
from umcef.router.estimator import Estimator
from umcef.router.model import (
    Destination,
    Hysteresis,
    Residency,
    ResidencyPolicy,
    Route,
    RoutingConfig,
    Weights,
)
from umcef.router.table import TableHolder, compile_table

SIZES = (10, 100, 1_000, 10_000)
TARGET_DECISIONS_PER_S = 1_000_000
TARGET_SPEEDUP = 20.0
REGIONS = (("eu", "EU", 0.02, 0.0), ("us", "US", 0.09, 0.4), ("ap", "APAC", 0.12, 0.5))
CESQL = (
    "type LIKE 'com.example.s7.%' AND (dataclassification <> 'public' OR EXISTS partitionkey)",
    "dataregulation = 'GDPR'",
    "dataclassification IN ('restricted', 'confidential', 'internal')",
    "NOT EXISTS datacategory OR datacategory = 'phi'",
    "count >= 10 AND count < 100",
    "UPPER(dataclassification) = 'RESTRICTED'",  # a function call: the Python closure on both sides
)


def load_native() -> Any | None:
    try:
        return importlib.import_module("umcef._native._router")
    except ImportError:
        return None


def config_for(n: int, mixed: bool = False) -> RoutingConfig:
    dests = [Destination(f"{short}-{k}", f"kafka://{short}{k}:9092/t", jurisdiction=where, egress_usd_per_gb=egress,
                         usd_per_million=per_million)
             for k in range(4) for short, where, egress, per_million in REGIONS]
    dests.append(Destination("default", "local://default", jurisdiction="EU"))
    modes = ("best", "all", "failover", "split")
    routes = []
    for i in range(n):
        p = f"com.example.s{i}."
        kind = i % 4
        if kind == 0:
            spec: dict[str, Any] = {"prefix": {"type": p}}
        elif kind == 1:
            spec = {"exact": {"type": p + "created"}}
        elif kind == 2:
            spec = {"all": [{"prefix": {"type": p}}, {"exact": {"source": "/shop"}}]}
        else:
            spec = {"sql": f"type LIKE '{p}%' AND (dataclassification <> 'public' OR EXISTS partitionkey)"}
        k = i % 4
        routes.append(Route(f"r{i}", spec, (f"eu-{k}", f"us-{k}", f"ap-{k}"), modes[i % 4] if mixed else "best",
                            weights=Weights(1.0, 0.5), hysteresis=Hysteresis(0.1, 5.0)))
    policies = (ResidencyPolicy({"exact": {"dataregulation": "GDPR"}}, ("EU",), "gdpr"),
                ResidencyPolicy({"sql": "dataclassification = 'restricted'"}, ("EU", "CH"), "restricted"))
    return RoutingConfig(tuple(dests), tuple(routes), Residency(policies, "unrestricted"), "default")


def make_events(n_routes: int, count: int, rng: random.Random) -> list[Event]:
    out = []
    for i in range(count):
        j = rng.randrange(n_routes)
        attrs: dict[str, Any] = {"specversion": "1.0", "id": f"e{i}", "source": "/shop",
                                 "type": f"com.example.s{j}.created" if i % 20 else "org.other.thing",
                                 "time": "2026-01-01T00:00:00Z", "datacontenttype": "application/json"}
        roll = rng.random()
        if roll < 0.25:
            attrs["dataregulation"] = "GDPR"
        elif roll < 0.33:
            attrs["dataregulation"] = "GDPR, HIPAA"
        attrs["dataclassification"] = rng.choice(("public", "internal", "restricted", "confidential"))
        if rng.random() < 0.5:
            attrs["partitionkey"] = f"k{rng.randrange(50)}"
        out.append(Event(attrs, b'{"orderId": 42, "total": 99.5, "currency": "EUR"}'))
    return out


def make_router(config: RoutingConfig, native: Any | None) -> Router:
    estimator = Estimator(config.estimator)
    table = compile_table(config, estimator.slot)
    router = Router(table, estimator, native=False)
    if native is not None:  # the compiled twin, even under UMCEF_PURE=1 (the bench shows both)
        router._native_module = native
        router.holder = TableHolder(_Active(table, None, native))
        router.decide = native.Decider(router)  # type: ignore[method-assign]
    rng = random.Random(7)
    for d in config.destinations:
        if not d.url.startswith("local://"):
            estimator.assume_rtt(d.name, rng.uniform(5, 120))
    return router


def timed(fn: Callable[[], int], repeats: int) -> tuple[float, float]:
    """(best, median) ns per item; `fn` runs one pass and returns how many items it did."""
    passes = 1
    while True:
        start = time.perf_counter_ns()
        items = sum(fn() for _ in range(passes))
        elapsed = time.perf_counter_ns() - start
        if elapsed > 40_000_000 or passes > 10_000:
            break
        passes *= 2
    runs = []
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter_ns()
            items = sum(fn() for _ in range(passes))
            runs.append((time.perf_counter_ns() - start) / items)
    finally:
        gc.enable()
    return min(runs), statistics.median(runs)


def bench_decisions(config: RoutingConfig, events: list[Event], native: Any | None,
                    repeats: int) -> dict[str, Any]:
    pure_router = make_router(config, None)
    row: dict[str, Any] = {}
    t0 = time.perf_counter()
    native_router = make_router(config, native) if native is not None else None
    row["compile_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    if native_router is not None:  # same answers, event by event (same state: same history)
        for event in events:
            a = pure_router.decide(event, now=0.0)
            b = native_router.decide(event, now=0.0)
            assert (a.destinations, a.routes, a.reason) == (b.destinations, b.routes, b.reason), event.attributes
    for label, router in (("pure", pure_router), ("native", native_router)):
        if router is None:
            row[f"{label}_ns"] = row[f"{label}_median_ns"] = row[f"{label}_per_s"] = None
            continue
        decide = router.decide

        def one_pass(decide: Callable[..., Any] = decide) -> int:
            for event in events:
                decide(event)
            return len(events)

        best, median = timed(one_pass, repeats)
        row[f"{label}_ns"] = round(best, 1)
        row[f"{label}_median_ns"] = round(median, 1)
        row[f"{label}_per_s"] = round(1e9 / best)
    row["speedup"] = round(row["pure_ns"] / row["native_ns"], 1) if row["native_ns"] else None
    return row


def bench_cesql(native: Any | None, repeats: int) -> dict[str, Any]:
    rng = random.Random(3)
    samples = [{"specversion": "1.0", "id": str(i), "source": "/shop",
                "type": rng.choice(("com.example.s7.created", "com.example.s8.created")),
                "dataregulation": rng.choice(("GDPR", "HIPAA")),
                "dataclassification": rng.choice(("public", "internal", "restricted")),
                "count": rng.randrange(200), **({"partitionkey": "k"} if i % 2 else {}),
                **({"datacategory": "phi"} if i % 3 == 0 else {})} for i in range(200)]
    out: dict[str, Any] = {}
    for text in CESQL:
        expression = compile_expression(text)
        program = native.compile_sql(expression) if native is not None else None
        row: dict[str, Any] = {"native_program": bool(program is not None and program.native)}
        for label, fn in (("pure", expression.matches), ("native", program.matches if program else None)):
            if fn is None:
                row[f"{label}_ns"] = None
                continue

            def one_pass(fn: Callable[[Any], bool] = fn) -> int:
                for attrs in samples:
                    fn(attrs)
                return len(samples)

            row[f"{label}_ns"] = round(timed(one_pass, repeats)[0], 1)
        row["speedup"] = round(row["pure_ns"] / row["native_ns"], 1) if row["native_ns"] else None
        out[text] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and events (< 30 s)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    count = 200 if args.quick else 1000
    native = load_native()
    rng = random.Random(1)
    started = time.perf_counter()

    results: dict[str, dict[str, Any]] = {}
    cases = [(f"{n:,} routes", config_for(n), n) for n in SIZES]
    cases.insert(2, ("100 routes, mixed modes", config_for(100, mixed=True), 100))
    for label, config, n in cases:
        results[label] = bench_decisions(config, make_events(n, count, rng), native, repeats)
        r = results[label]
        print(f"  {label}: pure {r['pure_ns']} ns, native {r['native_ns']} ns", file=sys.stderr)
    cesql = bench_cesql(native, repeats)

    print(f"\n{'decision (best: latency+cost, residency)':<34}{'pure ns':>10}{'native ns':>11}"
          f"{'pure /s':>12}{'native /s':>12}{'x':>7}")
    print("-" * 86)
    for label, r in results.items():
        print(f"{label:<34}{r['pure_ns']:>10.0f}{_num(r['native_ns'], '.0f'):>11}{r['pure_per_s']:>12,}"
              f"{_num(r['native_per_s'], ',d'):>12}{_num(r['speedup'], '.1f'):>7}")
    print(f"\n{'CESQL matches()':<72}{'pure ns':>9}{'native ns':>10}{'x':>6}")
    print("-" * 97)
    for text, c in cesql.items():
        tag = "" if c["native_program"] else " [closure]"
        print(f"{(text + tag)[:71]:<72}{c['pure_ns']:>9.0f}{_num(c['native_ns'], '.0f'):>10}"
              f"{_num(c['speedup'], '.1f'):>6}")

    headline = results["100 routes"]
    per_s = headline["native_per_s"] or 0
    speedup = headline["speedup"] or 0.0
    met_rate = per_s >= TARGET_DECISIONS_PER_S
    met_speedup = speedup >= TARGET_SPEEDUP
    print(f"\ntarget ≥{TARGET_DECISIONS_PER_S:,} decisions/s (100 routes, residency + scoring): "
          f"{'met' if met_rate else 'MISSED'} ({per_s:,}/s)")
    print(f"target ≥{TARGET_SPEEDUP:.0f}x the pure reference: {'met' if met_speedup else 'MISSED'} ({speedup:.1f}x)")
    elapsed = time.perf_counter() - started

    groups = list(results)
    payload = {
        "benchmark": "router",
        "unit": "ns per decision (best of repeats; medians alongside); decisions per second = 1e9 / ns",
        "events": count,
        "repeats": repeats,
        "native_built": native is not None,
        "native_selected_by_default": accel.ROUTER_NATIVE,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "setup": "3 destinations per route (EU/US/APAC), 2 residency policies (one CESQL), mode best "
                 "(latency 1, cost 0.5, margin 0.1, dwell 5 s) unless 'mixed modes'; filters: prefix, exact, "
                 "all(prefix, exact), CESQL LIKE AND (<> OR EXISTS), a quarter each",
        "target": {"decisions_per_s": TARGET_DECISIONS_PER_S, "speedup_vs_pure": TARGET_SPEEDUP,
                   "headline": "100 routes", "native_per_s": per_s, "speedup": speedup,
                   "met_rate": met_rate, "met_speedup": met_speedup},
        "decisions": results,
        "cesql_ns_per_expression": cesql,
        "elapsed_s": round(elapsed, 1),
    }
    json_path, png_path = write_results(
        "router",
        payload,
        groups=groups,
        series={"pure Python": [results[g]["pure_ns"] for g in groups],
                "Cython": [results[g]["native_ns"] for g in groups]},
        title="Router decision (residency + latency/cost scoring), ns per decision",
        ylabel="ns per decision (log scale, lower is better)",
        log=True,
    )
    print(f"wrote {json_path} and {png_path} in {elapsed:.0f} s")


def _num(value: Any, spec: str) -> str:
    return "—" if value is None else format(value, spec)


if __name__ == "__main__":
    main()
