"""Shared output for the benchmarks: one JSON file and one PNG bar chart per benchmark.

Usage from a benchmark script (run as `python bench/<name>.py`, so this directory is on `sys.path`):

    from _plot import write_results

    write_results(
        "codec",                                   # -> bench/results/codec.json and codec.png
        payload,                                   # anything JSON-serialisable: figures, settings, notes
        groups=["binary decode", "binary encode"],  # x axis
        series={"SDK": [25.0, 9.1], "ours": [2.1, None]},  # one bar per series and group; None = no bar
        title="CloudEvents codec, µs per event",
        ylabel="µs per event (lower is better)",
        log=True,
    )

Both files are written to a temporary name and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def write_results(
    name: str,
    payload: Mapping[str, Any],
    *,
    groups: Sequence[str],
    series: Mapping[str, Sequence[float | None]],
    title: str,
    ylabel: str,
    log: bool = False,
    results_dir: Path = RESULTS_DIR,
) -> tuple[Path, Path]:
    """Write `<name>.json` (the payload) and `<name>.png` (a grouped bar chart); return both paths."""
    for label, values in series.items():
        if len(values) != len(groups):
            raise ValueError(f"series {label!r} has {len(values)} values for {len(groups)} groups")
    results_dir.mkdir(parents=True, exist_ok=True)
    json_path = results_dir / f"{name}.json"
    _atomic_write(json_path, (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8"))
    png_path = results_dir / f"{name}.png"
    _bar_chart(png_path, groups, series, title, ylabel, log)
    return json_path, png_path


def _bar_chart(
    path: Path, groups: Sequence[str], series: Mapping[str, Sequence[float | None]], title: str, ylabel: str,
    log: bool,
) -> None:  # fmt: skip
    import matplotlib  # imported here: benchmarks that only print should not pay for it

    matplotlib.use("Agg")  # no display on CI machines
    import matplotlib.pyplot as plt

    count = max(len(series), 1)
    width = 0.8 / count
    fig, ax = plt.subplots(figsize=(min(14.0, max(6.0, 0.9 * len(groups) + 2)), 5.2))
    for index, (label, values) in enumerate(series.items()):
        xs = [g + (index - (count - 1) / 2) * width for g in range(len(groups)) if values[g] is not None]
        ys = [float(v) for v in values if v is not None]
        bars = ax.bar(xs, ys, width, label=label)
        ax.bar_label(bars, labels=[_short(v) for v in ys], fontsize=7, padding=2)
    ax.set_xticks(range(len(groups)), list(groups), rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    os.replace(tmp, path)


def _short(value: float) -> str:
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
