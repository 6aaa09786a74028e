"""Latency-table build time: today's defaults vs the issue's starting point (issue 12).

"Before" is the table as it was built when the fidelity issue was filed, as far as settings can
express it: entries timed alone (``context=False``), no spread checks or retries
(``on_load="ignore"``), the process's own allocator (``allocator="system"``). "Now" is
``LatencySettings()``. Both at 1 thread with the thread CPU clock, same warm-up and repeats,
built one after the other in this process, ``--rounds`` times alternating; the median of the
rounds is reported.

    python recipes/benchmarks/latency_build_time.py --models digits-resnet digits-mbv2 resnet18-s16 resnet18-224

Writes ``recipes/benchmarks/results/latency_build_time.md``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from pathlib import Path

import torch

from latency_models import build

from lightning_layermerge import trace
from lightning_layermerge.planning.tables.latency import LatencySettings, build_latency_table

HERE = Path(__file__).resolve().parent

SETTINGS = {
    "before": LatencySettings(threads=1, context=False, on_load="ignore", allocator="system"),
    "now": LatencySettings(),
}


def build_seconds(name: str, rounds: int) -> dict[str, float]:
    """Median build seconds of each settings variant for model ``name``."""
    model, example = build(name)
    chain = trace(model, example)
    seconds: dict[str, list[float]] = {k: [] for k in SETTINGS}
    for _ in range(rounds):
        for label, settings in SETTINGS.items():
            start = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                build_latency_table(model, chain, settings, progress=False)
            seconds[label].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in seconds.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits-resnet", "digits-mbv2", "resnet18-s16", "resnet18-224"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "latency_build_time.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    lines = ["# Latency-table build time: now vs before the fidelity work (issue 12)", "",
             f"Command: `python recipes/benchmarks/latency_build_time.py --models {' '.join(args.models)} --rounds "
             f"{args.rounds}`; median of {args.rounds} alternating rounds, 1 thread; torch {torch.__version__}.", "",
             "| model | before (s) | now (s) | now / before |", "|---|---:|---:|---:|"]
    for name in args.models:
        s = build_seconds(name, args.rounds)
        print(name, s, flush=True)
        lines.append(f"| {name} | {s['before']:.1f} | {s['now']:.1f} | {s['now'] / s['before']:.2f} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
