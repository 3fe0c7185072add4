"""The gateway's log: a client library's repeated errors are said once per interval, nothing else is held back."""

from __future__ import annotations

import logging

from tests.test_dedup import Clock
from umcef.fabric.runtime import OncePer


def record(name: str, msg: str, *args: object) -> logging.LogRecord:
    return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, args, None)


def test_a_client_librarys_repeated_message_passes_once_per_interval_and_other_loggers_always() -> None:
    clock = Clock()
    once = OncePer(30.0, ("aiokafka",), clock=clock)
    refused = 'Unable connect to "%s": %s'
    assert once.filter(record("aiokafka.conn", refused, "127.0.0.1:1", "refused"))
    # the same message (other arguments) within the interval: held back; another message: its own interval
    assert not once.filter(record("aiokafka.conn", refused, "127.0.0.1:2", "refused"))
    assert once.filter(record("aiokafka.consumer", "Heartbeat failed"))
    # the gateway's own records and a logger merely named alike always pass
    assert all(once.filter(record("umcef.delivery", "%s: %d events failed", "d", 3)) for _ in range(3))
    assert once.filter(record("aiokafkaesque", refused, "h", "x"))
    clock.now += 29.9
    assert not once.filter(record("aiokafka.conn", refused, "127.0.0.1:1", "refused"))
    clock.now += 0.2
    assert once.filter(record("aiokafka.conn", refused, "127.0.0.1:1", "refused"))
