"""`umcef dlq list` / `umcef dlq replay`, run as a user runs them: a subprocess on a gateway's data dir."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from tests.gateway_process import GatewayProcess
from umcef.adapters.local import LocalStore
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC, DeadLetterQueue
from umcef.fabric.delivery import spool_topic
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


def listed(data_dir: Path, *extra: str) -> list[dict[str, object]]:
    result = umcef("dlq", "list", "--data-dir", str(data_dir), "--json", *extra)
    assert result.returncode == 0, result.stderr
    return [orjson.loads(line) for line in result.stdout.splitlines()]


def test_list_shows_id_type_destination_reason_attempts(data_dir: Path) -> None:
    result = umcef("dlq", "list", "--data-dir", str(data_dir))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 4
    assert lines[1].split("\t")[1:] == ["b", "order.created", "kafka-eu", "attempts=12", "Transient: broker down"]
    assert "4 dead letters pending" in result.stderr
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
