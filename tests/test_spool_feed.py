"""SpoolFeed: a delivery spool handed over in memory while caught up, read from the store otherwise —
every committed record exactly once, in seq order, whichever way it came."""

from __future__ import annotations

import asyncio
from pathlib import Path

from umcef.adapters.local import LocalStore, Record
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format
from umcef.fabric.spool_feed import Spooled, SpoolFeed

TOPIC = "_spool.k"


def record(n: int, topic: str = TOPIC) -> Record:
    event = Event({"specversion": "1.0", "id": str(n), "source": "/t", "type": "t"}, None)
    return Record(topic, json_format.encode(event), str(n), event)


async def take(feed: SpoolFeed, count: int) -> list[Spooled]:
    got: list[Spooled] = []
    while len(got) < count:
        got += await asyncio.wait_for(feed.next_page(), 5)
    return got


def ids(page: list[Spooled]) -> list[str]:
    return [(s.event or json_format.decode(s.payload)).id for s in page]


async def test_backlog_from_store_then_live_from_memory(tmp_path: Path) -> None:
    with LocalStore(tmp_path, sync="normal") as store:
        await store.append([record(i) for i in range(5)])
        feed = SpoolFeed(store, TOPIC, 0, page_size=3)
        first = await take(feed, 5)
        assert ids(first) == [str(i) for i in range(5)]
        assert all(s.event is None for s in first)  # the backlog came from the store
        assert await _idle_page(feed) == []  # caught up: live from here
        await store.append([record(i) for i in range(5, 9)] + [record(99, "_spool.other")])
        second = await take(feed, 4)
        assert ids(second) == ["5", "6", "7", "8"]
        assert all(s.event is not None for s in second) and feed.from_memory == 4
        assert [s.seq for s in first + second] == sorted({s.seq for s in first + second})
        feed.close()


async def test_overflow_falls_back_to_the_store_in_order(tmp_path: Path) -> None:
    with LocalStore(tmp_path, sync="normal") as store:
        feed = SpoolFeed(store, TOPIC, 0, page_size=50, capacity=10)
        assert await asyncio.wait_for(_idle_page(feed), 5) == []  # caught up: live
        for start in range(0, 200, 25):  # 25 > capacity: every commit overflows memory
            await store.append([record(i) for i in range(start, start + 25)])
        got = await take(feed, 200)
        assert ids(got) == [str(i) for i in range(200)]
        assert feed.from_store == 200
        assert await _idle_page(feed) == []
        await store.append([record(200)])
        assert ids(await take(feed, 1)) == ["200"]  # live again after catching up
        assert feed.from_memory == 1
        feed.close()


async def test_an_append_by_another_writer_is_found(tmp_path: Path) -> None:
    with LocalStore(tmp_path, sync="normal") as store, LocalStore(tmp_path, sync="normal") as other:
        feed = SpoolFeed(store, TOPIC, 0, poll_interval=0.05)
        assert await asyncio.wait_for(_idle_page(feed), 5) == []
        await other.append([record(1)])  # not seen by this store's listener
        await store.append([record(2)])
        got = await take(feed, 2)
        assert ids(got) == ["1", "2"]
        feed.close()


async def test_starts_after_the_given_seq(tmp_path: Path) -> None:
    with LocalStore(tmp_path, sync="normal") as store:
        seqs = await store.append([record(i) for i in range(4)])
        feed = SpoolFeed(store, TOPIC, seqs[1])
        assert ids(await take(feed, 2)) == ["2", "3"]
        feed.close()


async def _idle_page(feed: SpoolFeed) -> list[Spooled]:
    """One step of the feed on an empty spool: it turns live and waits; a short timeout returns []."""
    try:
        return await asyncio.wait_for(feed.next_page(), 0.2)
    except TimeoutError:
        assert feed.live
        return []


async def test_another_writers_append_alone_is_found_by_polling(tmp_path: Path) -> None:
    with LocalStore(tmp_path, sync="normal") as store, LocalStore(tmp_path, sync="normal") as other:
        feed = SpoolFeed(store, TOPIC, 0, poll_interval=0.05)
        assert await _idle_page(feed) == []
        await other.append([record(7)])  # no commit here follows: nothing tells the listener
        assert ids(await take(feed, 1)) == ["7"]
        assert feed.from_store == 1
        feed.close()


async def test_another_writers_append_before_a_cursor_only_commit_is_not_skipped(tmp_path: Path) -> None:
    # A poll far beyond the test's waits: only the store's gap report can bring record 1 to the feed.
    with LocalStore(tmp_path, sync="normal") as store, LocalStore(tmp_path, sync="normal") as other:
        feed = SpoolFeed(store, TOPIC, 0, poll_interval=600)
        assert await _idle_page(feed) == []  # live, and the first foreign-append check is 600 s away
        await other.append([record(1)])
        await store.commit_cursor_async("c", TOPIC, 0)  # a commit with no records: it reports nothing
        await store.append([record(2)])
        assert ids(await take(feed, 2)) == ["1", "2"]  # not 2 alone from memory, skipping 1 for good
        feed.close()


async def test_a_relayed_commit_arriving_after_a_later_one_is_neither_repeated_nor_reordered(tmp_path: Path) -> None:
    # A delivery process hears two writers: the gateway's commits relayed (`hand_over`) and its own. One can
    # arrive after the other's later commit; what the feed hands out stays each record once, in seq order.
    with LocalStore(tmp_path, sync="normal") as store, LocalStore(tmp_path, sync="normal") as gateway:
        feed = SpoolFeed(store, TOPIC, 0, poll_interval=600)
        first = await gateway.append([record(1), record(2)])
        assert ids(await take(feed, 2)) == ["1", "2"]  # read from the store
        assert await _idle_page(feed) == [] and feed.caught_up
        later = await gateway.append([record(3)])
        late = await gateway.append([record(4)])

        def relayed(seqs: list[int], n: list[int]) -> list[tuple[int, float, Record]]:
            return [(seq, 0.0, record(i)) for seq, i in zip(seqs, n, strict=True)]

        store.hand_over(TOPIC, relayed(later, [3]), False)
        store.hand_over(TOPIC, relayed(first, [1, 2]), False)  # already read: dropped
        assert feed.caught_up
        store.hand_over(TOPIC, relayed(late, [4]), False)
        assert ids(await take(feed, 2)) == ["3", "4"] and feed.from_memory == 2
        await gateway.append([record(5)])
        await gateway.append([record(6)])
        five, six = gateway.read(TOPIC, late[0])
        store.hand_over(TOPIC, [(six.seq, 0.0, record(6))], False)
        store.hand_over(TOPIC, [(five.seq, 0.0, record(5))], False)  # behind what memory holds: read the store
        assert not feed.caught_up
        page = await take(feed, 2)
        assert ids(page) == ["5", "6"] and [s.seq for s in page] == [five.seq, six.seq]
        feed.close()


async def test_caught_up_lately_remembers_a_catch_up_between_two_questions(tmp_path: Path) -> None:
    # The delivery process reports it every 50 ms; a feed told of a gap at every commit is caught up only
    # between them, yet keeps up: the gateway should relay to it.
    with LocalStore(tmp_path, sync="normal") as store:
        feed = SpoolFeed(store, TOPIC, 0, poll_interval=600)
        assert not feed.caught_up_lately()
        assert await _idle_page(feed) == []  # an empty read: caught up
        store.hand_over(TOPIC, [], True)  # a gap: not now
        assert not feed.caught_up
        assert feed.caught_up_lately()  # but it was since the last question
        assert not feed.caught_up_lately()
        assert await _idle_page(feed) == []
        assert feed.caught_up and feed.caught_up_lately()
        feed.close()
