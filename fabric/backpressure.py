"""Backpressure: a high watermark on the undelivered spool depth (DESIGN.md §4, issue 5 §5).

The depth is counted in memory, never queried from the store on the hot path: the spool step adds
what it appended to `_spool.*` topics, the delivery workers report what left the spool (acknowledged
by the broker or dead-lettered), and the gateway seeds it at start with what an earlier run left.
Above the watermark the pipeline raises `Overloaded` (HTTP 429 + Retry-After, gRPC RESOURCE_EXHAUSTED).
"""

from __future__ import annotations

from collections.abc import Callable


class SpoolGauge:
    def __init__(self, max_spooled_events: int | None = None, retry_after_seconds: float = 1.0,
                 drained: Callable[[], int] = lambda: 0) -> None:
        self.max_spooled_events = max_spooled_events
        self.retry_after_seconds = retry_after_seconds
        self.spooled = 0  # appended to spool topics by this process (plus the depth found at start)
        self._drained = drained

    def add(self, n: int) -> None:
        self.spooled += n

    @property
    def depth(self) -> int:
        # Events spooled by another process (`umcef dlq replay`) are drained but never added: clamp.
        return max(0, self.spooled - self._drained())

    def refuse(self, incoming: int, in_flight: int) -> str | None:
        """Why a batch of `incoming` events must wait, or None. Publishes in flight count as spooled
        already (they may all be headed for a spool), so concurrent batches cannot overshoot the
        watermark together; an empty spool takes any batch, so an oversized batch is not refused forever."""
        limit = self.max_spooled_events
        if limit is None:
            return None
        depth = self.depth
        if depth + in_flight and depth + in_flight + incoming > limit:
            return f"{depth} events wait in the delivery spool ({in_flight} more in flight), watermark {limit}"
        return None
