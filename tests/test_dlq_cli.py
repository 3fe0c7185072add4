"""`umcef dlq list` / `umcef dlq replay`, run as a user runs them: a subprocess on a gateway's data dir."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import httpx
import orjson
import pytest

from tests.brokers import KafkaBroker, closed_port, eventually_sync, unique_name
from tests.conformance.target_kafka import create_topic
from tests.gateway_process import GatewayProcess
from tests.test_failover import UNREACHABLE_OPTIONS, kafka_ids
from umcef.adapters.local import LocalStore
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC, DeadLetterQueue
from umcef.fabric.delivery import CURSOR_GROUP, spool_topic
from umcef.fabric.dlq import REPLAYED_TOPIC
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.pipeline import dead_letter_copy


def umcef(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "umcef.fabric.cli", *args], capture_output=True, text=True,
                          timeout=60)


def event(event_id: str, **ext: str) -> Event:
    return Event({"specversion": "1.0", "id": event_id, "source": "/orders", "type": "order.created", **ext},
                 {"n": event_id})


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    """A stopped gateway's store with four dead letters: two from kafka-eu, one from sqs, one from the router."""
    store = LocalStore(tmp_path)
    dlq = DeadLetterQueue(store)

    async def fill() -> None:
        await dlq.put(event("a", partitionkey="k1"), "Rejected: too big", destination="kafka-eu", attempts=1)
        await dlq.put(event("b"), "Transient: broker down", destination="kafka-eu", attempts=12)
        await dlq.put(event("c"), "Unauthorized: denied", destination="sqs", attempts=3)
        copy = dead_letter_copy(event("d"), "residency: no allowed destination")
        await dlq.put_raw(json_format.encode(copy), "d", "router")

    asyncio.run(fill())
    store.close()
    return tmp_path


def read(data_dir: Path, topic: str) -> list[dict[str, object]]:
    store = LocalStore(data_dir, read_only=True)
    try:
        return [orjson.loads(s.payload) for s in store.read(topic, 0, 1000)]
    finally:
        store.close()


def cursor(data_dir: Path, topic: str) -> int:
    store = LocalStore(data_dir, read_only=True)
    try:
        return int(store.cursor(CURSOR_GROUP, topic))
    finally:
        store.close()


def listed(data_dir: Path, *extra: str) -> list[dict[str, object]]:
    result = umcef("dlq", "list", "--data-dir", str(data_dir), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def test_list_shows_id_type_destination_reason_attempts(data_dir: Path) -> None:
    result = umcef("dlq", "list", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[1].split("\t")[1:] == ["_deadletter", "b", "order.created", "kafka-eu", "attempts=12",
                                        "Transient: broker down"]
    assert "_deadletter: 4 dead letters pending (local topic _deadletter)" in result.stderr
    rows = listed(data_dir, "--destination", "kafka-eu")
    assert [(r["id"], r["type"], r["destination"], r["reason"], r["attempts"]) for r in rows] == [
        ("a", "order.created", "kafka-eu", "Rejected: too big", 1),
        ("b", "order.created", "kafka-eu", "Transient: broker down", 12),
    ]


def test_replay_spools_without_dlq_extensions_and_never_twice(data_dir: Path) -> None:
    result = umcef("dlq", "replay", "--data-dir", str(data_dir), "--id", "a")
    assert result.returncode == 0, result.stderr
    assert "-> _spool.kafka-eu" in result.stdout
    (spooled,) = read(data_dir, spool_topic("kafka-eu"))
    assert not any(k in spooled for k in ("fabricreason", "fabricdest", "fabricattempts"))
    assert (spooled["id"], spooled["partitionkey"], spooled["data"]) == ("a", "k1", {"n": "a"})
    assert json_format.decode(orjson.dumps(spooled)).id == "a"  # the delivery worker can decode it
    assert [r["id"] for r in listed(data_dir)] == ["b", "c", "d"]

    again = umcef("dlq", "replay", "--data-dir", str(data_dir), "--id", "a")
    assert again.returncode == 2
    assert again.stderr.strip() == "error: no pending dead letter with id a"
    assert len(read(data_dir, spool_topic("kafka-eu"))) == 1
    assert len(read(data_dir, DEAD_LETTER_TOPIC)) == 4  # the DLQ keeps its history; the marker hides it
    assert [m["id"] for m in read(data_dir, REPLAYED_TOPIC)] == ["a"]


def test_replay_all_refuses_router_dead_letters_without_to_and_writes_nothing(data_dir: Path) -> None:
    result = umcef("dlq", "replay", "--data-dir", str(data_dir), "--all")
    assert result.returncode == 2
    assert "refused by the router and has no destination; replay it with --to DEST" in result.stderr
    assert "Traceback" not in result.stderr
    assert read(data_dir, REPLAYED_TOPIC) == [] and read(data_dir, spool_topic("kafka-eu")) == []

    ok = umcef("dlq", "replay", "--data-dir", str(data_dir), "--all", "--destination", "kafka-eu")
    assert ok.returncode == 0, ok.stderr
    assert [e["id"] for e in read(data_dir, spool_topic("kafka-eu"))] == ["a", "b"]
    moved = umcef("dlq", "replay", "--data-dir", str(data_dir), "--id", "d", "--to", "local://rescued")
    assert moved.returncode == 0, moved.stderr
    assert [e["id"] for e in read(data_dir, "rescued")] == ["d"]
    assert [r["id"] for r in listed(data_dir)] == ["c"]


def test_replay_resolves_local_destinations_through_the_config(data_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("destinations:\n  archive: local://archive-topic\n  sqs: sqs://queue\n")
    result = umcef("dlq", "replay", "--data-dir", str(data_dir), "--id", "c", "--to", "archive",
                   "--config", str(config))
    assert result.returncode == 0, result.stderr
    assert [e["id"] for e in read(data_dir, "archive-topic")] == ["c"]
    unknown = umcef("dlq", "replay", "--data-dir", str(data_dir), "--all", "--to", "nowhere",
                    "--config", str(config))
    assert unknown.returncode == 2 and unknown.stderr.strip() == f"error: destination 'nowhere' is not in {config}"


def test_errors_are_one_line(tmp_path: Path) -> None:
    missing = umcef("dlq", "list", "--data-dir", str(tmp_path / "nope"))
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("error: no UMCEF store in")
    assert len(missing.stderr.strip().splitlines()) == 1
    LocalStore(tmp_path).close()
    neither = umcef("dlq", "replay", "--data-dir", str(tmp_path))
    assert neither.returncode == 2 and neither.stderr.strip() == "error: replay needs --id ID (repeatable) or --all"


def test_replay_into_a_running_gateways_store(tmp_path: Path) -> None:
    data_dir = tmp_path / "live"
    gateway = GatewayProcess(data_dir)  # holds the store open as its writer
    try:
        async def put() -> None:
            live = LocalStore(data_dir)  # a second writer, as the gateway's delivery worker would be
            await DeadLetterQueue(live).put(event("x"), "Rejected: no", destination="kafka-eu", attempts=1)
            live.close()

        asyncio.run(put())
        result = umcef("dlq", "replay", "--data-dir", str(data_dir), "--all", "--to", "local://back")
        assert result.returncode == 0, result.stderr
        assert [e["id"] for e in read(data_dir, "back")] == ["x"]
        assert listed(data_dir) == []
    finally:
        assert gateway.stop() == 0


# -- dead-letter destinations from the configuration (`delivery.dead_letter`) ---------------------------------

PHI_REFUSED = "residency:\n  - {when: {exact: {datacategory: phi}}, allow: []}\n"  # the router dead-letters these
NEVER_EJECT = "router: {estimator: {eject_after_failures: 1000}}\n"


def unreachable_kafka(topic: str) -> str:
    options = orjson.dumps(UNREACHABLE_OPTIONS).decode()
    return f'{{url: "kafka://127.0.0.1:{closed_port()}/{topic}", options: {options}'


def post(gateway: GatewayProcess, events: list[dict[str, object]]) -> None:
    response = httpx.post(gateway.url + "/v1/events", content=orjson.dumps(events),
                          headers={"content-type": "application/cloudevents-batch+json"}, timeout=30)
    assert response.status_code == 202, response.text


def order(event_id: str, **ext: str) -> dict[str, object]:
    return {"specversion": "1.0", "id": event_id, "source": "/shop", "type": "order.created", "data": {"n": event_id},
            **ext}


def ids(rows: list[dict[str, object]]) -> list[str]:
    return [str(r["id"]) for r in rows]


def test_local_dead_letter_destination_list_and_replay_end_to_end(tmp_path: Path) -> None:
    data_dir = tmp_path / "gw"
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {data_dir}\n"
        "destinations:\n"
        f"  flaky: {unreachable_kafka('t')}, delivery: {{max_attempts: 1}}}}\n"
        "  parking: local://parking\n"
        "  orders: local://orders\n"
        "delivery: {dead_letter: parking, backoff_base_seconds: 0.05, backoff_cap_seconds: 0.2}\n"
        "routes:\n"
        "  - {name: flaky, filter: {exact: {subject: flaky}}, to: [flaky]}\n"
        "  - {name: archive, filter: {exact: {subject: archive}}, to: [parking]}\n"  # parking is a destination too
        + PHI_REFUSED + NEVER_EJECT)
    gateway = GatewayProcess(data_dir, "--config", str(config))
    try:
        post(gateway, [order("f1", subject="flaky"), order("p1", datacategory="phi"), order("a1", subject="archive"),
                       order("ok")])
        # Polled at 0.05 s: every probe opens the store (or runs the CLI) beside the running gateway.
        eventually_sync(lambda: "f1" in ids(read(data_dir, "parking")), 30, "f1 dead-lettered to parking", poll=0.05)
        assert read(data_dir, DEAD_LETTER_TOPIC) == []

        # data_dir comes from the config; the archived event in the same topic is not a dead letter.
        result = umcef("dlq", "list", "--config", str(config))
        assert result.returncode == 0, result.stderr
        rows = [line.split("\t") for line in result.stdout.splitlines()]
        assert sorted((r[1], r[2], r[4], r[5]) for r in rows) == [
            ("parking", "f1", "flaky", "attempts=1"), ("parking", "p1", "(router)", "attempts=0")]
        assert "parking: 2 dead letters pending (local://parking, local topic parking)" in result.stderr
        assert "_deadletter: 0 dead letters pending" in result.stderr
        only = umcef("dlq", "list", "--config", str(config), "--dlq", "_deadletter", "--json")
        assert only.returncode == 0 and only.stdout == "", only.stderr
        (p1,) = [r for r in listed(data_dir, "--config", str(config)) if r["id"] == "p1"]
        assert (p1["dlq"], p1["topic"], p1["url"], p1["replayable"]) == ("parking", "parking", "local://parking", True)

        # A router refusal to another local destination: delivered by the replay's own write.
        to_orders = umcef("dlq", "replay", "--config", str(config), "--id", "p1", "--to", "orders")
        assert to_orders.returncode == 0, to_orders.stderr
        assert to_orders.stdout.strip() == f"#{p1['seq']}\tparking\tp1\t-> orders"
        (delivered,) = [e for e in read(data_dir, "orders") if e["id"] == "p1"]
        assert "fabricreason" not in delivered and delivered["datacategory"] == "phi"

        # Back into flaky's spool: the running gateway's worker takes it, fails again, dead-letters it anew.
        (f1,) = [r for r in listed(data_dir, "--config", str(config)) if r["id"] == "f1"]
        again = umcef("dlq", "replay", "--config", str(config), "--dlq", "parking", "--id", "f1")
        assert again.returncode == 0, again.stderr
        assert again.stdout.strip() == f"#{f1['seq']}\tparking\tf1\t-> _spool.flaky"
        eventually_sync(lambda: [r["seq"] for r in listed(data_dir, "--config", str(config)) if r["id"] == "f1"]
                        not in ([], [f1["seq"]]), 30, "f1 re-delivered and dead-lettered again", poll=0.05)
        (fresh,) = [r for r in listed(data_dir, "--config", str(config)) if r["id"] == "f1"]
        assert int(str(fresh["seq"])) > int(str(f1["seq"])) and fresh["destination"] == "flaky"

        # Never twice: the markers are in parking.replayed, not in _deadletter.replayed.
        twice = umcef("dlq", "replay", "--config", str(config), "--id", "p1", "--to", "orders")
        assert twice.returncode == 2 and twice.stderr.strip() == "error: no pending dead letter with id p1"
        assert ids(read(data_dir, "orders")) == ["p1"]
        assert sorted(ids(read(data_dir, "parking.replayed"))) == ["f1", "p1"]
        assert read(data_dir, REPLAYED_TOPIC) == []
    finally:
        assert gateway.stop() == 0


def test_remote_dead_letter_destinations_list_their_spool_and_refuse_replay(
        tmp_path: Path, kafka_broker: KafkaBroker) -> None:
    topic = unique_name("dlq-up")
    asyncio.run(create_topic(kafka_broker.bootstrap, topic, partitions=1))
    data_dir = tmp_path / "gw"
    config = tmp_path / "gw.yaml"
    config.write_text(
        "destinations:\n"
        f"  flaky-up: {unreachable_kafka('t')}, delivery: {{max_attempts: 1, dead_letter: dlq-up}}}}\n"
        f"  flaky-down: {unreachable_kafka('t')}, delivery: {{max_attempts: 1, dead_letter: dlq-down}}}}\n"
        f"  dlq-up: kafka://{kafka_broker.bootstrap}/{topic}\n"  # a broker that takes the dead letters
        f"  dlq-down: {unreachable_kafka('dlq')}}}\n"  # one that does not: they wait in its spool
        "delivery: {backoff_base_seconds: 0.05, backoff_cap_seconds: 0.2}\n"
        "routes:\n"
        "  - {name: up, filter: {exact: {subject: up}}, to: [flaky-up]}\n"
        "  - {name: down, filter: {exact: {subject: down}}, to: [flaky-down]}\n"
        "  - {name: direct, filter: {exact: {subject: direct}}, to: [dlq-down]}\n"  # an event, not a dead letter
        + NEVER_EJECT)
    gateway = GatewayProcess(data_dir, "--config", str(config))
    try:
        post(gateway, [order("u1", subject="up"), order("n1", subject="direct"), order("d1", subject="down"),
                       order("d2", subject="down")])
        assert asyncio.run(kafka_ids(kafka_broker.bootstrap, topic, {"u1"})) == {"u1"}
        # Polled at 0.05 s: every probe opens the store beside the running gateway.
        eventually_sync(lambda: cursor(data_dir, spool_topic("dlq-up")) > 0, 30, "the dlq-up cursor past u1", poll=0.05)
        eventually_sync(lambda: {"d1", "d2"} <= set(ids(read(data_dir, spool_topic("dlq-down")))), 30,
                        "d1, d2 dead-lettered", poll=0.05)
    finally:
        assert gateway.stop() == 0

    result = umcef("dlq", "list", "--config", str(config), "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    rows = [line.split("\t") for line in result.stdout.splitlines()]
    assert [(r[1], r[2], r[4], r[5]) for r in rows] == [("dlq-down", "d1", "flaky-down", "attempts=1"),
                                                         ("dlq-down", "d2", "flaky-down", "attempts=1")]
    assert "dlq-up: 0 dead letters waiting in spool _spool.dlq-up for kafka://" in result.stderr
    assert any(line.startswith("dlq-down: 2 dead letters waiting in spool _spool.dlq-down for kafka://127.0.0.1:")
               and line.endswith("those already delivered are in the broker, not listed here (read them there)")
               for line in result.stderr.splitlines()), result.stderr
    (d1, _d2) = listed(data_dir, "--config", str(config), "--dlq", "dlq-down")
    assert (d1["topic"], d1["replayable"]) == ("_spool.dlq-down", False)
    assert str(d1["url"]).startswith("kafka://127.0.0.1:") and str(d1["url"]).endswith("/dlq")

    named = umcef("dlq", "replay", "--config", str(config), "--data-dir", str(data_dir), "--dlq", "dlq-up", "--all")
    assert named.returncode == 2 and len(named.stderr.strip().splitlines()) == 1
    assert named.stderr.strip() == (f"error: dlq-up is a remote dead-letter destination (kafka://"
                                    f"{kafka_broker.bootstrap}/{topic}): its dead letters are delivered to that "
                                    "broker, so replay them from the broker; umcef dlq replay only re-drives local "
                                    "dead-letter topics")
    by_id = umcef("dlq", "replay", "--config", str(config), "--data-dir", str(data_dir), "--id", "d1")
    assert by_id.returncode == 2
    assert by_id.stderr.startswith("error: dead letter d1 is waiting in the spool of dlq-down, not replayable: ")
    delivered = umcef("dlq", "replay", "--config", str(config), "--data-dir", str(data_dir), "--id", "u1")
    assert delivered.returncode == 2
    assert delivered.stderr.strip() == ("error: no pending dead letter with id u1 (dead letters already delivered to "
                                        "dlq-down, dlq-up are in their brokers)")
    everything = umcef("dlq", "replay", "--config", str(config), "--data-dir", str(data_dir), "--all")
    assert everything.returncode == 0, everything.stderr
    assert everything.stdout == ""
    assert "dlq-down: 2 dead letters waiting in spool _spool.dlq-down not replayed" in everything.stderr
    assert read(data_dir, "_spool.dlq-down.replayed") == [] and read(data_dir, REPLAYED_TOPIC) == []
    assert ids(read(data_dir, spool_topic("dlq-down"))) == ["n1", "d1", "d2"]  # nothing written


def test_dlq_selection_and_config_errors_are_one_line(data_dir: Path, tmp_path: Path) -> None:
    bare = umcef("dlq", "list", "--data-dir", str(data_dir), "--dlq", "parking")
    assert bare.returncode == 2
    assert bare.stderr.strip() == ("error: --dlq 'parking': without --config the only dead-letter queue is "
                                   "_deadletter; give --config FILE to use the gateway's dead-letter destinations")
    config = tmp_path / "gw.yaml"
    config.write_text("destinations:\n  parking: local://parking\n  orders: local://orders\n"
                      "delivery: {dead_letter: parking}\n")
    wrong = umcef("dlq", "replay", "--config", str(config), "--data-dir", str(data_dir), "--dlq", "orders", "--all")
    assert wrong.returncode == 2
    assert wrong.stderr.strip() == (f"error: --dlq 'orders' is not a dead-letter destination in {config} "
                                    "(dead-letter destinations: _deadletter, parking)")
    missing = umcef("dlq", "list", "--config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 2
    assert missing.stderr.strip() == f"error: {tmp_path / 'nope.yaml'}: cannot read the file: No such file or directory"
    broken = tmp_path / "broken.yaml"
    broken.write_text("delivery: {dead_letter: nowhere}\n")
    bad = umcef("dlq", "list", "--config", str(broken), "--data-dir", str(data_dir))
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert bad.stderr.startswith(f"error: {broken}: delivery.dead_letter: expected _deadletter or a configured")
    # The config's data_dir is used when --data-dir is not given, and named in the error.
    elsewhere = tmp_path / "cfg-data"
    config.write_text(f"data_dir: {elsewhere}\n" + config.read_text())
    nodir = umcef("dlq", "list", "--config", str(config))
    assert nodir.returncode == 2 and nodir.stderr.strip().startswith(f"error: no UMCEF store in {elsewhere}")
    for result in (bare, wrong, missing, bad, nodir):
        assert "Traceback" not in result.stderr
