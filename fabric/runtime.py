"""Interpreter settings for the gateway's own processes (`umcef serve` and its delivery process).

Both are set per process, by the entry points, never by the library classes (an application embedding a
`Gateway` keeps its own settings). Figures: docs/delivery.md, "Interpreter settings".
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from collections.abc import Callable

SWITCH_INTERVAL_SECONDS = 0.001
"""How long a thread that wants the GIL waits before the running one must drop it (CPython's default: 5 ms).
The store's writer thread and librdkafka's callbacks wait that long, several times per group commit,
whenever the event loop is busy: each wait delays every 202 of the commit."""

GC_THRESHOLDS = (50_000, 50, 100)
"""CPython's default (700, 10, 10) runs a young collection every ~14 decoded events; every event in flight
survives it, so each collection re-walks all of them (measured: ~25 µs per event at saturation). Cycles are
still collected, just less often."""


LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"
"""Every log line of the gateway's processes says when, how bad, which part and which process (the delivery
process logs beside its parent). Without a handler Python printed the bare message."""


CLIENT_LOG_EVERY_SECONDS = 30.0
"""The Kafka client library logs an ERROR per connection attempt to a broker that is down (~25 lines a second
for one source; the gateway's own warnings already say the broker is down): each of its messages at most
once per this many seconds."""


class OncePer(logging.Filter):
    """Lets each message (by its format string) of the `loggers` (and their children) through at most once per
    `seconds`; other loggers' records pass. A handler's filter: a logger's own sees only records made there."""

    def __init__(self, seconds: float, loggers: tuple[str, ...],
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.seconds = seconds
        self.loggers = loggers
        self.clock = clock
        self._last: dict[str, float] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not any(record.name == name or record.name.startswith(name + ".") for name in self.loggers):
            return True
        now = self.clock()
        key = str(record.msg)
        if now - self._last.get(key, -self.seconds) < self.seconds:
            return False
        self._last[key] = now
        return True


def configure_logging() -> None:
    """Warnings and errors to stderr, each line with its time, level, logger and process id; and the router's
    sampled decisions (INFO), which `router.explain_sample_every` turns on and nothing else writes."""
    logging.basicConfig(level=logging.WARNING, format=LOG_FORMAT, stream=sys.stderr)
    logging.getLogger("umcef.router.decisions").setLevel(logging.INFO)
    for handler in logging.getLogger().handlers:
        handler.addFilter(OncePer(CLIENT_LOG_EVERY_SECONDS, ("aiokafka", "kafka")))


def tune_interpreter() -> None:
    """Call once start-up is done: what it built (config, route table, modules) is frozen out of collection."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    gc.collect()  # start-up's own garbage first: a frozen cycle would never be collected
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
