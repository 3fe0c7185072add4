"""Codec speed: ours vs the official CloudEvents SDK (`cloudevents` 2.2.0), µs per event.

    python bench/codec.py            # full run (about a minute)
    python bench/codec.py --quick    # fewer repeats, for a smoke test

One realistic event, an `OrderPlaced` with 10 attributes (incl. the `partitionkey` and `traceparent`
extensions) and a ~600-byte JSON order, through: HTTP binary mode, structured mode and a JSON batch
of 100 (reported per event), decode (+ validate) and encode; and our protobuf format when present
(the SDK has none). Ours runs twice: with the compiled validator and, in a subprocess with
UMCEF_PURE=1, with the pure-Python one. Writes bench/results/codec.json and codec.png.

Method: each operation runs in a loop sized to ~40 ms, repeated (7 times, 3 with --quick) with the
garbage collector off, as `timeit` does; the figure is the best repeat, the least disturbed by
whatever else the machine is doing (the median is in the JSON too).

What each side does, so the ratios are read right:
- binary decode: we validate every attribute and keep the body as bytes (the gateway forwards it
  untouched); the SDK also parses a JSON body into a dict, so the row "binary decode + parse body"
  adds `orjson.loads` of the body to ours for a like-for-like figure.
- structured and batch decode: compiled, we validate `data` but keep it as its JSON text, parsed when
  first read (the gateway forwards it untouched); the row "batch decode + read data" reads every
  event's `data` for a like-for-like figure.
- The SDK has no batch API. Its batch decode is `json.loads` of the array, then per item what
  `JSONFormat.read` does after its own `json.loads` (parse `time`, split off `data`, build and
  validate the `CloudEvent`); its batch encode joins `JSONFormat.write` outputs into an array.
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import orjson
from _plot import write_results
from _sample import ATTRIBUTES, BODY, ORDER
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import http as sdk_http
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent as SdkEvent
from dateutil.parser import isoparse  # type: ignore[import-untyped, unused-ignore]  # the SDK's parser

from umcef.fabric import accel
from umcef.fabric.bindings import http
from umcef.fabric.event import Event
from umcef.fabric.formats import json_format

BATCH = 100
TARGET_DECODE_SPEEDUP = 4.0
SDK_JSON = JSONFormat()



def our_event() -> Event:
    return Event(dict(ATTRIBUTES), dict(ORDER))


def sdk_event() -> BaseCloudEvent:
    attributes = dict(ATTRIBUTES)
    attributes["time"] = isoparse(attributes["time"])  # the SDK requires a datetime
    return SdkEvent(attributes, dict(ORDER))


def sdk_batch_decode(body: bytes) -> list[BaseCloudEvent]:
    """`JSONFormat.read` per array item, minus its own `json.loads` (the SDK has no batch API)."""
    out: list[BaseCloudEvent] = []
    for item in json.loads(body):
        if "time" in item:
            item["time"] = isoparse(item["time"])
        data = item.pop("data", None)
        if data is None and "data_base64" in item:
            data = base64.b64decode(item.pop("data_base64"))
        out.append(SdkEvent(item, data))
    return out


def operations(ours_only: bool) -> dict[str, tuple[Callable[[], object], int, Callable[[], object] | None]]:
    """name -> (ours, events per call, SDK or None). Every callable does the complete operation."""
    event = our_event()
    headers, body = http.encode_binary(Event(dict(ATTRIBUTES), BODY))
    structured = json_format.encode(event)
    batch = json_format.encode_batch([event] * BATCH)
    events = [our_event() for _ in range(BATCH)]
    # Sanity: what we time decodes to the event we mean.
    assert http.decode_binary(headers, body) == Event(dict(ATTRIBUTES), BODY)
    assert json_format.decode(structured) == event
    assert json_format.decode_batch(batch) == events

    ops: dict[str, tuple[Callable[[], object], int, Callable[[], object] | None]] = {}
    sdk_ev = sdk_event()
    sdk_events = [sdk_event() for _ in range(BATCH)]
    message = sdk_http.HTTPMessage(headers, body)
    structured_message = sdk_http.HTTPMessage({"content-type": json_format.CONTENT_TYPE}, structured)

    def sdk(fn: Callable[[], object]) -> Callable[[], object] | None:
        return None if ours_only else fn

    ops["binary decode"] = (
        lambda: http.decode_binary(headers, body),
        1,
        sdk(lambda: sdk_http.from_binary(message, SDK_JSON, SdkEvent)),
    )
    ops["binary decode + parse body"] = (
        lambda: orjson.loads(http.decode_binary(headers, body).data), 1,
        sdk(lambda: sdk_http.from_binary(message, SDK_JSON, SdkEvent)),
    )  # fmt: skip
    ops["binary encode"] = (lambda: http.encode_binary(event), 1, sdk(lambda: sdk_http.to_binary(sdk_ev, SDK_JSON)))
    ops["structured decode"] = (
        lambda: json_format.decode(structured), 1,
        sdk(lambda: sdk_http.from_structured(structured_message, SDK_JSON, SdkEvent)),
    )  # fmt: skip
    ops["structured encode"] = (
        lambda: http.encode_structured(event),
        1,
        sdk(lambda: sdk_http.to_structured(sdk_ev, SDK_JSON)),
    )
    ops["batch decode"] = (lambda: json_format.decode_batch(batch), BATCH, sdk(lambda: sdk_batch_decode(batch)))
    ops["batch decode + read data"] = (
        lambda: [e.data for e in json_format.decode_batch(batch)], BATCH, sdk(lambda: sdk_batch_decode(batch)),
    )  # fmt: skip
    ops["batch encode"] = (
        lambda: http.encode_batch(events), BATCH,
        sdk(lambda: b"[" + b",".join(SDK_JSON.write(e) for e in sdk_events) + b"]"),
    )  # fmt: skip
    try:
        from umcef.fabric.formats import protobuf_format
    except ImportError:  # another engineer's module; the benchmark runs without it
        return ops
    proto = protobuf_format.encode(event)
    proto_batch = protobuf_format.encode_batch(events)
    assert protobuf_format.decode(proto).attributes == event.attributes
    ops["protobuf decode"] = (lambda: protobuf_format.decode(proto), 1, None)
    ops["protobuf encode"] = (lambda: protobuf_format.encode(event), 1, None)
    ops["protobuf batch decode"] = (lambda: protobuf_format.decode_batch(proto_batch), BATCH, None)
    ops["protobuf batch encode"] = (lambda: protobuf_format.encode_batch(events), BATCH, None)
    return ops


def measure(fn: Callable[[], object], per_call: int, repeats: int) -> tuple[float, float]:
    """(best, median) µs per event."""
    loops = 1
    while True:  # size the loop to ~40 ms
        start = time.perf_counter()
        for _ in range(loops):
            fn()
        if time.perf_counter() - start > 0.04:
            break
        loops *= 2
    samples = []
    gc.collect()
    gc.disable()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            for _ in range(loops):
                fn()
            samples.append((time.perf_counter() - start) / loops / per_call * 1e6)
    finally:
        gc.enable()
    return min(samples), statistics.median(samples)


def run(ours_only: bool, repeats: int) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, (ours, per_call, theirs) in operations(ours_only).items():
        row: dict[str, float] = {}
        row["ours"], row["ours_median"] = measure(ours, per_call, repeats)
        if theirs is not None:
            row["sdk"], row["sdk_median"] = measure(theirs, per_call, repeats)
        out[name] = row
    return out


def pure_run(repeats: int) -> dict[str, dict[str, float]]:
    """Ours again, in a fresh interpreter with the pure-Python validator (accel binds at import)."""
    env = {**os.environ, "UMCEF_PURE": "1"}
    args = [sys.executable, __file__, "--ours-only", "--repeats", str(repeats)]
    done = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
    result: dict[str, dict[str, float]] = json.loads(done.stdout)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--repeats", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--ours-only", action="store_true", help=argparse.SUPPRESS)  # the pure subprocess
    args = parser.parse_args()
    repeats = args.repeats or (3 if args.quick else 7)
    if args.ours_only:
        print(json.dumps(run(True, repeats)))
        return

    if not accel.NATIVE:
        print("note: the native validator is not built (or UMCEF_PURE=1); 'native' runs the pure one too")
    native = run(False, repeats)
    pure = pure_run(repeats)
    results: dict[str, dict[str, float | None]] = {}
    for name, row in native.items():
        sdk = row.get("sdk")
        results[name] = {
            "sdk_us": sdk,
            "native_us": row["ours"],
            "pure_us": pure[name]["ours"],
            "speedup_native": sdk / row["ours"] if sdk else None,
            "speedup_pure": sdk / pure[name]["ours"] if sdk else None,
            "sdk_median_us": row.get("sdk_median"),
            "native_median_us": row["ours_median"],
            "pure_median_us": pure[name]["ours_median"],
        }
    print_table(results)
    decode_rows = ["binary decode", "structured decode", "batch decode"]
    worst = min(results[r]["speedup_native"] or 0.0 for r in decode_rows)
    met = worst >= TARGET_DECODE_SPEEDUP
    print(f"\ndecode+validate target ≥{TARGET_DECODE_SPEEDUP:.0f}x the SDK (native): "
          f"{'met' if met else 'MISSED'}, worst {worst:.1f}x")  # fmt: skip

    groups = list(results)
    payload = {
        "benchmark": "codec",
        "unit": "µs per event (best of repeats; medians alongside)",
        "event": {"type": ATTRIBUTES["type"], "attributes": len(ATTRIBUTES), "data_bytes": len(BODY)},
        "batch_size": BATCH,
        "repeats": repeats,
        "native_validator": accel.NATIVE,
        "python": platform.python_version(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "cpus": os.cpu_count(),
        "sdk": "cloudevents 2.2.0 (cloudevents.core)",
        "target": {"decode_speedup_vs_sdk": TARGET_DECODE_SPEEDUP, "worst_decode_speedup": worst, "met": met},
        "results": results,
    }
    json_path, png_path = write_results(
        "codec",
        payload,
        groups=groups,
        series={
            "official SDK": [results[g]["sdk_us"] for g in groups],
            "ours, native": [results[g]["native_us"] for g in groups],
            "ours, pure Python": [results[g]["pure_us"] for g in groups],
        },
        title=f"CloudEvents codec: OrderPlaced ({len(ATTRIBUTES)} attributes, {len(BODY)} B JSON data)",
        ylabel="µs per event (log scale, lower is better)",
        log=True,
    )
    print(f"wrote {json_path} and {png_path}")


def print_table(results: dict[str, dict[str, float | None]]) -> None:
    def num(value: float | None, suffix: str = "") -> str:
        return "—" if value is None else f"{value:.2f}{suffix}"

    head = f"{'µs per event':<28}{'SDK':>9}{'native':>9}{'pure':>9}{'x native':>10}{'x pure':>9}"
    print(head)
    print("-" * len(head))
    for name, r in results.items():
        print(f"{name:<28}{num(r['sdk_us']):>9}{num(r['native_us']):>9}{num(r['pure_us']):>9}"
              f"{num(r['speedup_native'], 'x'):>10}{num(r['speedup_pure'], 'x'):>9}")  # fmt: skip


if __name__ == "__main__":
    main()
