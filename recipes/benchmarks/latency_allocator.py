"""Page faults and pricing: what the allocator regime and the new table pricing change (issue 12).

Two measurements, each in a fresh process of its own (once a process has used the cached regime,
glibc keeps the larger thresholds it leaves behind, so "system" would no longer be the default
regime), 1 thread, thread CPU clock:

1. A 64-channel 3x3 conv at batch 64, 16 px, timed pass by pass with the C library's default
   allocator and inside :func:`~lightning_layermerge.planning.tables.allocator.cached_allocator`:
   median / max ms per pass and minor page faults per pass.
2. For each model (``latency_models.py``) and each allocator regime: the latency table with
   ``LatencySettings(threads=1, allocator=...)``, the DP plans at two budgets (L1 stand-in
   importance) and random merge plans, each measured 3 times side by side against the BN-folded
   original; predicted vs measured ratio.

    python recipes/benchmarks/latency_allocator.py --models digits-resnet digits-mbv2 resnet18-s16

Writes ``recipes/benchmarks/results/latency_allocator.md``.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn

from latency_check import l1_importance, random_merge_plan
from latency_models import build

from lightning_layermerge import Plan, merge, prune, solve, trace
from lightning_layermerge.planning.tables.allocator import cached_allocator
from lightning_layermerge.planning.tables.latency import (
    LatencySettings,
    build_latency_table,
    interleaved_samples,
)

HERE = Path(__file__).resolve().parent


def conv_passes(cached: bool, passes: int = 60) -> dict:
    """Per-pass thread CPU time and minor page faults of one conv, in one allocator regime."""
    conv = nn.Conv2d(64, 64, 3, padding=1).eval()
    x = torch.randn(64, 64, 16, 16)
    times, faults = [], []
    with cached_allocator(cached), torch.no_grad():
        for _ in range(10):
            conv(x)
        for _ in range(passes):
            f0, t0 = resource.getrusage(resource.RUSAGE_THREAD).ru_minflt, time.thread_time()
            conv(x)
            t1, f1 = time.thread_time(), resource.getrusage(resource.RUSAGE_THREAD).ru_minflt
            times.append((t1 - t0) * 1e3)
            faults.append(f1 - f0)
    return {"median": statistics.median(times), "max": max(times), "faults": statistics.mean(faults)}


def model_rows(name: str, allocator: str, budgets: list[float], random_plans: int) -> list[dict]:
    """Predicted vs measured ratio of DP and random plans for one model and allocator regime."""
    model, example = build(name)
    chain = trace(model, example)
    settings = LatencySettings(threads=1, allocator=allocator)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        table = build_latency_table(model, chain, settings, progress=False)
    build_s = time.perf_counter() - start
    plans: dict[str, Plan] = {}
    for budget in budgets:
        try:
            sol = solve(table.entries, l1_importance(chain), chain.num_layers, table.budget_for(budget),
                        method="layermerge")
            plans[f"DP {budget:g}"] = Plan.from_segments(chain, sol.segments)
        except ValueError:
            pass  # budget below this model's reachable floor
    rng = random.Random(0)
    for r in range(random_plans):
        plans[f"random {r}"] = random_merge_plan(chain, rng)
    folded = merge(prune(model, chain, Plan.keep_all(chain)))
    rows = []
    for label, plan in plans.items():
        merged = merge(prune(model, chain, plan))
        ratios = []
        for _ in range(3):
            base, ours = interleaved_samples([(folded, example), (merged, example)], table.settings)
            ratios.append(statistics.median(o / b for o, b in zip(ours, base)))
        measured = statistics.median(ratios)
        predicted = table.predicted_ms(plan.keys) / table.total_ms
        rows.append({"model": name, "allocator": allocator, "plan": label, "segments": len(plan.segments),
                     "predicted": predicted, "measured": measured, "error": measured / predicted - 1,
                     "spread": (max(ratios) - min(ratios)) / measured, "total_ms": table.total_ms,
                     "build_s": build_s})
        print(f"{name} {allocator} {label}: predicted {predicted:.3f} measured {measured:.3f} "
              f"({measured / predicted - 1:+.1%})", file=sys.stderr, flush=True)
    return rows


def _in_child(task: list) -> object:
    """Run ``task`` (``["conv", regime]`` or ``["model", name, regime, budgets, random_plans]``) in a fresh process."""
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(task)], check=True, stdout=subprocess.PIPE,
                         text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits-resnet", "digits-mbv2", "resnet18-s16"])
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--random-plans", type=int, default=3)
    p.add_argument("--out", type=Path, default=HERE / "results" / "latency_allocator.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.child:
        task = json.loads(args.child)
        result = conv_passes(task[1] == "cached") if task[0] == "conv" else model_rows(*task[1:])
        print(json.dumps(result))
        return 0
    conv = {regime: _in_child(["conv", regime]) for regime in ("system", "cached")}
    rows = [r for name in args.models for allocator in ("system", "cached")
            for r in _in_child(["model", name, allocator, args.budgets, args.random_plans])]
    lines = ["# Allocator regime and table pricing (issue 12)", "",
             f"Command: `python recipes/benchmarks/latency_allocator.py --models {' '.join(args.models)} --budgets "
             f"{' '.join(f'{b:g}' for b in args.budgets)} --random-plans {args.random_plans}`; 1 thread, thread CPU "
             f"clock; torch {torch.__version__}.", "",
             "## One conv (64 channels, 3x3, batch 64, 16 px), 60 passes", "",
             "| allocator | median ms | max ms | minor page faults per pass |", "|---|---:|---:|---:|"]
    for regime, c in conv.items():
        lines.append(f"| {regime} | {c['median']:.2f} | {c['max']:.2f} | {c['faults']:.0f} |")
    lines += ["", "## Plans: predicted vs measured ratio (measured: median of 3 side-by-side runs)", "",
              "| model | allocator | plan | segments | predicted | measured | error | spread of 3 | original ms | "
              "table build s |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['allocator']} | {r['plan']} | {r['segments']} | {r['predicted']:.3f} | "
                     f"{r['measured']:.3f} | {r['error']:+.1%} | {r['spread']:.1%} | {r['total_ms']:.2f} | "
                     f"{r['build_s']:.1f} |")
    lines += ["", "| allocator | rows | within 5 % | within 10 % | median abs error |", "|---|---:|---:|---:|---:|"]
    for regime in ("system", "cached"):
        errs = [abs(r["error"]) for r in rows if r["allocator"] == regime]
        lines.append(f"| {regime} | {len(errs)} | {sum(e <= 0.05 for e in errs)} | {sum(e <= 0.10 for e in errs)} | "
                     f"{statistics.median(errs):.1%} |")
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
