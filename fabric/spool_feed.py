"""Pages of one delivery spool for its worker: from memory while caught up, from the store otherwise.

The spool topic stays the durability record: the pipeline's group commit writes every event to it before
the 202. This process's commits to the topic are also handed to the feed in memory (a store commit
listener, in seq order, with the event object that was encoded), so a caught-up worker neither re-reads
SQLite nor decodes JSON. (In the delivery process the gateway's commits come the same way, relayed:
umcef.fabric.commit_relay; without the event object.) The memory is only trusted while it is known to be
complete:

- at start (and whenever in doubt) the feed reads the store after the last seq it handed out;
- a read that comes back empty proves everything committed so far was handed out, so from then on the
  listener's records are the spool, in order ("live");
- the in-memory inbox is bounded: on overflow it is dropped and the feed reads the store again;
- another writer may append to the topic (`umcef dlq replay` in another process): the store reports
  that at its next commit of records (a `gap`), and a live feed with nothing in memory looks for a stored record
  it was not given every `poll_interval`; either way it reads the store again.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

from umcef.adapters.local import Committed, LocalStore
from umcef.fabric.event import Event


@dataclass(slots=True)
class Spooled:
    seq: int
    stored_at: float  # unix seconds: when the event was accepted
    payload: bytes  # structured JSON, as stored
    event: Event | None  # the event object itself when it came through memory


class SpoolFeed:
    def __init__(self, store: LocalStore, topic: str, after: int, *, page_size: int = 500,
                 capacity: int = 20_000, poll_interval: float = 0.5) -> None:
        self.store = store
        self.topic = topic
        self.page_size = page_size
        self.capacity = capacity
        self.poll_interval = poll_interval
        self.last = after  # highest seq handed out
        self.live = False
        self.reached_live = False  # set at each empty store read; the delivery process's report clears it
        self.from_memory = 0  # events handed out without a store read (for tests and benchmarks)
        self.from_store = 0
        self._inbox: deque[Committed] = deque()
        self._incomplete = False
        self._waiter: asyncio.Future[None] | None = None  # next_page() waiting for the store's news
        self._next_check = 0.0
        self._unlisten = store.listen(topic, self._heard)

    def close(self) -> None:
        self._unlisten()
        self._inbox.clear()

    @property
    def caught_up(self) -> bool:
        """Taking the store's commits from memory now (not reading the store, nor about to)."""
        return self.live and not self._incomplete

    def caught_up_lately(self) -> bool:
        """Caught up now, or at some moment since the last call (a feed told of a gap at every commit is
        rarely caught up at the moment it is asked, yet keeps up)."""
        reached, self.reached_live = self.reached_live, False
        return reached or self.caught_up

    def _heard(self, committed: list[Committed], gap: bool) -> None:
        if self._incomplete:
            return
        inbox = self._inbox
        if committed and committed[0][0] <= self.last:
            # Late: with two writers relaying (a delivery process hears the gateway's commits and its own), one
            # writer's commit can arrive after the other's later one. What is at or below `last` was read from
            # the store meanwhile (the later commit reported a gap).
            committed = [c for c in committed if c[0] > self.last]
        # Late too, but above `last`: behind what memory holds, so not to be handed out after it.
        behind = bool(committed and inbox and committed[0][0] <= inbox[-1][0])
        if gap or behind or len(inbox) + len(committed) > self.capacity:
            self._incomplete = True  # the store has them, in order; the feed will read it
            inbox.clear()
        else:
            inbox.extend(committed)
        self._wake_up()

    def _wake_up(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def next_page(self) -> list[Spooled]:
        """The next events after the last page, at most `page_size`; waits until there is one. Raises
        RuntimeError when the store is closed."""
        while True:
            page = self._from_memory() if self.live else self._from_store()
            if page:
                self.last = page[-1].seq
                return page
            # A bare future and a timer, not wait_for(Event.wait()): two event-loop turns fewer between a commit
            # and its publish. (Nothing is lost while nobody waits: the next call looks at the inbox first.)
            loop = asyncio.get_running_loop()
            self._waiter = loop.create_future()
            timer = loop.call_later(self.poll_interval, self._wake_up)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None

    def _from_store(self) -> list[Spooled]:
        stored = self.store.read_payloads(self.topic, self.last, self.page_size)
        if not stored:
            # Everything committed so far has been handed out and no listener callback can run before this
            # returns (same thread): whatever arrives in memory from now on is the rest of the spool.
            self._inbox.clear()
            self._incomplete = False
            self.live = self.reached_live = True
            self._next_check = time.monotonic() + self.poll_interval
            return []
        self.from_store += len(stored)
        return [Spooled(seq, stored_at, payload, None) for seq, stored_at, payload in stored]

    def _from_memory(self) -> list[Spooled]:
        inbox, last = self._inbox, self.last
        while inbox and inbox[0][0] <= last:  # read from the store meanwhile
            inbox.popleft()
        if self._incomplete or (not inbox and self._foreign_append()):
            self.live = False
            return self._from_store()
        page: list[Spooled] = []
        for _ in range(min(self.page_size, len(inbox))):
            seq, stored_at, record = inbox.popleft()
            carried = record.carry
            page.append(Spooled(seq, stored_at, record.payload, carried if isinstance(carried, Event) else None))
        self.from_memory += len(page)
        return page

    def _foreign_append(self) -> bool:
        """Every poll interval while memory is empty: is there a stored record after `last` that another writer
        appended after this store's last commit of records? (A record of our own is merely not handed over
        yet; another writer's record before our last commit was reported as a gap.) One probe of the topic's
        index for its highest seq, no payload read."""
        now = time.monotonic()
        if now < self._next_check:
            return False
        self._next_check = now + self.poll_interval
        return self.store.last_seq(self.topic) > max(self.last, self.store.last_seq_written_here)
