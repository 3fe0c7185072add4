"""In-memory dedup on (`source`, `id`) inside a time window, with bounded memory.

A single-instance store; the delivery issue adds a Redis one for several gateways. Effectively-once
stops holding when the window expires, when more than `max_entries` distinct events arrive inside
it (oldest forgotten first) and when the gateway restarts (the window lives in memory).
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict

Key = tuple[str, str]


class DedupWindow:
    def __init__(self, window_seconds: float = 600.0, max_entries: int = 1_000_000) -> None:
        self.window = window_seconds
        self.max_entries = max_entries
        self._seen: OrderedDict[Key, float] = OrderedDict()  # insertion order == time order
        self._pending: dict[Key, asyncio.Future[bool]] = {}

    def _expire(self, now: float) -> None:
        seen = self._seen
        horizon = now - self.window
        while seen:
            _key, at = next(iter(seen.items()))
            if at > horizon and len(seen) <= self.max_entries:
                break
            seen.popitem(last=False)

    def claim(self, key: Key) -> asyncio.Future[bool] | bool:
        """True: first sighting, caller must `commit` or `release`. False: already durable (duplicate).
        A future: the same event is being written right now; await it to learn the outcome."""
        if key in self._seen:
            return False
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        self._pending[key] = asyncio.get_running_loop().create_future()
        return True

    def commit(self, key: Key) -> None:
        now = time.monotonic()
        self._seen[key] = now
        self._seen.move_to_end(key)
        future = self._pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(True)
        if len(self._seen) > self.max_entries or len(self._seen) % 1024 == 0:
            self._expire(now)

    def release(self, key: Key) -> None:
        """The write failed: forget the claim so a retry is not mistaken for a duplicate."""
        future = self._pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(False)

    def __len__(self) -> int:
        return len(self._seen)
