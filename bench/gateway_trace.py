"""Where an event's time goes inside the gateway at 1,000 single-event requests/s, per store sync policy.

    python bench/gateway_trace.py            # 2 interleaved rounds of 5 s per policy (about 75 s)
    python bench/gateway_trace.py --quick    # 1 round of 3 s

The end-to-end figures of bench/gateway.py include the load generator, the broker and the consumer, and on
a shared 2-core machine they move by several ms between runs. This benchmark times the gateway alone:
`umcef serve` runs in its own process with a few of its functions wrapped to stamp each event id
(wall-clock ns) as it passes:

- sent: the client sent it (the event's `benchts`, the client's clock: one machine, one clock);
- decoded: the pipeline got the event (HTTP parsed, validated);
- queued: its spool record is queued for the store's writer thread;
- committing / committed: the writer's group commit that holds it starts / has handed it over;
- handed: the delivery worker's feed has it (the commit listener ran on the event loop);
- produce: the Kafka adapter hands it to librdkafka; acked: the broker acknowledged it;
- accepted: the publish returned (the 202: the commit is fsynced, with `full` and `interval`).

Stages are reported as p50/p90/p99 ms between consecutive stamps, plus "decoded -> produce" (the gateway's
residence time before Kafka) and "decoded -> accepted" (the 202) whole, and "sent -> consumed": the end to
end of bench/gateway.py, measured by its consumer (a process of its own, as there) in the same run. That
consumer costs the machine CPU the traced stages feel: with it, they take about twice as long as without
(session 9: decoded -> produce p50 1.2-1.8 ms against 0.7-0.8). The consumer also notes when each id
arrived, which gives "produce -> consumed": the Kafka leg of the gateway's records, compared with the
same leg of a direct producer (bench/gateway.py's confluent load role, the same binary records, the same
rate, one record per produce()) run in each round beside the policies. Per policy, the gateway process's
CPU per request is split by thread (event loop, store writer, fsync, Kafka poll, librdkafka's own).
Policies run interleaved, each on a fresh gateway and topic, against one Tansu broker; the first 1.5 s of
each run are not counted (connections, producer start-up).
Writes bench/results/gateway_trace.json and gateway_trace.png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:
    sys.path.insert(1, str(ROOT))

import orjson  # noqa: E402
from _plot import write_results  # noqa: E402
from _sample import ATTRIBUTES, ORDER  # noqa: E402
from gateway import KEYS, PARTITIONS, Gateway, pct, run_role, spawn_role, task_cpu  # noqa: E402  (bench/gateway.py)

POLICIES = ("full", "interval", "normal")
DIRECT = "direct producer"  # the Kafka leg's reference: no gateway, the same records and rate
SYSTEMS = (*POLICIES, DIRECT)
# Thread group by the start of a Python thread's name (librdkafka's threads are known by their comm, `rdk:*`).
NAMED_GROUPS = (("MainThread", "event loop"), ("umcef-local", "store writer"), ("umcef-fsync", "fsync"),
                ("umcef-kafka", "Kafka poll"))
THREAD_GROUPS = (*(group for _, group in NAMED_GROUPS), "librdkafka", "other")
# What the plot shows, per system that has it.
PLOTTED = (("decoded -> produce", "p50"), ("decoded -> produce", "p99"), ("committing -> committed", "p50"),
           ("committing -> committed", "p99"), ("produce -> consumed", "p50"), ("produce -> consumed", "p99"))
# in the order they pass
STAGES = ("sent", "decoded", "queued", "committing", "committed", "handed", "produce", "acked")
RATE = 1000
SKIP_SECONDS = 1.5
BATCH_CT = "application/cloudevents-batch+json"


# ==================================================================================================
# role: the traced gateway (its own process)


def traced_gateway_main(out: Path, argv: list[str]) -> None:
    """`umcef serve ARGV` with stamping wrappers; the stamps go to `out` (JSON) at exit."""
    import atexit

    from umcef.adapters import kafka, local
    from umcef.fabric import pipeline, spool_feed
    from umcef.fabric.cli import main

    stamps: dict[str, dict[str, int]] = {}

    def stamp(event: Any, stage: str) -> None:
        attributes = getattr(event, "attributes", None)
        if attributes is not None:
            stamps.setdefault(attributes["id"], {})[stage] = time.time_ns()

    def carried(records: Any) -> list[Any]:
        return [r.carry for r in records if r.carry is not None]

    publish = pipeline.Pipeline.publish

    async def traced_publish(self: Any, events: list[Any], size: int = 0) -> Any:
        for e in events:
            stamp(e, "decoded")
            # When the client sent it (same machine, same clock): what the HTTP hop took.
            stamps[e.attributes["id"]]["sent"] = int(e.attributes["benchts"].rsplit(".", 1)[1])
        result = await publish(self, events, size)
        for e in events:
            stamp(e, "accepted")
        return result

    append = local.LocalStore.append

    async def traced_append(self: Any, records: Any) -> Any:
        for e in carried(records):
            stamp(e, "queued")
        return await append(self, records)

    commit_writes = local.LocalStore._commit_writes

    def traced_commit_writes(self: Any, ops: list[Any]) -> None:
        events = [e for op in ops if isinstance(op, local._Append) for e in carried(op.records)]
        for e in events:
            stamp(e, "committing")
        try:
            commit_writes(self, ops)
        finally:
            for e in events:
                stamp(e, "committed")

    heard = spool_feed.SpoolFeed._heard

    def traced_heard(self: Any, committed: list[Any], gap: bool) -> None:
        for _, _, record in committed:
            stamp(record.carry, "handed")
        heard(self, committed, gap)

    send_chunk = kafka.KafkaAdapter._send_chunk

    async def traced_send_chunk(self: Any, producer: Any, events: Any, issued: Any = None) -> Any:
        for e in events:
            stamp(e, "produce")
        results = await send_chunk(self, producer, events, issued)
        for e in events:
            stamp(e, "acked")
        return results

    threads: dict[str, str] = {}  # native thread id -> name, for the orchestrator's CPU split

    def note_threads() -> None:
        while True:
            threads.update({str(t.native_id): t.name for t in threading.enumerate()})
            time.sleep(0.5)

    threading.Thread(target=note_threads, daemon=True, name="trace-threads").start()
    pipeline.Pipeline.publish = traced_publish  # type: ignore[method-assign]
    local.LocalStore.append = traced_append  # type: ignore[method-assign]
    local.LocalStore._commit_writes = traced_commit_writes  # type: ignore[method-assign]
    spool_feed.SpoolFeed._heard = traced_heard  # type: ignore[method-assign]
    kafka.KafkaAdapter._send_chunk = traced_send_chunk  # type: ignore[method-assign]
    atexit.register(lambda: out.write_bytes(orjson.dumps({**stamps, "_threads": threads})))
    sys.argv = ["umcef", *argv]
    main()


# ==================================================================================================
# orchestration


def start_gateway(tmp: Path, policy: str, bootstrap: str, topic: str) -> tuple[Gateway, Path]:
    """A traced gateway delivering to `topic`, and the file its stamps go to when it stops."""
    config = tmp / f"{topic}.yaml"
    config.write_text(
        "server: {host: 127.0.0.1, port: 0, grpc_port: null}\n"
        f"store: {{sync: {policy}}}\n"
        "delivery: {process: false}\n"
        f'destinations:\n  kafka: {{url: "kafka://{bootstrap}/{topic}"}}\n'
        "default: kafka\n"
    )
    out = tmp / f"{topic}.json"
    gateway = Gateway(config, tmp / topic, tmp / f"{topic}.log",
                      cli=(__file__, "--role", "gateway", "--out", str(out), "--"))
    return gateway, out


async def offer(url: str, tag: str, seconds: float) -> int:
    """RATE single-event requests per second (open loop) for SKIP_SECONDS + seconds; returns events sent."""
    import aiohttp

    async with aiohttp.ClientSession() as session:
        async def one(i: int) -> None:
            # Keys spread over the partitions as bench/gateway.py's load does (and the direct leg's records).
            event = {**ATTRIBUTES, "id": f"{tag}-{i}", "partitionkey": f"customer-{i % KEYS}",
                     "benchts": f"{tag}.{time.time_ns()}", "data": ORDER}
            async with session.post(url, data=orjson.dumps([event]), headers={"content-type": BATCH_CT}) as resp:
                if resp.status != 202:
                    raise RuntimeError(f"gateway answered {resp.status}: {await resp.text()}")

        loop = asyncio.get_running_loop()
        begin = loop.time()
        tasks = []
        total = int(RATE * (SKIP_SECONDS + seconds))
        for i in range(total):
            await asyncio.sleep(max(0.0, begin + i / RATE - loop.time()))
            tasks.append(asyncio.ensure_future(one(i)))
        await asyncio.gather(*tasks)
        await asyncio.sleep(0.5)  # the last deliveries
        return total


def start_consumer(bootstrap: str, topic: str, seconds: float) -> Any:
    """bench/gateway.py's consumer role on `topic`: ms from `benchts` (the client's send) to consumed."""
    total = int(RATE * (SKIP_SECONDS + seconds))
    consumer = spawn_role("consume", {"bootstrap": bootstrap, "topic": topic, "tag": topic, "expected": total,
                                      "offsets": {p: 0 for p in range(PARTITIONS)}, "timeout": total / RATE + 20,
                                      "ids": True})
    assert consumer.stdout is not None
    if consumer.stdout.readline().strip() != "READY":
        raise RuntimeError("consumer did not start")
    return consumer


def consumed_figures(consumer: Any) -> tuple[list[float], dict[str, int]]:
    """The consumer's latencies after the first SKIP_SECONDS' worth (it sees them about in the order sent),
    and when each id arrived (ns)."""
    text, _ = consumer.communicate(timeout=60)
    got = orjson.loads(text.strip().splitlines()[-1])
    return got["latencies_ms"][int(RATE * SKIP_SECONDS):], got["arrived_ns"]


def cpu_by_group(before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]],
                 names: dict[str, str]) -> dict[str, float]:
    """CPU seconds between two `task_cpu` snapshots, by THREAD_GROUPS (Python threads by their name)."""
    groups = dict.fromkeys(THREAD_GROUPS, 0.0)
    for tid, (comm, seconds) in after.items():
        name = names.get(tid, "")
        group = next((g for start, g in NAMED_GROUPS if name.startswith(start)),
                     "librdkafka" if comm.startswith("rdk:") else "other")
        groups[group] += seconds - before.get(tid, (comm, 0.0))[1]
    return groups


def stage_figures(stamps: dict[str, dict[str, int]], tag: str, arrived: dict[str, int]) -> dict[str, list[float]]:
    """ms between consecutive stamps, and decoded -> produce, for the counted events of one run; produce ->
    consumed for those the consumer saw."""
    runs = [(int(key.rsplit("-", 1)[1]), key, marks) for key, marks in stamps.items() if key.startswith(tag + "-")]
    counted = [marks for i, _, marks in runs
               if i >= RATE * SKIP_SECONDS and all(s in marks for s in (*STAGES, "accepted"))]
    out: dict[str, list[float]] = {}
    for earlier, later in itertools.pairwise(STAGES):
        out[f"{earlier} -> {later}"] = [(m[later] - m[earlier]) / 1e6 for m in counted]
    out["decoded -> produce"] = [(m["produce"] - m["decoded"]) / 1e6 for m in counted]
    out["decoded -> accepted"] = [(m["accepted"] - m["decoded"]) / 1e6 for m in counted]
    out["produce -> consumed"] = [(arrived[key] - marks["produce"]) / 1e6 for i, key, marks in runs
                                  if i >= RATE * SKIP_SECONDS and "produce" in marks and key in arrived]
    return out


def trace_policy(tmp: Path, bootstrap: str, policy: str, topic: str,
                 seconds: float) -> tuple[dict[str, list[float]], dict[str, float], int]:
    """One run of a traced gateway with `policy`: its stage figures, its CPU seconds by thread group, and the
    requests sent."""
    gateway, out = start_gateway(tmp, policy, bootstrap, topic)
    consumer = None
    try:
        consumer = start_consumer(bootstrap, topic, seconds)
        before = task_cpu(gateway.proc.pid)
        sent = asyncio.run(offer(gateway.url, topic, seconds))
        after = task_cpu(gateway.proc.pid)
        consumed, arrived = consumed_figures(consumer)
    finally:
        gateway.stop()
        if consumer is not None and consumer.poll() is None:
            consumer.kill()
    stamps = json.loads(out.read_bytes())
    spent = cpu_by_group(before, after, stamps.pop("_threads"))
    figures = stage_figures(stamps, topic, arrived)
    figures["sent -> consumed"] = consumed
    return figures, spent, sent


def direct_leg(bootstrap: str, topic: str, seconds: float) -> list[float]:
    """The Kafka leg without the gateway: bench/gateway.py's confluent load role producing the gateway's
    binary records at RATE, one per produce(); the consumer's latency is then produce -> consumed."""
    consumer = start_consumer(bootstrap, topic, seconds)
    try:
        run_role("load", {"kind": "confluent", "bootstrap": bootstrap, "topic": topic, "mode": "rate", "tag": topic,
                          "batch": 1, "rate": RATE, "concurrency": 1, "duration": SKIP_SECONDS + seconds}, 60)
        return consumed_figures(consumer)[0]
    finally:
        if consumer.poll() is None:
            consumer.kill()


def percentiles(values: list[float]) -> dict[str, float]:
    return {"p50": pct(values, 0.5), "p90": pct(values, 0.9), "p99": pct(values, 0.99), "n": len(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--role", choices=["gateway"], help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("argv", nargs="*", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.role == "gateway":
        traced_gateway_main(Path(args.out), args.argv)
        return

    sys.path.insert(0, str(HERE))  # bench/adapters.py, not the package of that name
    from adapters import create_topics
    from tests import brokers

    rounds, seconds = (1, 3.0) if args.quick else (2, 5.0)
    started = time.perf_counter()
    samples: dict[str, dict[str, list[float]]] = {p: {} for p in SYSTEMS}
    cpu: dict[str, dict[str, float]] = {p: dict.fromkeys(THREAD_GROUPS, 0.0) for p in POLICIES}  # CPU s
    requests = dict.fromkeys(POLICIES, 0)
    with tempfile.TemporaryDirectory(prefix="umcef-trace-") as name:
        tmp = Path(name)
        broker = brokers.start_kafka(log_dir=tmp / "tansu")
        try:
            topics = {(p, r): brokers.unique_name("trace") for p in SYSTEMS for r in range(rounds)}
            asyncio.run(create_topics(broker.bootstrap, list(topics.values())))
            for r in range(rounds):
                for system in SYSTEMS[r % len(SYSTEMS):] + SYSTEMS[:r % len(SYSTEMS)]:  # rotate the order
                    topic = topics[(system, r)]
                    if system == DIRECT:
                        samples[DIRECT].setdefault("produce -> consumed", []).extend(
                            direct_leg(broker.bootstrap, topic, seconds))
                        continue
                    figures, spent, sent = trace_policy(tmp, broker.bootstrap, system, topic, seconds)
                    for group, seconds_spent in spent.items():
                        cpu[system][group] += seconds_spent
                    requests[system] += sent
                    for stage, values in figures.items():
                        samples[system].setdefault(stage, []).extend(values)
                    whole = percentiles(figures["decoded -> produce"])
                    print(f"round {r + 1}/{rounds} {system:8} decoded -> produce p50 {whole['p50']:.2f} "
                          f"p99 {whole['p99']:.2f} ms ({whole['n']} events)", flush=True)
        finally:
            broker.stop()
    summary = {p: {stage: percentiles(v) for stage, v in stages.items()} for p, stages in samples.items()}
    cpu_us = {p: {g: spent / max(1, requests[p]) * 1e6 for g, spent in groups.items()} for p, groups in cpu.items()}
    for p in POLICIES:
        cpu_us[p]["total"] = sum(cpu_us[p].values())
    stage_names = list(summary[POLICIES[0]])
    print(f"\nms, p50 / p90 / p99 over {rounds} round(s) of {seconds:g} s at {RATE}/s (single-event requests):")
    print(f"{'stage':28}" + "".join(f"{p:>24}" for p in POLICIES))
    for stage in stage_names:
        cells = "".join(f"{s['p50']:8.3f}{s['p90']:8.3f}{s['p99']:8.3f}"
                        for s in (summary[p][stage] for p in POLICIES))
        print(f"{stage:28}{cells}")
    leg = summary[DIRECT]["produce -> consumed"]
    print(f"{'produce -> consumed, direct':28}{leg['p50']:8.3f}{leg['p90']:8.3f}{leg['p99']:8.3f}  "
          "(the same records and rate, no gateway)")
    print("\nthe gateway process's CPU per request, µs:")
    print(f"{'thread':28}" + "".join(f"{p:>24}" for p in POLICIES))
    for group in (*THREAD_GROUPS, "total"):
        print(f"{group:28}" + "".join(f"{cpu_us[p][group]:24.0f}" for p in POLICIES))
    payload = {
        "benchmark": "gateway_trace",
        "mode": "quick" if args.quick else "full",
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "rate_per_s": RATE,
        "rounds": rounds,
        "seconds_per_run": seconds,
        "load_average": os.getloadavg()[0],
        "seconds": time.perf_counter() - started,
        "summary_ms": summary,
        "gateway_cpu_us_per_request": cpu_us,
    }
    groups = [f"{stage} {q}" for stage, q in PLOTTED]
    series = {p: [summary[p][stage][q] if stage in summary[p] else None for stage, q in PLOTTED] for p in SYSTEMS}
    write_results("gateway_trace", payload, groups=groups, series=series,
                  title=f"Inside the gateway at {RATE} requests/s, by store sync policy", ylabel="ms (lower is better)")
    print(f"wrote bench/results/gateway_trace.json and gateway_trace.png ({payload['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
