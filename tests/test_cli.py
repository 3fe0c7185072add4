"""The `umcef` CLI as a user runs it: serve, publish, tail, config check, demo; one-line errors."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from tests.brokers import eventually_sync
from tests.chaos._gateway import ChaosGateway
from tests.gateway_process import GatewayProcess
from tests.test_dlq_cli import unreachable_kafka


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


def test_a_file_larger_than_the_gateways_batch_limit_is_published_in_batches(served: GatewayProcess,
                                                                            tmp_path: Path) -> None:
    # One request for the whole file was refused with 413 past limits.max_batch (1000 by default).
    path = tmp_path / "big.json"
    path.write_bytes(orjson.dumps([{"type": "t.big", "source": "/big", "id": f"b-{i}"} for i in range(2500)]))
    result = umcef("publish", "--url", served.url, "--file", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [f"b-{i}" for i in range(2500)]


def test_tail_prints_one_line_per_event_and_the_events_text_as_it_is(served: GatewayProcess) -> None:
    # Piped, rich wrapped at 80 columns and read "[...]" in an event's own text as markup.
    event_type = "com.example." + "very-long-type-name." * 6 + "[bold]x[/bold]"
    result = umcef("publish", "--url", served.url, "--type", event_type, "--source", "/tail", "--id", "t[1]")
    assert result.returncode == 0, result.stderr
    tail = umcef("tail", "--data-dir", str(served.data_dir), "--from-beginning", "--no-follow")
    assert tail.returncode == 0, tail.stderr
    (line,) = [line for line in tail.stdout.splitlines() if "id=t[1]" in line]
    assert f" {event_type} id=t[1] key=t[1]" in line, tail.stdout


@pytest.fixture
def bad_inputs(tmp_path: Path) -> Path:
    """Files a user may hand the CLI by mistake, in tmp_path (the parameters below say {tmp} for it)."""
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n  \n\n")
    (tmp_path / "none.json").write_text("[]\n")
    (tmp_path / "latin1.jsonl").write_bytes(b'{"type": "t", "source": "/s", "data": "caf\xe9"}\n')
    (tmp_path / "binary.dat").write_bytes(b"\xff\xfe\x00\x01binary")
    (tmp_path / "notsqlite").mkdir()
    (tmp_path / "notsqlite" / "events.db").write_text("not a database, just text\n" * 100)
    (tmp_path / "otherapp").mkdir()
    other = sqlite3.connect(tmp_path / "otherapp" / "events.db")
    other.execute("PRAGMA application_id = 42")
    other.execute("CREATE TABLE theirs (x)")
    other.commit()
    other.close()
    return tmp_path


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["publish", "--type", "t"], ["publish needs --type and --source"]),
        (["publish", "--type", "t", "--source", "has space"], ["source"]),  # refused by the SDK: exit 1
        (["publish", "--type", "t", "--source", "/s", "--ext", "novalue"], ["expected NAME=VALUE"]),
        (["serve", "--config", "/nonexistent/umcef.yaml"], ["cannot read the file"]),
        (["tail", "--data-dir", "/nonexistent/store", "--no-follow"], ["no UMCEF store"]),
        (["config", "check", "/nonexistent.yaml"], ["cannot read the file"]),
        # a gateway URL of no scheme the CLI speaks
        (["publish", "--url", "ftp://127.0.0.1:1", "--type", "t", "--source", "/s"],
         ["ftp://127.0.0.1:1", "http://", "https://", "grpc://"]),
        (["publish", "--url", "notaurl", "--type", "t", "--source", "/s"], ["notaurl", "http://", "grpc://"]),
        (["publish", "--url", "http://", "--type", "t", "--source", "/s"], ["http://"]),
        (["publish", "--url", "grpc://", "--type", "t", "--source", "/s"], ["grpc://"]),
        # a file of no events
        (["publish", "-f", "{tmp}/empty.json"], ["{tmp}/empty.json", "no events"]),
        (["publish", "-f", "{tmp}/blank.jsonl"], ["{tmp}/blank.jsonl", "no events"]),
        (["publish", "-f", "{tmp}/none.json"], ["{tmp}/none.json", "no events"]),
        # files that are not UTF-8
        (["publish", "-f", "{tmp}/latin1.jsonl"], ["{tmp}/latin1.jsonl", "UTF-8"]),
        (["publish", "--type", "t", "--source", "/s", "--data", "@{tmp}/binary.dat"], ["{tmp}/binary.dat", "UTF-8"]),
        # an empty id is no CloudEvent id
        (["publish", "--type", "t", "--source", "/s", "--id", ""], ["--id", "empty"]),
        # an events.db that is no UMCEF store: the store's own message
        (["serve", "--data-dir", "{tmp}/notsqlite", "--port", "0", "--grpc-port", "0"],
         ["{tmp}/notsqlite/events.db", "not a usable UMCEF local store"]),
        (["serve", "--data-dir", "{tmp}/otherapp", "--port", "0", "--grpc-port", "0"],
         ["{tmp}/otherapp/events.db", "another application"]),
        (["spool", "list", "--data-dir", "{tmp}/notsqlite"], ["{tmp}/notsqlite/events.db", "not a usable"]),
        (["spool", "list", "--data-dir", "{tmp}/otherapp"], ["{tmp}/otherapp/events.db", "another application"]),
        (["dlq", "list", "--data-dir", "{tmp}/notsqlite"], ["{tmp}/notsqlite/events.db", "not a usable"]),
        (["dlq", "list", "--data-dir", "{tmp}/otherapp"], ["{tmp}/otherapp/events.db", "another application"]),
        (["dlq", "replay", "--all", "--data-dir", "{tmp}/otherapp"], ["{tmp}/otherapp/events.db", "another"]),
        (["tail", "--data-dir", "{tmp}/notsqlite", "--no-follow"], ["{tmp}/notsqlite/events.db", "not a usable"]),
    ],
)
def test_errors_are_one_line_without_traceback(served: GatewayProcess, bad_inputs: Path, args: list[str],
                                               fragments: list[str]) -> None:
    tmp = str(bad_inputs.resolve())
    args = [arg.replace("{tmp}", tmp) for arg in args]
    if args[0] == "publish" and "--url" not in args:
        args = [*args, "--url", served.url]
    result = umcef(*args)
    assert result.returncode == (1 if "has space" in args else 2), result.stderr  # 2: a user error the CLI saw
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment.replace("{tmp}", tmp) in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_serve_banner_is_one_line_when_stderr_is_a_pipe(tmp_path: Path) -> None:
    # Not a terminal: rich would wrap at 80 columns and split the banner (log grepping, tests' regexes).
    data_dir = tmp_path / ("a-long-directory-name-" * 5) / "store"
    process = GatewayProcess(data_dir, env={"COLUMNS": "80"})
    try:
        banner = process.startup_log.splitlines()[-1]
        assert banner.startswith("umcef: HTTP on http://") and banner.endswith(f"; store {data_dir}"), \
            process.startup_log
    finally:
        assert process.stop() == 0


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


def test_a_signal_during_start_up_still_stops_the_gateway_gracefully(tmp_path: Path) -> None:
    # A supervisor may signal a gateway at any moment, also while it starts or just after it said it listens:
    # the handler must be in place before either, or SIGTERM kills the process (-15) without its graceful stop.
    # Deterministic: delivery in its own process makes start-up wait for a spawned child interpreter, and the
    # signal comes while it does.
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path / 'gw'}\ndestinations:\n  flaky: {unreachable_kafka('t')}}}\n"
                      "default: flaky\ndelivery: {process: true}\n")
    proc = subprocess.Popen([sys.executable, "-m", "umcef.fabric.cli", "serve", "--config", str(config), "--port",
                             "0", "--grpc-port", "0"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children")
        deadline = time.monotonic() + 30
        while not children.read_text().split():
            assert time.monotonic() < deadline and proc.poll() is None, "the delivery process was never started"
            time.sleep(0.005)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "umcef: HTTP on http://" in stderr, stderr  # it finished starting, then stopped


def test_sampled_router_decisions_reach_the_log_of_umcef_serve(tmp_path: Path) -> None:
    # They are INFO records and the gateway logs warnings and up: before, explain_sample_every wrote nothing.
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path / 'gw'}\nrouter: {{explain_sample_every: 1}}\n")
    gateway = ChaosGateway(tmp_path / "gw", config)
    try:
        result = umcef("publish", "--url", gateway.url, "--type", "t", "--source", "/s", "--id", "sampled-1")
        assert result.returncode == 0, result.stderr
        eventually_sync(lambda: '"id":"sampled-1"' in gateway.tail(), 15, "the decision record", poll=0.05)
        assert "INFO umcef.router.decisions[" in gateway.tail(), gateway.tail()
    finally:
        assert gateway.stop() == 0
