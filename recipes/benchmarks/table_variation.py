"""How much does one network's latency table move between builds? (issue 12)

Builds the table of ``--model`` (``latency_models.py``) ``--builds`` times in one process, without a
cache, at ``--threads`` / ``--runtime``, and prices the same plans with each build: the DP plan at
budget 0.5 (L1-norm stand-in importance, solved on the first table) and three random merge plans
(seed 0, ``latency_check.random_merge_plan``). Then measures each plan three times side by side
against the BN-folded original (``report.side_by_side``). Last, for the entries timed alone with a
spread within ``max_spread`` in two builds, the largest ratio between their two values: a timing
that repeats within itself but not from one build to the next.

    python recipes/benchmarks/table_variation.py --model digits-mbv2 --threads all --runtime onnxruntime

Measured on this project's 2-vCPU VM: ``results/latency_causes.md`` section 13.
"""

from __future__ import annotations

import argparse
import time
import warnings

from latency_check import dp_and_random_plans
from latency_models import MODELS, build

from lightning_layermerge import LatencySettings, build_latency_table, fold_batchnorm, merge, prune, trace
from lightning_layermerge.planning.report import side_by_side


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-mbv2", choices=sorted(MODELS))
    p.add_argument("--builds", type=int, default=6)
    p.add_argument("--threads", default="all", help="'all' or a number")
    p.add_argument("--runtime", default="onnxruntime", choices=("eager", "torchscript", "onnxruntime"))
    args = p.parse_args()
    warnings.simplefilter("ignore")
    model, example = build(args.model, 0)
    chain = trace(model, example)
    settings = LatencySettings(threads=None if args.threads == "all" else int(args.threads), runtime=args.runtime)
    tables, plans = [], []
    for b in range(args.builds):
        start = time.perf_counter()
        table = build_latency_table(model, chain, settings, progress=False)
        tables.append(table)
        if not plans:
            plans = dp_and_random_plans(table, chain)
        prices = " ".join(f"{table.predicted_ms(plan.keys) / table.total_ms:.3f}" for plan in plans)
        print(f"build {b}: {time.perf_counter() - start:5.1f} s, whole network {table.total_ms:.3f} ms, "
              f"{len(table.unreliable)} unrepeatable; prices (DP, random 0-2): {prices}", flush=True)
    folded = fold_batchnorm(model, chain)
    for name, plan in zip(["DP", "random 0", "random 1", "random 2"], plans):
        merged = merge(prune(model, chain, plan))
        ratios = [side_by_side({"original": folded, "plan": merged}, example, tables[0].settings).ratio["plan"]
                  for _ in range(3)]
        print(f"{name} measured " + " ".join(f"{r:.3f}" for r in ratios), flush=True)
    limit = settings.max_spread
    worst = (1.0, None)
    for a, b in zip(tables, tables[1:]):
        for key, ms in a.alone.items():
            if a.spreads[key] <= limit and b.spreads[key] <= limit and min(ms, b.alone[key]) > 0:
                worst = max(worst, (max(ms, b.alone[key]) / min(ms, b.alone[key]), key))
    print(f"largest build-to-build ratio of a repeatable entry (timed alone): {worst[0]:.2f} {worst[1]}")


if __name__ == "__main__":
    main()
