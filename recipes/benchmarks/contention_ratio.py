"""Does a memory-streaming neighbour change how much faster a merged network is? (issue 12)

On a shared host, other tenants contend for the last-level cache and memory bandwidth, not only
for cores. This recipe builds ``--model``'s 1-thread eager table (``latency_models.py``), takes the
DP plan at budget 0.5 (L1 stand-in importance) and three random merge plans (seed 0), and measures
each merged against the BN-folded original side by side (``report.side_by_side``, thread CPU clock)
in ``--rounds`` rounds of two conditions: nothing else running, and a second process on the other
core copying a 64 MiB array back and forth (``STREAM``: memory traffic, little compute). The timing
thread keeps its core either way; what changes is the cache and memory bandwidth it gets.

    python recipes/benchmarks/contention_ratio.py --model digits-mbv2

Results: ``results/latency_causes.md`` section 17.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import warnings

from latency_check import dp_and_random_plans
from latency_models import MODELS, build

from lightning_layermerge import LatencySettings, build_latency_table, fold_batchnorm, merge, prune, trace
from lightning_layermerge.planning.report import side_by_side

STREAM = """
import time
import numpy as np
a = np.ones(64 * 2**20 // 8)
b = np.empty_like(a)
end = time.time() + 600
while time.time() < end:
    np.copyto(b, a)
    np.copyto(a, b)
"""


def ratios(folded, merged: list, example, settings: LatencySettings, stream: bool) -> list[float]:
    """Each merged network's side-by-side ratio to ``folded``, with or without the streaming neighbour."""
    neighbour = subprocess.Popen([sys.executable, "-c", STREAM]) if stream else None
    try:
        if neighbour is not None:
            time.sleep(1.0)  # let it start streaming
        return [side_by_side({"original": folded, "plan": m}, example, settings).ratio["plan"] for m in merged]
    finally:
        if neighbour is not None:
            neighbour.kill()
            neighbour.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-mbv2", choices=sorted(MODELS))
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    warnings.simplefilter("ignore")
    model, example = build(a.model, 0)
    chain = trace(model, example)
    settings = LatencySettings(threads=1)
    table = build_latency_table(model, chain, settings, progress=False)
    plans = dp_and_random_plans(table, chain)
    folded = fold_batchnorm(model, chain)
    merged = [merge(prune(model, chain, plan)) for plan in plans]
    measured: dict[str, list[list[float]]] = {"quiet": [], "stream": []}
    for r in range(a.rounds):
        for condition in measured:
            measured[condition].append(ratios(folded, merged, example, settings, condition == "stream"))
            print(r, condition, " ".join(f"{x:.3f}" for x in measured[condition][-1]), flush=True)
    print(a.model, "priced (DP 0.5, random 0-2)",
          " ".join(f"{table.predicted_ms(plan.keys) / table.total_ms:.3f}" for plan in plans))
    for condition, rows in measured.items():
        print(a.model, condition, "median", " ".join(f"{statistics.median(row[i] for row in rows):.3f}"
                                                      for i in range(len(plans))))


if __name__ == "__main__":
    main()
