"""Dedup on (`source`, `id`) inside a time window: the contract, and the in-memory store.

`DedupStore` is what the pipeline calls: claim a batch of keys, write the events durably, then commit
the claims (or release them when the write failed, so a retry is not mistaken for a duplicate).
`DedupWindow` keeps the window in this process, with bounded memory; `umcef.fabric.dedup_redis` shares
it between several gateway instances. Where effectively-once stops holding: docs/delivery.md.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import Protocol

Key = tuple[str, str]
Claim = bool | asyncio.Future[bool]
"""True: first sighting, the caller writes it and must commit or release. False: a duplicate of an event
already durable. A future: the same event is being written right now; it resolves to True once that
write is durable, False if it failed (the caller must then not acknowledge it)."""


class DedupUnavailable(Exception):
    """The store cannot answer (Redis down): a duplicate cannot be told from a new event, so the
    pipeline refuses the batch with a retry (HTTP 429) rather than risk storing it twice."""


class DedupStore(Protocol):
    async def claim_batch(self, keys: Sequence[Key]) -> list[Claim]: ...

    async def commit_batch(self, keys: Sequence[Key]) -> None: ...

    async def release_batch(self, keys: Sequence[Key]) -> None: ...

    async def accepted_batch(self, keys: Sequence[Key]) -> list[bool]:
        """Whether each key was committed inside the window; claims nothing (a read-only look)."""
        ...

    async def close(self) -> None: ...


class _Bucket:
    """The keys committed during one slice of the window, in commit order."""

    __slots__ = ("head", "keys", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.keys: list[Key] = []
        self.head = 0  # keys before head were evicted one by one (max_entries)


class DedupWindow:
    """In-memory window, time-bucketed: `slices` buckets per window, a whole bucket dropped once it is
    older than the window (each key is touched once on insert and once on expiry: O(1) amortized, no
    per-lookup scan). A key is remembered for at least `window_seconds` and at most one slice longer.
    Above `max_entries` the oldest keys are forgotten first, so memory stays bounded whatever the load."""

    def __init__(self, window_seconds: float = 600.0, max_entries: int = 1_000_000, *, slices: int = 16,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.window = window_seconds
        self.max_entries = max_entries
        self.slice = window_seconds / slices
        self._clock = clock
        self._seen: dict[Key, _Bucket] = {}
        self._buckets: deque[_Bucket] = deque()
        self._pending: dict[Key, asyncio.Future[bool]] = {}
        self.evicted = 0  # forgotten before their window ended (max_entries): effectively-once lost for them

    def _expire(self, now: float) -> None:
        buckets, seen = self._buckets, self._seen
        horizon = now - self.window - self.slice  # a bucket's newest key is at most `slice` younger than it
        while buckets and buckets[0].started <= horizon:
            bucket = buckets.popleft()
            for key in bucket.keys[bucket.head:]:
                if seen.get(key) is bucket:
                    del seen[key]

    def _evict_oldest(self) -> None:
        bucket = self._buckets[0]
        key = bucket.keys[bucket.head]
        bucket.head += 1
        if self._seen.get(key) is bucket:
            del self._seen[key]
            self.evicted += 1
        if bucket.head == len(bucket.keys):
            self._buckets.popleft()

    def claim(self, key: Key) -> Claim:
        if key in self._seen:
            if self._seen[key].started > self._clock() - self.window - self.slice:
                return False
            del self._seen[key]  # expired but its bucket not dropped yet
        pending = self._pending.get(key)
        if pending is not None:
            return pending
        self._pending[key] = asyncio.get_running_loop().create_future()
        return True

    def commit(self, key: Key) -> None:
        self._commit((key,))

    def _commit(self, keys: Sequence[Key]) -> None:
        """`keys` were written: remember them, wake their concurrent duplicates. The clock is read and the
        bucket picked once for all of them."""
        if not keys:
            return
        now = self._clock()
        buckets = self._buckets
        if not buckets or now - buckets[-1].started >= self.slice:
            self._expire(now)
            buckets.append(_Bucket(now))
        bucket = buckets[-1]
        bucket.keys.extend(keys)
        seen, pending = self._seen, self._pending
        for key in keys:
            seen[key] = bucket
            future = pending.pop(key, None)
            if future is not None and not future.done():
                future.set_result(True)
        while len(seen) > self.max_entries:
            self._evict_oldest()

    def release(self, key: Key) -> None:
        """The write failed: forget the claim so a retry is not mistaken for a duplicate."""
        future = self._pending.pop(key, None)
        if future is not None and not future.done():
            future.set_result(False)

    async def claim_batch(self, keys: Sequence[Key]) -> list[Claim]:
        """`claim` for each key, with one future for all the keys it claims: a batch is written (or fails)
        as a whole, so a concurrent duplicate of any of them waits for the same outcome."""
        seen, pending = self._seen, self._pending
        horizon = self._clock() - self.window - self.slice
        shared: asyncio.Future[bool] | None = None
        out: list[Claim] = []
        for key in keys:
            bucket = seen.get(key)
            if bucket is not None:
                if bucket.started > horizon:
                    out.append(False)
                    continue
                del seen[key]  # expired but its bucket not dropped yet
            waiting = pending.get(key)
            if waiting is not None:
                out.append(waiting)
                continue
            if shared is None:
                shared = asyncio.get_running_loop().create_future()
            pending[key] = shared
            out.append(True)
        return out

    async def commit_batch(self, keys: Sequence[Key]) -> None:
        self._commit(keys)

    async def release_batch(self, keys: Sequence[Key]) -> None:
        for key in keys:
            self.release(key)

    async def accepted_batch(self, keys: Sequence[Key]) -> list[bool]:
        horizon = self._clock() - self.window - self.slice
        seen = self._seen
        return [(bucket := seen.get(key)) is not None and bucket.started > horizon for key in keys]

    async def close(self) -> None:
        return None

    def __len__(self) -> int:
        return len(self._seen)
