"""The relay of spool commits to the delivery process (fabric/commit_relay.py) over a real pipe: frames arrive
whole and in order however the pipe splits them, a full pipe never blocks the sender, and what it could not
buffer reaches the other end as a gap."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest

from tests.brokers import eventually
from umcef.adapters.local import Committed, Record
from umcef.fabric.commit_relay import CommitReceiver, CommitSender

Heard = tuple[str, list[tuple[int, float, bytes]], bool]


def committed(topic: str, first: int, n: int, size: int = 10) -> list[Committed]:
    return [(seq, 1000.0 + seq, Record(topic, str(seq).encode().ljust(size, b"x"))) for seq in range(first, first + n)]


class Pipe:
    """Both ends of a new pipe; an end the test closes is not closed again at teardown."""

    def __init__(self) -> None:
        self.read, self.write = os.pipe()
        self.open = {self.read, self.write}

    def close(self, fd: int) -> None:
        os.close(fd)
        self.open.discard(fd)


@pytest.fixture
def pipe() -> Iterator[Pipe]:
    ends = Pipe()
    yield ends
    for fd in ends.open:
        os.close(fd)


def receiver(read: int, heard: list[Heard], eof: list[bool]) -> CommitReceiver:
    def deliver(topic: str, records: list[Committed], gap: bool) -> None:
        assert all(r.topic == topic for _, _, r in records)
        heard.append((topic, [(seq, stored_at, r.payload) for seq, stored_at, r in records], gap))

    return CommitReceiver(read, deliver, lambda: eof.append(True))


def expected(topic: str, records: list[Committed], gap: bool) -> Heard:
    return topic, [(seq, stored_at, r.payload) for seq, stored_at, r in records], gap


async def test_frames_arrive_whole_and_in_order_through_a_full_pipe(pipe: Pipe) -> None:
    read, write = pipe.read, pipe.write
    sender = CommitSender(write)
    heard: list[Heard] = []
    eof: list[bool] = []
    big = committed("_spool.a", 1, 300, size=10_000)  # ~3 MB: more than the pipe holds
    sent = [("_spool.a", big, False), ("_spool.b", committed("_spool.b", 301, 2), True), ("_spool.a", [], True)]
    for topic, records, gap in sent:
        sender.send(topic, records, gap)  # returns at once: the rest waits for the pipe
    assert sender._pending_bytes > 0
    loop = asyncio.get_running_loop()
    loop.add_reader(read, receiver(read, heard, eof).readable)
    try:
        await eventually(lambda: len(heard) == 3, what="three frames")
    finally:
        loop.remove_reader(read)
    assert heard == [expected(*frame) for frame in sent]
    assert sender._pending_bytes == 0 and sender.dropped == 0
    sender.close()
    pipe.close(write)
    receiver(read, heard, eof).readable()
    assert eof == [True]


async def test_what_the_buffer_cannot_take_arrives_as_a_gap_after_what_it_holds(pipe: Pipe) -> None:
    read, write = pipe.read, pipe.write
    sender = CommitSender(write, max_buffered=1000)
    first = committed("_spool.a", 1, 300, size=10_000)
    sender.send("_spool.a", first, False)  # the pipe takes part of it, the buffer the rest
    sender.send("_spool.b", committed("_spool.b", 301, 1), False)  # over the limit: dropped
    sender.send("_spool.a", committed("_spool.a", 302, 1), False)  # after a drop: dropped too (order)
    assert sender.dropped == 2
    heard: list[Heard] = []
    loop = asyncio.get_running_loop()
    loop.add_reader(read, receiver(read, heard, []).readable)
    try:
        await eventually(lambda: len(heard) == 3, what="the first frame and two gaps")
        sender.send("_spool.a", committed("_spool.a", 303, 1), False)  # room again: relayed
        await eventually(lambda: len(heard) == 4, what="the next commit")
    finally:
        loop.remove_reader(read)
    assert heard == [expected("_spool.a", first, False), ("_spool.a", [], True), ("_spool.b", [], True),
                     expected("_spool.a", committed("_spool.a", 303, 1), False)]


async def test_a_closed_sender_relays_nothing_and_a_gone_reader_closes_it(pipe: Pipe) -> None:
    read, write = pipe.read, pipe.write
    sender = CommitSender(write)
    sender.close()
    sender.send("_spool.a", committed("_spool.a", 1, 1), False)
    os.set_blocking(read, False)
    with pytest.raises(BlockingIOError):
        os.read(read, 100)
    other = CommitSender(write)
    pipe.close(read)
    other.send("_spool.a", committed("_spool.a", 1, 1), False)  # EPIPE: stops quietly
    assert other._closed
