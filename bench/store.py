"""Benchmark of the embedded event log (adapters/local.py).

Prints appends/s for batch sizes 1, 10, 100 with sync full vs interval vs normal, 1 vs 8 concurrent
appenders; the three fsync policies at batch 1 with 1, 8 and 64 appenders (appends/s, p50/p99 latency,
fsyncs/s), also on a simulated slow disk; a 300-record append beside a busy thread (one INSERT per row
against multi-row INSERTs, default against the gateway's switch interval); a raw append-only segment
file (write + fdatasync per group, the ceiling any hand-rolled segment log could reach) for comparison;
read throughput; the cost of trimming delivered spool records; how soon a commit listener (a delivery
worker) gets a record against how soon its append returns, per policy; and recovery time after SIGKILL. Writes
bench/results/store.json and bench/results/store.png.
Run: .venv/bin/python bench/store.py [--seconds 1.0] [--fsync-interval-ms 5]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import signal
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from umcef.adapters.local import LocalStore, Record, Retention, SyncPolicy, TrimConsumed

RESULTS = Path(__file__).resolve().parent / "results"
SYNC_MODES: tuple[SyncPolicy, ...] = ("full", "interval", "normal")
POLICY_CONCURRENCY = (1, 8, 64)  # the fsync policy comparison (batch 1)
PAYLOAD = json.dumps(
    {
        "specversion": "1.0",
        "type": "com.example.order.created",
        "source": "/bench/orders",
        "id": "00000000-0000-0000-0000-000000000000",
        "time": "2025-01-01T00:00:00Z",
        "datacontenttype": "application/json",
        "data": {"order": 1, "items": ["x" * 40] * 6, "note": "y" * 80},
    }
).encode()


def batch_of(n: int, i: int) -> list[Record]:
    return [Record(f"topic{(i + j) % 4}", PAYLOAD, key=f"k{i}-{j}") for j in range(n)]


@dataclass
class Sample:
    rates: list[float] = field(default_factory=list)  # records/s, one per round
    latencies: list[float] = field(default_factory=list)  # seconds per append call, pooled over rounds
    records: int = 0
    commits: int = 0
    fsyncs: int = 0  # LocalStore.fsync_count: per commit (full), per interval at most (interval), 0 (normal)
    seconds: float = 0.0

    def summary(self) -> dict[str, float]:
        lat = sorted(self.latencies)
        return {
            "appends_per_s": statistics.median(self.rates),
            "appends_per_s_min": min(self.rates),
            "appends_per_s_max": max(self.rates),
            "records_per_commit": self.records / max(self.commits, 1),
            "commits_per_s": self.commits / self.seconds,
            "fsyncs_per_s": self.fsyncs / self.seconds,
            "p50_ms": 1000 * lat[len(lat) // 2],
            "p99_ms": 1000 * lat[int(len(lat) * 0.99)],
        }


async def appenders(store: LocalStore, batch: int, concurrency: int, seconds: float, into: Sample) -> None:
    stop = time.perf_counter() + seconds

    async def one(w: int) -> int:
        n = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            await store.append(batch_of(batch, w * 1_000_000 + n))
            into.latencies.append(time.perf_counter() - t0)
            n += 1
        return n

    commits0, fsyncs0 = store.commit_count, store.fsync_count
    t0 = time.perf_counter()
    calls = sum(await asyncio.gather(*(one(w) for w in range(concurrency))))
    took = time.perf_counter() - t0
    into.rates.append(calls * batch / took)
    into.records += calls * batch
    into.commits += store.commit_count - commits0
    into.fsyncs += store.fsync_count - fsyncs0
    into.seconds += took


@contextlib.contextmanager
def python_running_beside() -> Iterator[None]:
    """Another thread of this process runs Python non-stop meanwhile, as the gateway's event loop does at
    saturation: the store's writer thread needs the GIL back after every SQLite statement."""
    import threading

    stop = threading.Event()

    def spin() -> None:
        x = 0
        while not stop.is_set():
            for i in range(1000):
                x += i

    spinner = threading.Thread(target=spin)
    spinner.start()
    try:
        yield
    finally:
        stop.set()
        spinner.join()


def busy_thread_commits(directory: Path, seconds: float, batch: int = 300) -> dict[str, float]:
    """p50/p99 ms of one `batch`-record append (sync full) while another thread of this process runs Python
    non-stop, as the gateway's event loop does at saturation. The writer thread needs the GIL back after
    every SQLite statement, so this compares one INSERT per row against the store's multi-row INSERTs
    (`_ROWS_PER_INSERT`), at CPython's default switch interval and at the gateway's
    (`umcef.fabric.runtime.SWITCH_INTERVAL_SECONDS`)."""
    from umcef.adapters import local
    from umcef.fabric.runtime import SWITCH_INTERVAL_SECONDS

    rows_per_insert, interval = local._ROWS_PER_INSERT, sys.getswitchinterval()
    out: dict[str, float] = {}
    try:
        for per_insert in (1, rows_per_insert):
            for switch in (0.005, SWITCH_INTERVAL_SECONDS):
                local._ROWS_PER_INSERT = per_insert
                sys.setswitchinterval(switch)
                store = LocalStore(directory / f"busy-{per_insert}-{switch}", sync="full")
                try:
                    store.append_sync(batch_of(1, -1))
                    lat: list[float] = []
                    with python_running_beside():
                        end = time.perf_counter() + seconds
                        while time.perf_counter() < end or len(lat) < 5:
                            t0 = time.perf_counter()
                            store.append_sync(batch_of(batch, len(lat)))
                            lat.append(time.perf_counter() - t0)
                finally:
                    store.close()
                lat.sort()
                name = f"rows_per_insert_{per_insert}/switch_{switch * 1000:g}ms"
                out[f"{name}/p50_ms"] = 1000 * lat[len(lat) // 2]
                out[f"{name}/p99_ms"] = 1000 * lat[int(len(lat) * 0.99)]
    finally:
        local._ROWS_PER_INSERT = rows_per_insert
        sys.setswitchinterval(interval)
    return out


async def handover(directory: Path, sync: SyncPolicy, fsync_interval: float, rate: float,
                   seconds: float) -> dict[str, float]:
    """Single-record appends at `rate`/s: ms from the append call to the commit listener's call (what a delivery
    worker waits for) and to the append's return (the 202), p50/p99."""
    store = LocalStore(directory, sync=sync, fsync_interval=fsync_interval)
    loop = asyncio.get_running_loop()
    started: dict[bytes, float] = {}
    heard: list[float] = []
    acked: list[float] = []

    def listener(committed: list[Any], gap: bool) -> None:
        now = time.perf_counter()
        heard.extend(now - started[record.payload] for _, _, record in committed)

    unlisten = store.listen("h", listener)

    async def one(i: int) -> None:
        payload = b"%d" % i
        started[payload] = t = time.perf_counter()
        await store.append([Record("h", payload)])
        acked.append(time.perf_counter() - t)

    try:
        tasks = []
        begin = loop.time()
        for i in range(int(rate * seconds)):
            await asyncio.sleep(max(0.0, begin + i / rate - loop.time()))
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.05)  # the last listener calls
    finally:
        unlisten()
        store.close()

    def pct(values: list[float], q: float) -> float:
        return sorted(values)[min(len(values) - 1, int(len(values) * q))] * 1000

    return {"heard_p50_ms": pct(heard, 0.5), "heard_p99_ms": pct(heard, 0.99),
            "acked_p50_ms": pct(acked, 0.5), "acked_p99_ms": pct(acked, 0.99)}


def fsync_probe_ms(directory: Path) -> float:
    """Median latency of one 4 KiB write + fdatasync right now: the disk's weather during a round."""
    fd = os.open(directory / "fsync-probe", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        times = []
        for _ in range(20):
            t0 = time.perf_counter()
            os.write(fd, b"x" * 4096)
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
        return 1000 * statistics.median(times)
    finally:
        os.close(fd)


_FRAME = struct.Struct(">QIHHI")  # seq, crc32, topic len, key len, payload len


def raw_segment(batch: int, sync: bool, seconds: float, directory: Path) -> float:
    """A segment log's best case: framed records (seq + CRC for torn-tail detection) appended to one file,
    fdatasync per group; no index, no cursors, no retention, one process."""
    fd = os.open(directory / f"seg-{batch}-{sync}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        n, seq = 0, 0
        stop = time.perf_counter() + seconds
        t0 = time.perf_counter()
        while time.perf_counter() < stop:
            parts: list[bytes] = []
            for r in batch_of(batch, n):
                seq += 1
                topic, key = r.topic.encode(), (r.key or "").encode()
                parts += (_FRAME.pack(seq, zlib.crc32(r.payload), len(topic), len(key), len(r.payload)),
                          topic, key, r.payload)
            os.write(fd, b"".join(parts))
            if sync:
                os.fdatasync(fd)
            n += 1
        return n * batch / (time.perf_counter() - t0)
    finally:
        os.close(fd)


def reads(directory: Path, events: int) -> dict[str, float]:
    with LocalStore(directory, sync="normal") as store:
        t0 = time.perf_counter()
        for i in range(0, events, 1000):
            store.append_sync(batch_of(1000, i))
        bulk = events / (time.perf_counter() - t0)

        def scan(topic: str | None, page: int) -> float:
            t0, after, n = time.perf_counter(), 0, 0
            while batch := store.read(topic, after, page):
                after, n = batch[-1].seq, n + len(batch)
            return n / (time.perf_counter() - t0)

        async def follow_all() -> float:
            t0, n = time.perf_counter(), 0
            async for _ in store.follow(None, 0):
                n += 1
                if n == events:
                    break
            return n / (time.perf_counter() - t0)

        out = {
            "bulk_append_1000_per_s": bulk,
            "read_all_page1000_per_s": scan(None, 1000),
            "read_one_topic_page1000_per_s": scan("topic1", 1000),
            "read_all_page100_per_s": scan(None, 100),
            "follow_all_per_s": asyncio.run(follow_all()),
        }
    with LocalStore(directory, sync="normal", read_only=True) as ro:
        t0, after, n = time.perf_counter(), 0, 0
        while batch := ro.read(None, after, 1000):
            after, n = batch[-1].seq, n + len(batch)
        out["read_all_read_only_store_per_s"] = n / (time.perf_counter() - t0)
    out["db_bytes_per_event"] = (directory / "events.db").stat().st_size / events
    return out


def trim_cost(directory: Path, rounds: int = 5, per_round: int = 10_000, busy: bool = False) -> dict[str, float]:
    """Deleting delivered spool records (`Retention.trim_consumed`), as the gateway does every second: each
    round appends `per_round` records to a spool, interleaved with as many to a local topic (so the spool's
    rows share pages with others, as in a gateway), in commits of 100 + 100; moves the delivery cursor past
    them and times the trim pass (sync full; a trim commit skips its own fsync), with `busy` beside a thread
    running Python non-stop. Medians over rounds."""
    spool = "_spool.k"
    retention = Retention(None, None, (TrimConsumed("_spool.", "delivery"),))
    trims: list[float] = []
    appends: list[float] = []
    with LocalStore(directory, sync="full", retention=retention, trim_interval=3600) as store:
        for r in range(rounds):
            last, t0 = 0, time.perf_counter()
            for i in range(0, per_round, 100):
                batch = [Record(t, PAYLOAD, f"k{r}-{i}-{j}") for j in range(100) for t in (spool, "orders")]
                last = store.append_sync(batch)[-2]
            appends.append((time.perf_counter() - t0) / (2 * per_round))
            store.commit_cursor("delivery", spool, last)
            with python_running_beside() if busy else contextlib.nullcontext():
                t0 = time.perf_counter()
                trimmed = store.trim_consumed()
                trims.append((time.perf_counter() - t0) / trimmed)
        assert spool not in store.topics()
    prefix = "busy_" if busy else ""
    out = {
        f"{prefix}trim_us_per_record": 1e6 * statistics.median(trims),
        f"{prefix}trim_ms_per_chunk_of_1000": 1e3 * statistics.median(trims) * 1000,  # what an append may wait
    }
    if not busy:
        out |= {"trim_ms_per_pass": 1e3 * statistics.median(trims) * per_round,
                "append_us_per_record_batch200": 1e6 * statistics.median(appends), "records_per_pass": per_round}
    return out


_VICTIM = textwrap.dedent(
    """
    import asyncio, sqlite3, sys, time
    from umcef.adapters.local import LocalStore, Record
    payload = sys.stdin.buffer.read()

    async def main() -> None:
        store = LocalStore(sys.argv[1], sync="full")
        if sys.argv[3] == "pin":
            # A reader that never finishes its snapshot: checkpoints cannot recycle the WAL, so it grows.
            pin = sqlite3.connect(store.db_path, isolation_level=None)
            pin.execute("BEGIN")
            pin.execute("SELECT count(*) FROM events").fetchone()
        stop = time.monotonic() + float(sys.argv[2])
        async def w(k: int) -> None:
            while True:
                seqs = await store.append([Record("t", payload, key=str(k))] * 100)
                if time.monotonic() > stop:
                    print(seqs[-1], flush=True)
        await asyncio.gather(*(w(k) for k in range(8)))

    asyncio.run(main())
    """
)


def recovery(directory: Path, seconds: float, pin: bool) -> dict[str, float]:
    """Appends hard for a while, SIGKILLs the writer mid-commit, times the reopen."""
    child = subprocess.Popen(
        [sys.executable, "-c", _VICTIM, str(directory), str(seconds), "pin" if pin else "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(PAYLOAD)
    child.stdin.close()
    acked = int(child.stdout.readline())
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    wal = directory / "events.db-wal"
    wal_bytes = wal.stat().st_size if wal.exists() else 0
    t0 = time.perf_counter()
    with LocalStore(directory) as store:
        opened = time.perf_counter() - t0
        last = store.read("t", acked - 1, 1)
        count = store.topics().get("t", 0)
        first_read = time.perf_counter() - t0
    assert last and last[0].seq == acked, "acknowledged record missing after SIGKILL"
    return {
        "events_in_store": count,
        "wal_bytes_at_kill": wal_bytes,
        "reopen_ms": 1000 * opened,
        "reopen_and_first_read_ms": 1000 * first_read,
    }


_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdlib.h>
#include <unistd.h>
static void pause_(void) { const char *s = getenv("UMCEF_FSYNC_DELAY_US"); if (s) usleep(atoi(s)); }
int fsync(int fd) {
    static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fsync"); pause_(); return real(fd);
}
int fdatasync(int fd) {
    static int (*real)(int); if (!real) real = dlsym(RTLD_NEXT, "fdatasync"); pause_(); return real(fd);
}
"""


def slow_disk(delay_ms: float, directory: Path, seconds: float, fsync_interval: float) -> dict[str, float] | None:
    """Re-runs a few points with every fsync made `delay_ms` slower (LD_PRELOAD shim), i.e. on a disk like
    a cloud volume, where group commit matters most. Needs a C compiler; skipped without one."""
    if sys.platform != "linux":
        return None
    shim = directory / "slowfsync.so"
    (directory / "slowfsync.c").write_text(_SHIM)
    build = subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(shim), str(directory / "slowfsync.c"),
                            "-ldl"], capture_output=True)
    if build.returncode != 0:
        print("  (no C compiler: simulated slow-disk section skipped)")
        return None
    env = {**os.environ, "LD_PRELOAD": str(shim), "UMCEF_FSYNC_DELAY_US": str(int(delay_ms * 1000))}
    child = subprocess.run(
        [sys.executable, __file__, "--slow-disk-child", "--seconds", str(seconds), "--dir", str(directory),
         "--fsync-interval-ms", str(1000 * fsync_interval)],
        env=env, capture_output=True, text=True, check=True,
    )
    result: dict[str, float] = json.loads(child.stdout)
    return result


def slow_disk_child(directory: Path, seconds: float, fsync_interval: float) -> None:
    out: dict[str, float] = {"fsync_probe_ms": fsync_probe_ms(directory)}
    out["raw_fdatasync/b1"] = raw_segment(1, True, seconds, directory)
    points: list[tuple[SyncPolicy, int, int]] = [("full", b, c) for b, c in ((1, 1), (1, 8), (1, 64), (10, 8))]
    points += [("interval", 1, c) for c in (1, 8, 64)]
    for sync, batch, conc in points:
        with LocalStore(directory / f"slow-{sync}-{batch}-{conc}", sync=sync, fsync_interval=fsync_interval) as store:
            store.append_sync(batch_of(1, -1))
            sample = Sample()
            asyncio.run(appenders(store, batch, conc, seconds, sample))
            r = sample.summary()
            name = f"{sync}/b{batch}/c{conc}"
            out[name] = r["appends_per_s"]
            for k in ("p50_ms", "p99_ms", "records_per_commit", "fsyncs_per_s"):
                out[f"{name}/{k}"] = r[k]
    print(json.dumps(out))


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slow = results.get("slow_disk")
    ratios = [3, 1, 1.4, 1.4] if slow else [3, 1, 1.4]
    size = (22 if slow else 17, 5.5)
    fig, axes = plt.subplots(1, len(ratios), figsize=size, gridspec_kw={"width_ratios": ratios})
    ax, ax2 = axes[0], axes[1]
    groups = [(s, c) for s in SYNC_MODES for c in (1, 8)]
    width = 0.8 / (len(groups) + 2)
    batches = [1, 10, 100]
    for gi, (sync, conc) in enumerate(groups):
        points = [results["append"][f"{sync}/b{b}/c{conc}"] for b in batches]
        ys = [p["appends_per_s"] for p in points]
        spread = [[y - p["appends_per_s_min"] for y, p in zip(ys, points, strict=True)],
                  [p["appends_per_s_max"] - y for y, p in zip(ys, points, strict=True)]]
        ax.bar([i + gi * width for i in range(3)], ys, width, yerr=spread, capsize=2,
               label=f"SQLite sync={sync}, {conc} appender(s)")
    for gi, sync in enumerate(("fdatasync", "nosync")):
        ys = [results["raw_segment"][f"{sync}/b{b}"] for b in batches]
        xs = [i + (len(groups) + gi) * width for i in range(3)]
        ax.bar(xs, ys, width, hatch="//", alpha=0.6, label=f"raw segment file, {sync}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(3)], [f"batch {b}" for b in batches])
    ax.set_yscale("log")
    ax.set_ylabel("records appended / s (log)")
    ax.set_title("LocalStore appends (returned = committed); median, bars = min-max of rounds")
    ax.legend(fontsize=7, loc="upper left")
    r = results["read"]
    labels = ["all p1000", "topic p1000", "all p100", "follow", "read-only"]
    keys = ["read_all_page1000_per_s", "read_one_topic_page1000_per_s", "read_all_page100_per_s",
            "follow_all_per_s", "read_all_read_only_store_per_s"]
    ax2.bar(labels, [r[k] for k in keys], color="tab:gray")
    ax2.set_ylabel("events read / s")
    ax2.set_title("reads")
    ax2.tick_params(axis="x", rotation=45)
    interval_ms = results["env"]["fsync_interval_ms"]

    def policies(axis: Any, point: Any, modes: tuple[str, ...], title: str) -> None:
        """Batch 1, 1/8/64 appenders: appends/s per fsync policy, p50/p99 latency written on the bars."""
        w = 0.8 / len(modes)
        for gi, sync in enumerate(modes):
            ps = [point(sync, c) for c in POLICY_CONCURRENCY]
            xs = [i + gi * w for i in range(len(POLICY_CONCURRENCY))]
            bars = axis.bar(xs, [p["appends_per_s"] for p in ps], w, label=f"sync={sync}")
            for bar, p in zip(bars, ps, strict=True):
                axis.annotate(f"{p['p50_ms']:.2g}/{p['p99_ms']:.2g}", (bar.get_x() + w / 2, bar.get_height()),
                              ha="center", va="bottom", fontsize=6, rotation=90)
        axis.set_xticks([i + 0.4 - w / 2 for i in range(len(POLICY_CONCURRENCY))],
                        [str(c) for c in POLICY_CONCURRENCY])
        axis.set_xlabel("appenders (batch 1); labels: p50/p99 ms")
        axis.set_ylabel("records / s (log)")
        axis.set_yscale("log")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=7, loc="upper left")

    a = results["append"]
    policies(axes[2], lambda sync, c: a[f"{sync}/b1/c{c}"], SYNC_MODES, f"fsync policy (interval {interval_ms:g} ms)")
    if slow:
        def slow_point(sync: str, c: int) -> dict[str, float]:
            k = f"{sync}/b1/c{c}"
            return {"appends_per_s": slow[k], "p50_ms": slow[f"{k}/p50_ms"], "p99_ms": slow[f"{k}/p99_ms"]}

        policies(axes[3], slow_point, ("full", "interval"), f"every fsync +{slow['added_fsync_ms']:g} ms")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=1.5, help="total time per append configuration")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds the time is split into")
    parser.add_argument("--read-events", type=int, default=200_000)
    parser.add_argument("--dir", default=None, help="where to put the stores (default: system temp dir)")
    parser.add_argument("--slow-fsync-ms", type=float, default=2.0, help="fsync delay added on the slow disk")
    parser.add_argument("--fsync-interval-ms", type=float, default=5.0, help="sync=interval's fsync interval")
    parser.add_argument("--slow-disk-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    fsync_interval = args.fsync_interval_ms / 1000
    if args.slow_disk_child:
        slow_disk_child(Path(args.dir), args.seconds, fsync_interval)
        return
    RESULTS.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "env": {
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "payload_bytes": len(PAYLOAD),
            "seconds_per_point": args.seconds,
            "rounds": args.rounds,
            "fsync_interval_ms": args.fsync_interval_ms,
        },
        "append": {},
        "raw_segment": {},
    }
    started = time.perf_counter()
    batches = (1, 10, 100)
    configs = [(sync, b, c) for sync in SYNC_MODES for b in batches for c in (1, 8)]
    configs += [(sync, 1, c) for sync in SYNC_MODES for c in POLICY_CONCURRENCY if c not in (1, 8)]
    per_round = args.seconds / args.rounds
    print(f"payload {len(PAYLOAD)} B; {args.rounds} interleaved rounds of {per_round:.2f}s/point; medians")
    with tempfile.TemporaryDirectory(prefix="umcef-bench-", dir=args.dir) as tmp:
        base = Path(tmp)
        stores = {cfg: LocalStore(base / "-".join(map(str, cfg)), sync=cfg[0], fsync_interval=fsync_interval)
                  for cfg in configs}
        samples = {cfg: Sample() for cfg in configs}
        raw: dict[str, list[float]] = {f"{n}/b{b}": [] for n in ("fdatasync", "nosync") for b in batches}
        fsync_ms: list[float] = []
        try:
            for store in stores.values():
                store.append_sync(batch_of(1, -1))  # warm-up: the first commit creates the WAL
            # Rounds interleave every configuration, so a noisy neighbour on a shared disk or CPU hurts all
            # of them alike instead of whichever happened to run at that moment.
            for _ in range(args.rounds):
                fsync_ms.append(fsync_probe_ms(base))
                for cfg in configs:
                    asyncio.run(appenders(stores[cfg], cfg[1], cfg[2], per_round, samples[cfg]))
                for key in raw:
                    name, b = key.split("/b")
                    raw[key].append(raw_segment(int(b), name == "fdatasync", per_round / 2, base))
        finally:
            for store in stores.values():
                store.close()
        results["env"]["fsync_probe_ms_per_round"] = fsync_ms
        print(f"fdatasync of 4 KiB, median per round (ms): {', '.join(f'{x:.2f}' for x in fsync_ms)}")
        print(f"sync=interval fsyncs at most every {args.fsync_interval_ms:g} ms")
        print(f"{'sync':8} {'batch':>5} {'conc':>4} {'appends/s':>11} {'(min - max)':>21} {'rec/commit':>10} "
              f"{'fsyncs/s':>9} {'p50 ms':>7} {'p99 ms':>7}")
        for (sync, batch, conc), sample in sorted(samples.items()):
            r = results["append"][f"{sync}/b{batch}/c{conc}"] = sample.summary()
            spread = f"({r['appends_per_s_min']:,.0f} - {r['appends_per_s_max']:,.0f})"
            print(f"{sync:8} {batch:5} {conc:4} {r['appends_per_s']:11,.0f} {spread:>21} "
                  f"{r['records_per_commit']:10.1f} {r['fsyncs_per_s']:9,.0f} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f}")
        print("raw segment file (framed + CRC, one writer, no index/cursors/retention), records/s, median:")
        for key, values in raw.items():
            results["raw_segment"][key] = statistics.median(values)
            print(f"  {key:15} {statistics.median(values):11,.0f}")
        results["read"] = reads(base / "read", args.read_events)
        for k, v in results["read"].items():
            print(f"  {k:34} {v:12,.1f}")
        results["trim"] = trim_cost(base / "trim") | trim_cost(base / "trim-busy", busy=True)
        print("trimming delivered spool records (sync full; busy_: beside a thread running Python), medians:")
        for k, v in results["trim"].items():
            print(f"  {k:34} {v:12,.2f}")
        slow = slow_disk(args.slow_fsync_ms, base, 0.6, fsync_interval)
        if slow is not None:
            results["slow_disk"] = {"added_fsync_ms": args.slow_fsync_ms, **slow}
            print(f"simulated slow disk (every fsync +{args.slow_fsync_ms} ms), records/s unless named:")
            for k, v in slow.items():
                print(f"  {k:34} {v:12,.2f}")
        results["handover"] = {}
        print("1,000 single-record appends/s, ms from append() to the commit listener's call / to its return:")
        for sync in SYNC_MODES:
            r = results["handover"][sync] = asyncio.run(handover(base / f"handover-{sync}", sync, fsync_interval,
                                                                 1000, 3.0))
            print(f"  {sync:9} listener p50 {r['heard_p50_ms']:6.2f} p99 {r['heard_p99_ms']:6.2f}   "
                  f"return p50 {r['acked_p50_ms']:6.2f} p99 {r['acked_p99_ms']:6.2f}")
        results["busy_thread"] = busy_thread_commits(base, 2.0)
        print("a 300-record append (sync full) beside a thread running Python non-stop, ms:")
        for k, v in results["busy_thread"].items():
            print(f"  {k:40} {v:9.2f}")
        results["recovery"] = {}
        for name, pin in (("normal_checkpointing", False), ("wal_pinned_by_reader", True)):
            r = results["recovery"][name] = recovery(base / f"recovery-{name}", 2.0, pin)
            print(f"recovery after SIGKILL, {name}:", ", ".join(f"{k}={v:,.1f}" for k, v in r.items()))
    a = results["append"]
    results["summary"] = {
        # What group commit buys: same batch size, same fsync policy, 8 callers instead of 1.
        "group_commit_gain_full_batch1": a["full/b1/c8"]["appends_per_s"] / a["full/b1/c1"]["appends_per_s"],
        "sqlite_vs_raw_fdatasync_batch1_1_appender": (
            a["full/b1/c1"]["appends_per_s"] / results["raw_segment"]["fdatasync/b1"]
        ),
        # What sync=interval buys and costs at 64 appenders, batch 1 (the many-requests case).
        "interval_vs_full_fsyncs_batch1_c64": a["interval/b1/c64"]["fsyncs_per_s"] / a["full/b1/c64"]["fsyncs_per_s"],
        "interval_vs_full_throughput_batch1_c64": (
            a["interval/b1/c64"]["appends_per_s"] / a["full/b1/c64"]["appends_per_s"]
        ),
    }
    print("summary:", ", ".join(f"{k}={v:.2f}" for k, v in results["summary"].items()))
    results["env"]["bench_seconds"] = time.perf_counter() - started
    (RESULTS / "store.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(results, RESULTS / "store.png")
    took = results["env"]["bench_seconds"]
    print(f"wrote {RESULTS / 'store.json'} and {RESULTS / 'store.png'} in {took:.0f}s")


if __name__ == "__main__":
    main()
