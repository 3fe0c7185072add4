"""The gateway's spool commits, relayed to the delivery process over a pipe (`delivery.process: true`).

In one process the store hands each commit's spool records to the delivery workers in memory
(umcef.fabric.spool_feed). Across processes the gateway's process relays them: per commit and spool topic,
one frame with the records (seq, stored_at, payload) and the commit's `gap` flag, which the child hands to
its own store's listener for the topic (`LocalStore.hand_over`). The child's workers then neither read
SQLite nor wait for a poll; they still decode each event, as from the store.

The relay never blocks the gateway's event loop: frames wait in a buffer while the pipe is full. Past
`max_buffered` bytes a commit's records are not relayed; the child is told instead, by a frame with a gap
and no records once the buffer has drained, and reads the store (the spool stays the record; the relay is
only a shortcut to it). The gateway relays a spool's records only while the child's feed of it takes them
from memory (its reports say so; a feed catching up from the store, the child slower than ingress, would
drop them), and a gap alone otherwise (umcef.fabric.delivery_process).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import pickle
import struct
from collections import deque
from collections.abc import Callable

from umcef.adapters.local import Committed, Record

_HEADER = struct.Struct("!I")  # the frame's length
MAX_BUFFERED = 16 * 1024 * 1024  # bytes waiting for the pipe: beyond it, the child reads the store instead
PIPE_SIZE = 1024 * 1024  # Linux's default limit for an unprivileged process (the pipe's default is 64 KiB)


def encode(topic: str, committed: list[Committed], gap: bool) -> bytes:
    body = pickle.dumps((topic, gap, [(seq, stored_at, r.payload) for seq, stored_at, r in committed]),
                        protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class CommitSender:
    """The gateway's end: `send` is a store commit listener's body (on the event loop)."""

    def __init__(self, fd: int, max_buffered: int = MAX_BUFFERED) -> None:
        os.set_blocking(fd, False)
        set_size = getattr(fcntl, "F_SETPIPE_SZ", None)  # (Linux only)
        if set_size is not None:
            with contextlib.suppress(OSError):  # a whole group commit per write, where the system allows it
                fcntl.fcntl(fd, set_size, PIPE_SIZE)
        self.fd = fd
        self.max_buffered = max_buffered
        self.dropped = 0  # commits whose records the child must read from the store (for tests)
        self._loop = asyncio.get_running_loop()
        self._pending: deque[memoryview] = deque()  # what the pipe has not taken yet, in order
        self._pending_bytes = 0
        self._owed: set[str] = set()  # topics whose records were dropped: a gap frame is due once there is room
        self._closed = False

    def send(self, topic: str, committed: list[Committed], gap: bool) -> None:
        if self._closed:
            return
        if self._owed or self._pending_bytes > self.max_buffered:
            self._owed.add(topic)  # (and anything after a drop waits for the gap frame: it must come first)
            self.dropped += 1
            return
        self._write(encode(topic, committed, gap))

    def _write(self, frame: bytes) -> None:
        view = memoryview(frame)
        if not self._pending:
            try:
                sent = os.write(self.fd, frame)
            except BlockingIOError:
                sent = 0
            except OSError:  # the child is gone; its successor starts with a store read
                self.close()
                return
            if sent == len(frame):
                return
            view = view[sent:]
            self._loop.add_writer(self.fd, self._flush)
        self._pending.append(view)
        self._pending_bytes += len(view)

    def _flush(self) -> None:
        pending = self._pending
        while pending:
            head = pending[0]
            try:
                sent = os.write(self.fd, head)
            except BlockingIOError:
                return
            except OSError:
                self.close()
                return
            self._pending_bytes -= sent
            if sent < len(head):
                pending[0] = head[sent:]
                return
            pending.popleft()
        self._loop.remove_writer(self.fd)
        owed, self._owed = self._owed, set()
        for topic in sorted(owed):
            self._write(encode(topic, [], True))

    def close(self) -> None:
        """Stops relaying (the pipe is the caller's to close)."""
        if not self._closed:
            self._closed = True
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_writer(self.fd)
            self._pending.clear()
            self._pending_bytes = 0


class CommitReceiver:
    """The delivery process's end: reads frames when the pipe is readable and hands each to `deliver`
    (topic, committed, gap); `eof` is called once the gateway's end is closed."""

    def __init__(self, fd: int, deliver: Callable[[str, list[Committed], bool], None],
                 eof: Callable[[], None]) -> None:
        os.set_blocking(fd, False)
        self.fd = fd
        self._deliver = deliver
        self._eof = eof
        self._buffer = bytearray()

    def readable(self) -> None:
        try:
            data = os.read(self.fd, 1 << 20)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the gateway's end is closed
            asyncio.get_running_loop().remove_reader(self.fd)
            self._eof()
            return
        buffer = self._buffer
        buffer += data
        start = 0
        try:
            while len(buffer) - start >= _HEADER.size:
                (size,) = _HEADER.unpack_from(buffer, start)
                end = start + _HEADER.size + size
                if len(buffer) < end:
                    break
                with memoryview(buffer) as view:  # (released before the buffer is resized)
                    topic, gap, records = pickle.loads(view[start + _HEADER.size:end])
                start = end
                self._deliver(topic, [(seq, stored_at, Record(topic, payload))
                                      for seq, stored_at, payload in records], gap)
        finally:
            del buffer[:start]
