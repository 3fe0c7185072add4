"""Dedup shared by several gateway instances through Redis (`dedup: {store: redis, url: redis://...}`).

One key per event: `prefix + blake2b(source, id)`. A batch is claimed in one round trip, a pipeline of
`SET key 0 NX PX pending_ms GET` ("0": being written by whoever set it; GET tells a duplicate from a
concurrent first publish). After the durable write the keys become "1" for the window (one more round
trip); a failed write DELetes them. A key left "0" by a crashed instance expires after `pending_ms`,
after which the event is accepted again (at-least-once: the crashed write may have landed).
Same-instance concurrency is resolved in memory (futures), without polling Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from umcef.fabric.dedup import Claim, DedupUnavailable, Key

PENDING = b"0"
DONE = b"1"

class RedisDedup:
    def __init__(self, url: str, window_seconds: float = 600.0, *, prefix: str = "umcef:dedup:",
                 pending_seconds: float = 30.0, poll_seconds: float = 0.05) -> None:
        self.client: aioredis.Redis = aioredis.Redis.from_url(url)
        self.url = url
        self.window_ms = max(1, int(window_seconds * 1000))
        self.pending_ms = max(1, int(pending_seconds * 1000))
        self.prefix = prefix
        self.poll_seconds = poll_seconds
        self._pending: dict[Key, asyncio.Future[bool]] = {}
        self._watchers: set[asyncio.Task[None]] = set()

    def redis_key(self, key: Key) -> str:
        source, event_id = key
        # Length-prefixed so ("a", "bc") and ("ab", "c") never collide.
        digest = hashlib.blake2b(f"{len(source)}:{source}{event_id}".encode(), digest_size=16).hexdigest()
        return self.prefix + digest

    async def claim_batch(self, keys: Sequence[Key]) -> list[Claim]:
        out: list[Claim | None] = []
        ask: list[tuple[int, Key]] = []
        for key in keys:
            local = self._pending.get(key)
            out.append(local)
            if local is None:
                ask.append((len(out) - 1, key))
        if ask:
            try:
                async with self.client.pipeline(transaction=False) as pipe:
                    for _, key in ask:
                        pipe.set(self.redis_key(key), PENDING, nx=True, px=self.pending_ms, get=True)
                    answers = await pipe.execute()
            except RedisError as exc:
                raise DedupUnavailable(f"dedup store {self.url} unavailable: {exc}") from None
            loop = asyncio.get_running_loop()
            for (i, key), previous in zip(ask, answers, strict=True):
                if previous is None:  # ours: the caller writes it
                    out[i] = True
                    self._pending.setdefault(key, loop.create_future())
                elif previous == DONE:
                    out[i] = False
                else:  # another instance is writing it right now: wait for its outcome
                    out[i] = self._watch(key)
        return [c for c in out if c is not None]

    async def accepted_batch(self, keys: Sequence[Key]) -> list[bool]:
        if not keys:
            return []
        try:
            answers = await self.client.mget([self.redis_key(key) for key in keys])
        except RedisError as exc:
            raise DedupUnavailable(f"dedup store {self.url} unavailable: {exc}") from None
        return [answer == DONE for answer in answers]

    def _watch(self, key: Key) -> asyncio.Future[bool]:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

        async def poll() -> None:
            name = self.redis_key(key)
            deadline = time.monotonic() + self.pending_ms / 1000
            try:
                while time.monotonic() < deadline:
                    value = await self.client.get(name)
                    if value != PENDING:  # DONE: durable there; None: released (the write failed) or expired
                        future.set_result(value == DONE)
                        return
                    await asyncio.sleep(self.poll_seconds)
                future.set_result(False)
            except BaseException:
                if not future.done():
                    future.set_result(False)
                raise

        task = asyncio.create_task(poll())
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)
        return future

    async def commit_batch(self, keys: Sequence[Key]) -> None:
        try:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.set(self.redis_key(key), DONE, px=self.window_ms)
                await pipe.execute()
        except RedisError:
            # The events are durable; if the keys stay "0" they expire after pending_ms and a later
            # retry may be stored twice (documented). Never fail a publish that is already on disk.
            pass
        finally:
            self._resolve(keys, True)

    async def release_batch(self, keys: Sequence[Key]) -> None:
        self._resolve(keys, False)  # first, so local waiters never hang on a Redis problem
        if not keys:
            return
        # On a Redis error the "0" keys expire after pending_ms; until then a retry is answered 429.
        with contextlib.suppress(RedisError):
            await self.client.delete(*[self.redis_key(key) for key in keys])

    def _resolve(self, keys: Sequence[Key], result: bool) -> None:
        for key in keys:
            future = self._pending.pop(key, None)
            if future is not None and not future.done():
                future.set_result(result)

    async def close(self) -> None:
        for task in list(self._watchers):
            task.cancel()
        await self.client.aclose()
