"""The `umcef` CLI as a user runs it: serve, publish, tail, config check, demo; one-line errors."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.gateway_process import GatewayProcess


def umcef(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "umcef.fabric.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200"})


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = GatewayProcess(Path(tmp_path_factory.mktemp("cli")))
    yield process
    assert process.stop() == 0


def test_publish_from_flags_then_tail_json(served: GatewayProcess) -> None:
    result = umcef("publish", "--url", served.url, "--type", "com.example.order.placed", "--source", "/cli",
                   "--id", "cli-1", "--data", '{"orderId": 1}', "--ext", "partitionkey=o1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "cli-1"
    tail = umcef("tail", "--data-dir", str(served.data_dir), "--from-beginning", "--json", "--no-follow")
    assert tail.returncode == 0, tail.stderr
    events = [orjson.loads(line) for line in tail.stdout.splitlines()]
    mine = [e for e in events if e["id"] == "cli-1"]
    assert mine and mine[0]["data"] == {"orderId": 1} and mine[0]["partitionkey"] == "o1"
    assert mine[0]["specversion"] == "1.0" and "time" in mine[0]


def test_publish_from_jsonl_file(served: GatewayProcess, tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_text("\n".join(orjson.dumps({"type": "t.file", "source": "/f", "id": f"f-{i}"}).decode()
                              for i in range(5)))
    result = umcef("publish", "--url", served.url, "--file", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"f-{i}" for i in range(5)]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["publish", "--type", "t"], "publish needs --type and --source"),
        (["publish", "--type", "t", "--source", "has space"], "source"),
        (["publish", "--type", "t", "--source", "/s", "--ext", "novalue"], "expected NAME=VALUE"),
        (["serve", "--config", "/nonexistent/umcef.yaml"], "cannot read the file"),
        (["tail", "--data-dir", "/nonexistent/store", "--no-follow"], "no UMCEF store"),
        (["config", "check", "/nonexistent.yaml"], "cannot read the file"),
    ],
)
def test_errors_are_one_line_without_traceback(served: GatewayProcess, args: list[str], fragment: str) -> None:
    if args[0] == "publish":
        args = [*args, "--url", served.url]
    result = umcef(*args)
    assert result.returncode != 0
    assert fragment in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_publish_to_a_dead_gateway_fails_cleanly() -> None:
    result = umcef("publish", "--url", "http://127.0.0.1:9", "--type", "t", "--source", "/s", timeout=120)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr and result.stderr.startswith("error:")


def test_config_check(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("destinations: {o: 'local://orders'}\nroutes: [{name: r, to: [o]}]\n")
    result = umcef("config", "check", str(path))
    assert result.returncode == 0 and "1 routes" in result.stdout
    path.write_text("routes: [{name: r, to: [missing]}]\n")
    result = umcef("config", "check", str(path))
    assert result.returncode == 2 and "routes[0].to[0]: unknown destination 'missing'" in result.stderr


def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = umcef("demo", "--data-dir", str(tmp_path), "--customers", "30", timeout=120)
    assert result.returncode == 0, result.stderr + result.stdout
    assert "What landed where" in result.stdout
    assert "→ 422" in result.stdout  # the invalid event was refused with a problem
    counts = umcef("tail", "--data-dir", str(tmp_path), "--topic", "orders", "--from-beginning", "--json",
                   "--no-follow")
    types = {orjson.loads(line)["type"] for line in counts.stdout.splitlines()}
    assert {"com.example.order.placed", "com.example.order.shipped"} <= types
