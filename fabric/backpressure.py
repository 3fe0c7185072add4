"""Backpressure: high watermarks on the undelivered spool, globally and per destination (DESIGN.md §4,
issue 5 §5), with priority classes that shed low priority first.

Depths are counted in memory, never queried from the store on the hot path: the spool step adds what it
appended to `_spool.*` topics (per destination, events and encoded bytes), the delivery workers report
what left each spool (acknowledged, moved by failover or dead-lettered), and the gateway seeds the
counts at start with what an earlier run left. Other processes append to spools too (`umcef dlq
replay`): off the hot path, the gateway looks at the store's appended counter per spool every half
second and counts what a spool gained beyond what this process was told of (`reconcile`). Not the record
count: delivered records are trimmed from the spools all the time, which would hide those appends. A batch is checked
after routing, against the spools of the destinations its events were routed to: reservations are
taken synchronously before the durable write, so concurrent batches cannot overshoot a watermark
together. Above a watermark the pipeline raises `Overloaded` (HTTP 429 + Retry-After, gRPC
RESOURCE_EXHAUSTED).

Priority classes: an event of class `low` is refused once the depth would pass `shed_low_at` x the
watermark, `normal` at `shed_normal_at` x, `high` only at the watermark itself.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat

LOW, NORMAL, HIGH = 0, 1, 2
CLASSES: Mapping[str, int] = {"low": LOW, "normal": NORMAL, "high": HIGH}
CLASS_NAMES = ("low", "normal", "high")


@dataclass(slots=True)
class Load:
    """What one batch adds to one spool."""

    events: int = 0
    bytes: int = 0
    lowest: int = HIGH  # the lowest priority class among those events: it decides (a batch is all or nothing)


class Lane:
    """One remote destination's spool. `drained()` is what left it in this run (its worker's delivered,
    moved and dead-lettered events, minus dead letters other workers put into it: `spooled_in()`)."""

    def __init__(self, name: str, max_events: int | None = None, max_bytes: int | None = None,
                 drained: Callable[[], int] = lambda: 0, track_bytes: bool = False, *,
                 spooled_in: Callable[[], int] = lambda: 0) -> None:
        self.name = name
        self.max_events = max_events
        self.max_bytes = max_bytes
        self.drained = drained
        self.spooled_in = spooled_in
        self.track_bytes = track_bytes or max_bytes is not None
        self.added = 0  # events appended to this spool in this run (plus the depth found at start)
        self.accepted = 0  # of those, what ingress appended (not the depth found at start, nor failover moves)
        self.added_bytes = 0
        self.foreign = 0  # appended by other processes, as of the last `reconcile`
        self._baseline = (0, 0)  # (the store's appended counter of the spool, added) when counting began
        self.reserved = 0  # events of batches between the check and the end of their durable write
        self.reserved_bytes = 0
        # Byte depth: the spool drains in order, page by page, so the bytes drained are those of the
        # first `drained()` events appended. One (added, added_bytes) mark per append not yet drained;
        # inside a partly drained append the bytes are interpolated.
        self._marks: deque[tuple[int, int]] = deque()
        self._base = (0, 0)  # the last mark fully drained

    def add(self, events: int, nbytes: int | None = None) -> None:
        """`nbytes` None: appended elsewhere with sizes unknown (failover moves): the mean size so far."""
        if nbytes is None:
            nbytes = events * self.added_bytes // self.added if self.added else 0
        self.added += events
        self.added_bytes += nbytes
        if self.track_bytes and events:
            self._marks.append((self.added, self.added_bytes))

    def baseline(self, appended: int) -> None:
        """The store's appended counter of this spool (`LocalStore.appended`) is `appended` now, and `added`
        accounts for the records it holds (the depth found at start): `reconcile` compares later values."""
        self._baseline = (appended, self.added)

    def reconcile(self, appended: int) -> None:
        """`appended`: the store's appended counter of this spool now, whoever appended. What it gained since
        the baseline beyond what this process was told of (its own appends, failover moves and dead letters
        reported by delivery) another process appended; deletions (trimming what was delivered, retention)
        do not lower it. Recomputed at every look, so a count that raced an append being reported is right
        again at the next one. Batches reserved here count as known: their commit may already be in the
        counter before this process adds them (a look between the two must not count them twice)."""
        base_appended, base_added = self._baseline
        known = self.added - base_added + self.spooled_in() + self.reserved
        self.foreign = max(0, appended - base_appended - known)

    def taken_out(self) -> int:
        """What this spool's own worker took out of it in this run (`drained` counts the dead letters other
        workers put into it against that: they are more to deliver, not its progress)."""
        return self.drained() + self.spooled_in()

    @property
    def depth(self) -> int:
        # Clamped: a delivery process that died counts again what it delivered without moving the cursor.
        return max(0, self.added + self.foreign - self.drained())

    @property
    def depth_bytes(self) -> int:
        drained = self.drained()
        own = self._own_bytes(min(drained, self.added))
        if not self.foreign or not self.added:
            return own
        # Another process's appends: sizes unknown (the mean size so far), taken as draining after ours.
        foreign = max(0, self.foreign - max(0, drained - self.added))
        return own + foreign * self.added_bytes // self.added

    def _own_bytes(self, drained: int) -> int:
        """Bytes of this process's appends still in the spool, `drained` of them gone."""
        marks = self._marks
        while marks and marks[0][0] <= drained:
            self._base = marks.popleft()
        base_events, base_bytes = self._base
        if not marks or drained == base_events:
            return self.added_bytes - base_bytes
        events, nbytes = marks[0]
        return self.added_bytes - base_bytes - (nbytes - base_bytes) * (drained - base_events) // (events - base_events)


class SpoolGauge:
    def __init__(self, max_spooled_events: int | None = None, retry_after_seconds: float = 1.0,
                 drained: Callable[[], int] = lambda: 0, *, max_spooled_bytes: int | None = None,
                 shed_low_at: float = 0.5, shed_normal_at: float = 1.0, max_in_flight_bytes: int | None = None,
                 route_classes: Mapping[str, int] | None = None) -> None:
        self.max_spooled_events = max_spooled_events
        self.max_spooled_bytes = max_spooled_bytes
        self.retry_after_seconds = retry_after_seconds
        self.shed_at = (shed_low_at, shed_normal_at, 1.0)  # fraction of a watermark, by class
        self.max_in_flight_bytes = max_in_flight_bytes  # request bodies (HTTP) and messages (gRPC) held
        self.route_classes: Mapping[str, int] = route_classes or {}  # routes[].priority_class by route name
        self.spooled = 0  # appended to spool topics by this process (plus the depth found at start)
        self.foreign = 0  # appended to them by other processes: the lanes' `foreign`, summed at each reconcile
        self.reserved = 0
        self._drained = drained
        self.lanes: dict[str, Lane] = {}  # destination name (and `_deadletter`, when it is spooled) -> lane
        self.tracks_bytes = max_spooled_bytes is not None  # sizes are needed: some bytes watermark is set

    def lane(self, lane: Lane, *aliases: str) -> Lane:
        """Register a remote destination's spool (under its name and any pseudo-destination aliases)."""
        lane.track_bytes = lane.track_bytes or self.max_spooled_bytes is not None
        self.tracks_bytes = self.tracks_bytes or lane.track_bytes
        for name in (lane.name, *aliases):
            self.lanes[name] = lane
        return lane

    def add(self, n: int | Mapping[str, int]) -> None:
        """Records appended to spools outside the pipeline (failover moves): a count, or a count per
        destination name (then the destinations' own depths follow too)."""
        if isinstance(n, int):
            self.spooled += n
            return
        for name, count in n.items():
            lane = self.lanes.get(name)
            if lane is not None:
                lane.add(count)
                self.spooled += count

    def reconcile(self, appended: Mapping[Lane, int]) -> None:
        """`appended`: the store's appended counter of each lane's spool now (`Lane.reconcile`)."""
        for lane, count in appended.items():
            lane.reconcile(count)
        self.foreign = sum(lane.foreign for lane in set(self.lanes.values()))  # kept as a number: `depth` is hot

    @property
    def depth(self) -> int:
        return max(0, self.spooled + self.foreign - self._drained())

    @property
    def depth_bytes(self) -> int:
        return sum(lane.depth_bytes for lane in set(self.lanes.values()))

    def demand(self, targets: Sequence[tuple[str, ...]], classes: Sequence[int],
               sizes: Sequence[int] | None = None) -> dict[Lane, Load]:
        """What a batch adds to each spool: `targets[i]` are record i's destination names, `classes[i]`
        its priority class, `sizes[i]` its encoded size. One lane lookup per distinct target set."""
        lanes = self.lanes
        if not lanes:
            return {}
        groups: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for names, cls, size in zip(targets, classes, repeat(0) if sizes is None else sizes, strict=False):
            group = groups.get((names, cls))
            if group is None:
                groups[(names, cls)] = [1, size]
            else:
                group[0] += 1
                group[1] += size
        out: dict[Lane, Load] = {}
        for (names, cls), (events, nbytes) in groups.items():
            for name in names:
                lane = lanes.get(name)
                if lane is None:
                    continue  # a local destination: the write is the delivery
                load = out.get(lane)
                if load is None:
                    out[lane] = Load(events, nbytes, cls)
                else:
                    load.events += events
                    load.bytes += nbytes
                    load.lowest = min(load.lowest, cls)
        return out

    def reserve(self, demand: Mapping[Lane, Load]) -> str | None:
        """Why the batch must wait, or None: then its load is reserved until `commit` or `release`."""
        if not demand:
            return None
        events = sum(load.events for load in demand.values())
        lowest = min(load.lowest for load in demand.values())
        why = self._over("the delivery spools", "events", self.max_spooled_events, self.depth, self.reserved,
                         events, lowest)
        if why is None and self.max_spooled_bytes is not None:
            reserved = sum(lane.reserved_bytes for lane in set(self.lanes.values()))
            why = self._over("the delivery spools", "bytes", self.max_spooled_bytes, self.depth_bytes, reserved,
                             sum(load.bytes for load in demand.values()), lowest)
        for lane, load in demand.items():
            if why is not None:
                return why
            where = f"destination {lane.name!r}"
            why = self._over(where, "events", lane.max_events, lane.depth, lane.reserved, load.events, load.lowest)
            if why is None and lane.max_bytes is not None:
                why = self._over(where, "bytes", lane.max_bytes, lane.depth_bytes, lane.reserved_bytes, load.bytes,
                                 load.lowest)
        if why is not None:
            return why
        self._count(demand, 1)
        return None

    def release(self, demand: Mapping[Lane, Load]) -> None:
        """The reserved batch was not written."""
        self._count(demand, -1)

    def commit(self, reserved: Mapping[Lane, Load], written: Mapping[Lane, Load]) -> None:
        """The reserved batch is durable; `written` is what it appended (duplicates left out). The global
        count is the spool step's own report (`add`, from `LocalSpool.write`)."""
        self._count(reserved, -1)
        for lane, load in written.items():
            lane.add(load.events, load.bytes)
            lane.accepted += load.events

    def _count(self, demand: Mapping[Lane, Load], sign: int) -> None:
        for lane, load in demand.items():
            lane.reserved += sign * load.events
            lane.reserved_bytes += sign * load.bytes
            self.reserved += sign * load.events

    def _over(self, where: str, unit: str, limit: int | None, depth: int, reserved: int, incoming: int,
              cls: int) -> str | None:
        # An empty spool takes any batch, so an oversized batch is not refused forever.
        if limit is None or not depth + reserved:
            return None
        fraction = self.shed_at[cls]
        if depth + reserved + incoming <= limit * fraction:
            return None
        level = f"watermark {limit}" if fraction >= 1.0 else \
            f"{limit * fraction:g} ({CLASS_NAMES[cls]} priority is shed at {fraction:g} x watermark {limit})"
        return (f"{where}: {depth} {unit} wait in the delivery spool ({reserved} more being written); "
                f"{incoming} more would exceed {level}")


def backlog(pages: Callable[[int], Sequence[tuple[int, int]]], max_events: int | None,
            max_bytes: int | None) -> tuple[int, int]:
    """Events and bytes an earlier run left in a spool, counted until every watermark that needs them is
    passed (a huge backlog is not read in full at start). `pages(after)` gives (seq, size) records."""
    events = nbytes = after = 0
    while (max_events is not None and events <= max_events) or (max_bytes is not None and nbytes <= max_bytes):
        page = pages(after)
        if not page:
            break
        events += len(page)
        nbytes += sum(size for _, size in page)
        after = page[-1][0]
    return events, nbytes

