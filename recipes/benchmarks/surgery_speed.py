"""Wall time of trace, prune and merge on torchvision ResNet-50 (random weights, CPU).

Usage: python recipes/benchmarks/surgery_speed.py [--threads 2] [--random-plans 5]
Writes recipes/benchmarks/results/surgery_speed.md.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from pathlib import Path

import torch
import torchvision

from lightning_layermerge import Plan, merge, prune, trace

RESULTS = Path(__file__).parent / "results"


def _timed(fn):
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--random-plans", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet50().eval()
    x = torch.randn(1, 3, 224, 224)
    rows = []
    chain, t_trace = _timed(lambda: trace(model, x))
    rng = random.Random(0)
    plans = {"keep everything": Plan.keep_all(chain), "remove everything removable": Plan.remove_all(chain)}
    plans.update({f"random plan {n}": Plan.random(chain, rng) for n in range(args.random_plans)})
    for name, plan in plans.items():
        pruned, t_prune = _timed(lambda: prune(model, chain, plan))
        _, t_merge = _timed(lambda: merge(pruned))
        rows.append((name, len(plan.segments), t_trace, t_prune, t_merge, t_trace + t_prune + t_merge))
    lines = [
        "# trace + prune + merge wall time, torchvision ResNet-50",
        "",
        f"Random weights, input 1x3x224x224, CPU, {args.threads} threads, torch {torch.__version__}. "
        "`trace` is measured once and counted in every row. Command: "
        f"`python recipes/benchmarks/surgery_speed.py --threads {args.threads} --random-plans {args.random_plans}`.",
        "",
        "| plan | segments | trace (s) | prune (s) | merge (s) | total (s) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [f"| {n} | {s} | {a:.2f} | {b:.2f} | {c:.2f} | {d:.2f} |" for n, s, a, b, c, d in rows]
    randoms = [r[-1] for r in rows if r[0].startswith("random")]
    if randoms:
        lines += ["", f"Median total over the random plans: {statistics.median(randoms):.2f} s."]
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "surgery_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
