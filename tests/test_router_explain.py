"""`umcef route explain` as an operator runs it: text and --json, what-if RTTs and outages, clean errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

CONFIG = """
destinations:
  eu-kafka: {url: "kafka://127.0.0.1:9092/orders", cloud: onprem, region: eu-central-1, jurisdiction: EU, egress_usd_per_gb: 0.02, usd_per_million: 0}
  us-sqs:   {url: "sqs://orders?region=us-east-1", cloud: aws, region: us-east-1, jurisdiction: US, egress_usd_per_gb: 0.09, usd_per_million: 0.40}
residency:
  - when: {exact: {dataregulation: GDPR}}
    allow: [EU]
routes:
  - name: orders
    filter: {prefix: {type: "com.example.order."}}
    to: [eu-kafka, us-sqs]
    mode: best
    weights: {latency: 1.0, cost: 0.2}
  - name: audit
    filter: {sql: "subject LIKE 'audit/%'"}
    to: [eu-kafka]
"""  # noqa: E501


def umcef(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "umcef.fabric.cli", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Path]:
    config = tmp_path / "umcef.yaml"
    config.write_text(CONFIG)
    plain = tmp_path / "plain.json"
    plain.write_bytes(orjson.dumps({"type": "com.example.order.placed", "source": "/shop", "data": {"id": 1}}))
    gdpr = tmp_path / "gdpr.json"
    gdpr.write_bytes(orjson.dumps({"specversion": "1.0", "id": "g1", "type": "com.example.order.placed",
                                   "source": "/shop", "dataregulation": "GDPR"}))
    return config, plain, gdpr


def explain_json(*args: str) -> dict[str, object]:
    result = umcef("route", "explain", "--json", *args)
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1
    out: dict[str, object] = orjson.loads(result.stdout)
    return out


def test_json_shape_is_exactly_the_issues(files: tuple[Path, Path, Path]) -> None:
    config, plain, _gdpr = files
    out = explain_json("--config", str(config), "--assume-rtt", "us-sqs=5", "--assume-rtt", "eu-kafka=40", str(plain))
    assert list(out) == ["route", "destinations", "candidates"]
    assert out["route"] == "orders" and out["destinations"] == ["us-sqs"]
    candidates = out["candidates"]
    assert isinstance(candidates, list)
    for c in candidates:
        assert list(c) == ["destination", "score", "excluded"]
        assert isinstance(c["score"], float) and c["excluded"] is None
    assert [c["destination"] for c in candidates] == ["eu-kafka", "us-sqs"]


def test_what_if_us_sqs_were_down(files: tuple[Path, Path, Path]) -> None:
    config, plain, _gdpr = files
    out = explain_json("--config", str(config), "--assume-rtt", "us-sqs=5", "--assume-down", "us-sqs", str(plain))
    assert out["destinations"] == ["eu-kafka"]
    assert out["candidates"] == [
        {"destination": "eu-kafka", "score": 1.2, "excluded": None},
        {"destination": "us-sqs", "score": None, "excluded": "down (ejected: assumed down)"}]


def test_residency_and_everything_allowed_down(files: tuple[Path, Path, Path]) -> None:
    config, _plain, gdpr = files
    out = explain_json("--config", str(config), "--assume-rtt", "us-sqs=1", str(gdpr))
    assert out["destinations"] == ["eu-kafka"]
    assert out["candidates"][1] == {"destination": "us-sqs", "score": None,  # type: ignore[index]
                                    "excluded": "residency: US not allowed"}
    down = explain_json("--config", str(config), "--assume-down", "eu-kafka", str(gdpr))
    # every allowed destination down: the route holds the event for eu-kafka (it waits in its spool)
    assert down["destinations"] == ["eu-kafka"] and all(c["score"] is None for c in down["candidates"])  # type: ignore[attr-defined]
    assert down["held"] == ("route 'orders': holding for eu-kafka: every destination residency allows is unavailable "
                            "(eu-kafka: down (ejected: assumed down); us-sqs: residency: US not allowed)")
    text = umcef("route", "explain", "--config", str(config), "--assume-down", "eu-kafka", str(gdpr))
    assert text.returncode == 0, text.stderr
    assert text.stdout.splitlines() == [
        "route orders (mode best) -> eu-kafka (holding)",
        "  residency: EU (residency[0])",
        "  * eu-kafka  excluded: down (ejected: assumed down)",
        "    us-sqs    excluded: residency: US not allowed",
        "  held: " + str(down["held"]),
        "destinations: eu-kafka (held: spooled there, waits until an allowed destination is healthy)",
    ]


def test_no_route_and_several_routes(files: tuple[Path, Path, Path], tmp_path: Path) -> None:
    config, _plain, _gdpr = files
    other = tmp_path / "other.json"
    other.write_bytes(orjson.dumps({"type": "com.example.customer.created", "source": "/crm"}))
    out = explain_json("--config", str(config), str(other))
    assert out == {"route": None, "destinations": ["default"],
                   "candidates": [{"destination": "default", "score": 0.0, "excluded": None}]}
    both = tmp_path / "both.json"
    both.write_bytes(orjson.dumps({"type": "com.example.order.placed", "source": "/s", "subject": "audit/1"}))
    out = explain_json("--config", str(config), "--assume-rtt", "eu-kafka=1", str(both))
    assert out["route"] == "orders" and out["destinations"] == ["eu-kafka"]
    assert [r["route"] for r in out["routes"]] == ["orders", "audit"]  # type: ignore[attr-defined]


def test_text_output(files: tuple[Path, Path, Path]) -> None:
    config, _plain, gdpr = files
    result = umcef("route", "explain", "--config", str(config), str(gdpr))
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [
        "route orders (mode best) -> eu-kafka",
        "  residency: EU (residency[0])",
        "  * eu-kafka  score 1.2000",
        "    us-sqs    excluded: residency: US not allowed",
        "destinations: eu-kafka",
    ]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--assume-rtt", "nope=3"],
         "--assume-rtt nope: unknown destination 'nope' (known: default, eu-kafka, us-sqs)"),
        (["--assume-rtt", "us-sqs"], "--assume-rtt 'us-sqs': expected DEST=MS"),
        (["--assume-rtt", "us-sqs=fast"], "'fast' is not a number of milliseconds"),
        (["--assume-rtt", "us-sqs=-1"], "expected a finite number of milliseconds >= 0"),
        (["--assume-down", "nope"], "--assume-down nope: unknown destination 'nope'"),
        (["EVENT:missing"], "cannot read the event"),
        (["EVENT:{nope"], "is not valid JSON"),
        (["EVENT:[1]"], "expected one CloudEvent as a JSON object"),
        (["EVENT:{\"type\": \"t\"}"], "not a valid CloudEvent: attribute 'source': is required"),
        (["CONFIG:routes: [{name: r, to: [x]}]"], "routes[0].to[0]: unknown destination 'x'"),
        (["CONFIG:routes: [{name: r, to: [default], filter: {sql: \"a = \"}}]"],
         "routes[0].filter.sql: CESQL syntax error at position 4"),
    ],
)
def test_bad_input_is_one_line_without_traceback(files: tuple[Path, Path, Path], tmp_path: Path, args: list[str],
                                                 fragment: str) -> None:
    config, plain, _gdpr = files
    event_path = str(plain)
    flags: list[str] = []
    for arg in args:
        if arg.startswith("EVENT:"):
            event_path = str(tmp_path / "event.json")
            if arg != "EVENT:missing":
                Path(event_path).write_text(arg[len("EVENT:"):])
        elif arg.startswith("CONFIG:"):
            config = tmp_path / "bad.yaml"
            config.write_text(arg[len("CONFIG:"):])
        else:
            flags.append(arg)
    result = umcef("route", "explain", "--config", str(config), *flags, event_path)
    assert result.returncode == 2, result
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert result.stderr.startswith("error: ") and fragment in result.stderr, result.stderr


def test_missing_arguments_are_usage_errors(files: tuple[Path, Path, Path]) -> None:
    config, _plain, _gdpr = files
    result = umcef("route", "explain", "--config", str(config))
    assert result.returncode == 2 and "Traceback" not in result.stderr and "EVENT" in result.stderr
