"""`max_attempts` holds across a crash: a SIGKILLed gateway's delivery attempts are noted in its store, and the
restarted gateway continues counting from them instead of granting every undelivered event a fresh set.

Run as a user runs it: `umcef serve` processes on one data dir, a Kafka destination whose broker never answers
(librdkafka's own connection errors: `Transient`), in both delivery modes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.brokers import eventually_sync
from tests.chaos._gateway import ChaosGateway
from tests.chaos.test_gateway_sigkill import wait_gone
from tests.test_dlq_cli import NEVER_EJECT, order, post, read, unreachable_kafka
from tests.test_spool_cli import noted
from umcef.fabric.deadletter import DEAD_LETTER_TOPIC

EVENTS = 5
RETRY = "events failed"  # the worker's warning before each retry wait


def write_config(path: Path, data_dir: Path, max_attempts: int, process: bool) -> Path:
    path.write_text(
        f"data_dir: {data_dir}\n"
        "destinations:\n"
        f"  flaky: {unreachable_kafka('t')}, delivery: {{max_attempts: {max_attempts}}}}}\n"
        "default: flaky\n"
        f"delivery: {{process: {str(process).lower()}, backoff_base_seconds: 0.05, backoff_cap_seconds: 0.2}}\n"
        + NEVER_EJECT)
    return path


@pytest.mark.parametrize("process", [False, True], ids=["inline", "delivery-process"])
def test_a_restarted_gateway_counts_the_attempts_made_before_it_was_killed(tmp_path: Path, process: bool) -> None:
    data_dir = tmp_path / "gw"
    config = write_config(tmp_path / "gw.yaml", data_dir, 1000, process)
    gateway = ChaosGateway(data_dir, config)
    try:
        # One request, one partition key: one page, so every event has had the same attempts.
        post(gateway, [order(f"o{i}", partitionkey="k") for i in range(EVENTS)])
        eventually_sync(lambda: min(noted(data_dir, "flaky").values(), default=0) >= 2, 60, "two attempts noted",
                        poll=0.1)
        eventually_sync(lambda: RETRY in gateway.tail(), 10, "the retry warning")  # what run 2 must not say
    finally:
        gateway.kill()
    if gateway.delivery_pid is not None:  # its child notices and exits by itself: count what it noted too
        asyncio.run(wait_gone(gateway.delivery_pid, 15))
    counts = noted(data_dir, "flaky")
    assert len(counts) == EVENTS and len(set(counts.values())) == 1, counts
    made = next(iter(counts.values()))
    assert read(data_dir, DEAD_LETTER_TOPIC) == []

    # The limit is one more than was made: the restarted gateway makes one attempt, then dead-letters.
    write_config(config, data_dir, made + 1, process)
    gateway = ChaosGateway(data_dir, config)
    try:
        eventually_sync(lambda: len(read(data_dir, DEAD_LETTER_TOPIC)) == EVENTS, 60, "all dead-lettered", poll=0.1)
        letters = read(data_dir, DEAD_LETTER_TOPIC)
        assert sorted(str(d["id"]) for d in letters) == [f"o{i}" for i in range(EVENTS)]
        assert {(d["fabricdest"], d["fabricattempts"]) for d in letters} == {("flaky", made + 1)}, letters
        assert all(str(d["fabricreason"]).startswith("Transient: ") for d in letters), letters
    finally:
        assert gateway.stop() == 0, gateway.tail()
    assert RETRY not in gateway.tail(), gateway.tail()  # no retry in this run: the one attempt was the last
