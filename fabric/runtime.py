"""Interpreter settings for the gateway's own processes (`umcef serve` and its delivery process).

Both are set per process, by the entry points, never by the library classes (an application embedding a
`Gateway` keeps its own settings). Figures: docs/delivery.md, "Interpreter settings".
"""

from __future__ import annotations

import gc
import sys

SWITCH_INTERVAL_SECONDS = 0.001
"""How long a thread that wants the GIL waits before the running one must drop it (CPython's default: 5 ms).
The store's writer thread and librdkafka's callbacks wait that long, several times per group commit,
whenever the event loop is busy: each wait delays every 202 of the commit."""

GC_THRESHOLDS = (50_000, 50, 100)
"""CPython's default (700, 10, 10) runs a young collection every ~14 decoded events; every event in flight
survives it, so each collection re-walks all of them (measured: ~25 µs per event at saturation). Cycles are
still collected, just less often."""


def tune_interpreter() -> None:
    """Call once start-up is done: what it built (config, route table, modules) is frozen out of collection."""
    sys.setswitchinterval(SWITCH_INTERVAL_SECONDS)
    gc.collect()  # start-up's own garbage first: a frozen cycle would never be collected
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
