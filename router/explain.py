"""`umcef route explain`: where would this event go, and why — a dry run against a configuration, with
what-if RTTs and outages.

    umcef route explain --config FILE [--assume-rtt DEST=MS ...] [--assume-down DEST ...] [--json] EVENT.json

Destinations without an assumed RTT get the estimator's prior (`router.estimator.initial_rtt_ms`;
`local://` ones 0 ms); none is down unless assumed. `--json` prints one object:

    {"route": name|null, "destinations": [names], "candidates": [{"destination", "score", "excluded"}]}

for the first matching route (null: no route matched, the default destination), with `destinations`
being the whole decision's; when several routes match, `routes` lists that object for each of them.
A route that holds the event (residency allows some of its destinations, but none of them is healthy
within `max_rtt_ms`: the event is spooled for an allowed one and waits) adds `"held": "<why>"`; the
text output marks it `(holding)` with a `held:` line.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

import orjson

from umcef.fabric.event import Event, fill_defaults
from umcef.fabric.formats import json_format
from umcef.router.decide import Decision, Router, explain_object
from umcef.router.estimator import Estimator
from umcef.router.model import RoutingConfig
from umcef.router.table import compile_table


class ExplainError(ValueError):
    """Bad input to `route explain`: printed as one line."""


def parse_assumed_rtts(items: Iterable[str], known: Iterable[str]) -> dict[str, float]:
    names = set(known)
    out: dict[str, float] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ExplainError(f"--assume-rtt {item!r}: expected DEST=MS")
        _known(name, names, "--assume-rtt")
        try:
            ms = float(value)
        except ValueError:
            raise ExplainError(f"--assume-rtt {item!r}: {value!r} is not a number of milliseconds") from None
        if not ms >= 0 or ms == float("inf"):
            raise ExplainError(f"--assume-rtt {item!r}: expected a finite number of milliseconds >= 0")
        out[name] = ms
    return out


def _known(name: str, names: set[str], flag: str) -> None:
    if name not in names:
        raise ExplainError(f"{flag} {name}: unknown destination {name!r} (known: {', '.join(sorted(names))})")


def load_event(path: Path) -> Event:
    """A structured-mode JSON CloudEvent; `specversion` and `id` may be left out."""
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ExplainError(f"{path}: cannot read the event: {exc.strerror or exc}") from None
    try:
        obj = json_format.loads(raw)
    except ValueError as exc:
        raise ExplainError(f"{path}: {exc}") from None
    if not isinstance(obj, dict):
        raise ExplainError(f"{path}: expected one CloudEvent as a JSON object")
    data = {k: obj.pop(k) for k in ("data", "data_base64") if k in obj}
    fill_defaults(obj)
    try:
        return json_format.event_from_dict({**obj, **data})
    except ValueError as exc:
        raise ExplainError(f"{path}: not a valid CloudEvent: {exc}") from None


def explain(routing: RoutingConfig, event: Event, assume_rtt: Mapping[str, float] | None = None,
            assume_down: Iterable[str] = ()) -> Decision:
    estimator = Estimator(routing.estimator)
    names = {d.name for d in routing.destinations}
    for dest in routing.destinations:
        if dest.is_local:
            estimator.pin(dest.name, 0.0)
    for name, ms in (assume_rtt or {}).items():
        _known(name, names, "--assume-rtt")
        estimator.assume_rtt(name, ms)
    for name in assume_down:
        _known(name, names, "--assume-down")
        estimator.assume_down(name)
    router = Router(compile_table(routing, estimator.slot), estimator)
    return router.decide(event, explain=True, now=0.0)


def render_json(decision: Decision) -> str:
    return orjson.dumps(explain_object(decision)).decode()


def render_text(decision: Decision) -> str:
    lines: list[str] = []
    for rec in decision.explain or ():
        title = f"route {rec.route}" if rec.route is not None else "no route matched: default destination"
        holding = " (holding)" if rec.held is not None else ""
        lines.append(f"{title} (mode {rec.mode}) -> {', '.join(rec.destinations) or 'nothing'}{holding}")
        if rec.allowed is not None:
            lines.append(f"  residency: {', '.join(j for j in rec.allowed if j) or 'no jurisdiction'} "
                         f"({', '.join(rec.policies) or 'unmatched events are denied'})")
        width = max((len(c.destination) for c in rec.candidates), default=0)
        for c in rec.candidates:
            mark = "*" if c.destination in rec.destinations else " "
            state = f"excluded: {c.excluded}" if c.excluded is not None else f"score {c.score:.4f}"
            lines.append(f"  {mark} {c.destination:<{width}}  {state}")
        if rec.reason:
            lines.append(f"  dead-letter: {rec.reason}")
        if rec.held is not None:
            lines.append(f"  held: {rec.held}")
    held = " (held: spooled there, waits until an allowed destination is healthy)" if decision.held else ""
    lines.append(f"destinations: {', '.join(decision.destinations) or 'none (dead-letter)'}{held}")
    return "\n".join(lines)
