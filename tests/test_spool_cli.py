"""`umcef spool list` / `umcef spool dead-letter`: a destination removed from the configuration leaves its
undelivered events in its spool; the operator sees them, dead-letters them and re-drives them elsewhere."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import orjson
import pytest

from tests.brokers import KafkaBroker, eventually_sync, unique_name
from tests.conformance.target_kafka import create_topic
from tests.gateway_process import GatewayProcess
from tests.test_dlq_cli import NEVER_EJECT, ids, listed, order, post, read, umcef, unreachable_kafka
from tests.test_failover import kafka_ids
from umcef.adapters.local import LocalStore, Record
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC
from umcef.fabric.delivery import ALIVE_GROUP, ALIVE_TIMEOUT, CURSOR_GROUP, spool_topic
from umcef.fabric.spools import Moved, SpoolError, dead_letter, default_reason


def alive(data_dir: Path, destination: str) -> int:
    store = LocalStore(data_dir, read_only=True)
    try:
        return store.cursor(ALIVE_GROUP, spool_topic(destination))
    finally:
        store.close()


def spool_rows(*args: str) -> dict[str, dict[str, object]]:
    result = umcef("spool", "list", "--json", *args)
    assert result.returncode == 0, result.stderr
    return {str(row["destination"]): row for row in map(orjson.loads, result.stdout.splitlines())}


def noted(data_dir: Path, destination: str) -> dict[int, int]:
    with LocalStore(data_dir, read_only=True) as store:
        return store.attempts(spool_topic(destination))


@pytest.mark.parametrize("process", [False, True], ids=["inline", "delivery-process"])
def test_a_removed_destinations_spool_is_listed_dead_lettered_and_redriven_to_kafka(
        tmp_path: Path, kafka_broker: KafkaBroker, process: bool) -> None:
    data_dir = tmp_path / "gw"
    before, after = tmp_path / "before.yaml", tmp_path / "after.yaml"
    # Before: every order goes to `old`, whose broker never answers, so they wait in its spool.
    # (With delivery in its own process, that process's workers mark the spools they deliver.)
    before.write_text(f"data_dir: {data_dir}\ndestinations:\n  old: {unreachable_kafka('t')}}}\ndefault: old\n"
                      f"delivery: {{process: {str(process).lower()}}}\n" + NEVER_EJECT)
    # After: `old` is gone, `new` is a working Kafka topic.
    topic = unique_name("spool-new")
    asyncio.run(create_topic(kafka_broker.bootstrap, topic, partitions=1))
    after.write_text(f"data_dir: {data_dir}\ndestinations:\n  new: kafka://{kafka_broker.bootstrap}/{topic}\n"
                     "default: new\n")
    gateway = GatewayProcess(data_dir, "--config", str(before))
    try:
        post(gateway, [order(f"o{i}", partitionkey=f"k{i % 2}") for i in range(5)])
        # The file is edited but the gateway still runs the old one: its worker holds these events, so
        # dead-lettering them now would deliver them twice once `old` comes back. Refused, nothing moved.
        eventually_sync(lambda: alive(data_dir, "old") > 0, 30, "the worker's mark",
                        poll=0.05)  # as test_dlq_cli: each probe opens the store or runs the CLI
        eventually_sync(lambda: len(noted(data_dir, "old")) == 5, 30, "a failed attempt noted", poll=0.05)
        early = umcef("spool", "dead-letter", "old", "--config", str(after))
        assert early.returncode == 2
        assert early.stderr.startswith("error: a running gateway delivers _spool.old (its worker for 'old' said so "), \
            early.stderr
        assert read(data_dir, DEAD_LETTER_TOPIC) == []
    finally:
        assert gateway.stop() == 0  # a graceful stop leaves the undelivered events in the spool
    assert alive(data_dir, "old") == 0  # and clears the mark

    gateway = GatewayProcess(data_dir, "--config", str(after))
    try:
        assert (f"_spool.old holds 5 undelivered events (after seq 0) but no configured destination 'old' delivers "
                f"it: `umcef spool dead-letter old --config {after}` moves them") in gateway.startup_log

        rows = spool_rows("--config", str(after))
        assert set(rows) == {"old", "new"}
        assert (rows["old"]["configured"], rows["old"]["undelivered"], rows["old"]["stored"]) == (False, 5, 5)
        assert (rows["new"]["configured"], rows["new"]["undelivered"], rows["new"]["failing"]) == (True, 0, 0)
        # `old`'s worker failed every event at least once (its broker never answered): noted in the store.
        most = rows["old"]["most_attempts"]
        assert rows["old"]["failing"] == 5 and isinstance(most, int) and most >= 1, rows["old"]
        text = umcef("spool", "list", "--config", str(after))
        assert text.returncode == 0, text.stderr
        assert any(line.startswith("_spool.old\told\tNOT CONFIGURED\tundelivered=5\toldest=")
                   and line.endswith(f"\tstored=5\tfailing=5\tmost_attempts={most}")
                   for line in text.stdout.splitlines()), text.stdout
        assert f"umcef spool dead-letter old --config {after}, then umcef dlq replay --destination old" in text.stderr

        # A configured destination's spool belongs to its worker.
        refused = umcef("spool", "dead-letter", "new", "--config", str(after))
        assert refused.returncode == 2
        assert refused.stderr.strip() == ("error: destination 'new' is configured: its delivery worker delivers "
                                          "_spool.new; remove it from the configuration first")

        moved = umcef("spool", "dead-letter", "old", "--config", str(after))
        assert moved.returncode == 0, moved.stderr
        assert "dead-lettered 5 events of _spool.old to _deadletter" in moved.stderr
        letters = listed(data_dir, "--config", str(after))
        assert sorted(str(r["id"]) for r in letters) == [f"o{i}" for i in range(5)]
        assert {(r["destination"], r["reason"]) for r in letters} == {("old", default_reason("old"))}
        # The attempts `old`'s worker made (in either process) are carried over.
        assert max(int(str(r["attempts"])) for r in letters) == most and all(int(str(r["attempts"])) >= 1
                                                                              for r in letters), letters
        assert spool_rows("--config", str(after)).get("old", {"undelivered": 0})["undelivered"] == 0
        again = umcef("spool", "dead-letter", "old", "--config", str(after))  # nothing left: nothing twice
        assert again.returncode == 0 and "dead-lettered 0 events" in again.stderr, again.stderr
        assert len(read(data_dir, DEAD_LETTER_TOPIC)) == 5

        # Replayed to their own destination they would wait in a spool nobody delivers: refused.
        stranded = umcef("dlq", "replay", "--config", str(after), "--all")
        assert stranded.returncode == 2
        assert stranded.stderr.strip().endswith(f"was dead-lettered from 'old', which is not in {after}: replay "
                                                f"those with --destination old --to DEST"), stranded.stderr
        typo = umcef("dlq", "replay", "--config", str(after), "--destination", "olf", "--to", "new", "--all")
        assert typo.returncode == 2
        assert typo.stderr.strip() == f"error: no pending dead letter from destination 'olf' (not in {after} either)"
        redriven = umcef("dlq", "replay", "--config", str(after), "--destination", "old", "--to", "new", "--all")
        assert redriven.returncode == 0, redriven.stderr
        expected = {f"o{i}" for i in range(5)}
        # The running gateway's worker for `new` picks the replayed events up and delivers them to Kafka.
        assert asyncio.run(kafka_ids(kafka_broker.bootstrap, topic, expected)) == expected
        eventually_sync(lambda: spool_rows("--config", str(after))["new"]["undelivered"] == 0, 30,
                        "new's spool delivered", poll=0.05)
        assert listed(data_dir, "--config", str(after)) == []
        # The running gateway trims what lies behind the moved cursor: the emptied spool leaves the list.
        eventually_sync(lambda: "old" not in spool_rows("--config", str(after)), 30, "old's spool trimmed", poll=0.05)
    finally:
        assert gateway.stop() == 0


def test_spool_commands_say_what_is_wrong_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text("destinations:\n  new: sqs://queue\n")
    with LocalStore(tmp_path / "gw", sync="normal") as store:
        store.append_sync([Record(spool_topic("old"), b"{}", "k")])
    no_config = umcef("spool", "dead-letter", "old", "--data-dir", str(tmp_path / "gw"))
    assert no_config.returncode == 2
    assert no_config.stderr.strip() == ("error: spool dead-letter needs --config FILE: the gateway's configuration "
                                        "says whether 'old' still has a delivery worker")
    typo = umcef("spool", "dead-letter", "olf", "--config", str(config), "--data-dir", str(tmp_path / "gw"))
    assert typo.returncode == 2
    assert typo.stderr.strip() == f"error: no spool _spool.olf in {tmp_path / 'gw'} (spools: _spool.old)"
    missing = umcef("spool", "list", "--data-dir", str(tmp_path / "nothing"))
    assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    # Without --config every spool is listed, configured or not unknown.
    rows = spool_rows("--data-dir", str(tmp_path / "gw"))
    assert (rows["old"]["configured"], rows["old"]["undelivered"]) == (None, 1)


def test_dead_lettering_keeps_undecodable_records_and_moves_in_chunks(tmp_path: Path) -> None:
    with LocalStore(tmp_path, sync="normal") as store:
        # A dead letter already (`old` was another destination's dead-letter destination) keeps its details.
        earlier = orjson.dumps({**order("d"), "fabricdest": "flaky", "fabricreason": "Rejected: no",
                                "fabricattempts": 3})
        payloads = (orjson.dumps(order("a")), b"not json", orjson.dumps(order("b")), earlier)
        seqs = store.append_sync([Record(spool_topic("old"), p, "k") for p in payloads])
        store.commit_cursor(CURSOR_GROUP, spool_topic("old"), seqs[0])  # `a` was delivered already
        store.note_attempts_later(spool_topic("old"), [(seqs[2], 2)]).result()  # `b` failed twice
        commits = store.commit_count
        assert dead_letter(store, "old", "gone", {}, chunk=2) == Moved(3, undecodable=1)
        assert store.commit_count == commits + 2  # two chunks: copies and cursor move in one commit each
        letters = store.read(DEAD_LETTER_TOPIC)
        assert (letters[0].payload, letters[0].key) == (b"not json", "k")
        b, d = (orjson.loads(s.payload) for s in letters[1:])
        assert (b["fabricdest"], b["fabricreason"], b["fabricattempts"], letters[1].key) == ("old", "gone", 2, "b")
        assert (d["fabricdest"], d["fabricreason"], d["fabricattempts"], letters[2].key) == ("flaky", "Rejected: no", 3,
                                                                                              "d")
        assert store.cursor(CURSOR_GROUP, spool_topic("old")) == seqs[-1]


def test_dead_lettering_stops_when_a_gateway_delivers_the_spool_meanwhile(tmp_path: Path) -> None:
    class DeliveredMeanwhile(LocalStore):
        """The spool's delivery cursor moves right after the second page is read, as a worker would move it."""

        def read(self, topic: str | None, after: int = 0, limit: int = 1000):  # type: ignore[no-untyped-def]
            page = super().read(topic, after, limit)
            if after and page and topic == spool_topic("old"):
                self.commit_cursor(CURSOR_GROUP, spool_topic("old"), page[0].seq)
            return page

    with DeliveredMeanwhile(tmp_path, sync="normal") as store:
        seqs = store.append_sync([Record(spool_topic("old"), orjson.dumps(order(f"e{i}")), "k") for i in range(4)])
        with pytest.raises(SpoolError, match=re.escape("cursor of _spool.old moved meanwhile: something else "
                                                       "delivers this spool; stopped after 2 events")):
            dead_letter(store, "old", "gone", {}, chunk=2)
        # The second chunk wrote nothing: e2 is the worker's (delivered), e3 still in the spool.
        assert ids([orjson.loads(s.payload) for s in store.read(DEAD_LETTER_TOPIC)]) == ["e0", "e1"]
        assert store.cursor(CURSOR_GROUP, spool_topic("old")) == seqs[2]


def test_a_recent_mark_of_a_running_worker_refuses_and_an_old_one_does_not(tmp_path: Path) -> None:
    with LocalStore(tmp_path, sync="normal") as store:
        store.append_sync([Record(spool_topic("old"), orjson.dumps(order("e")), "k")])
        store.commit_cursor(ALIVE_GROUP, spool_topic("old"), 1_000_000)
        with pytest.raises(SpoolError, match=r"a running gateway delivers _spool\.old .* said so 3 s ago"):
            dead_letter(store, "old", "gone", {}, now=lambda: 1_000_003.0)
        assert store.read(DEAD_LETTER_TOPIC) == []
        # A gateway killed without a clean stop leaves its mark: it expires.
        assert dead_letter(store, "old", "gone", {}, now=lambda: 1_000_000 + ALIVE_TIMEOUT) == Moved(1, 0)
