"""The same plan measured in separate processes: is the measured ratio repeatable? (issue 12)

For each model (``latency_models.py``) the parent builds the latency table once with
``LatencySettings(threads=..., runtime=...)`` (otherwise defaults), solves the DP at
``--budget`` with the L1 stand-in importance of ``latency_check.py`` and writes the plan's
segment keys; then ``--procs`` fresh processes, one after the other, each rebuild the same
network (same seed), apply the plan and measure it against the BN-folded original with
``planning.side_by_side.side_by_side`` (interleaved, the same settings). Reported: each process's ratio,
their median and spread ``(max - min) / median`` (acceptance: <= 3 % on a quiet machine).

    python recipes/benchmarks/latency_repeat.py --models resnet18-s16 digits-resnet

Writes ``recipes/benchmarks/results/latency_repeat.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _settings(threads: str, runtime: str):
    from lightning_layermerge import LatencySettings

    return LatencySettings(threads=1 if threads == "1" else None, runtime=runtime)


def child(model_name: str, keys: list, threads: str, runtime: str, seed: int) -> None:
    from latency_models import build

    from lightning_layermerge import Plan, fold_batchnorm, merge, prune, trace
    from lightning_layermerge.planning import side_by_side

    model, example = build(model_name, seed)
    chain = trace(model, example)
    plan = Plan.from_segments(chain, [tuple(k) for k in keys])
    folded = fold_batchnorm(model, chain)
    merged = merge(prune(model, chain, plan))
    timed = side_by_side({"original": folded, "plan": merged}, example, _settings(threads, runtime))
    print(json.dumps({"ratio": timed.ratio["plan"], "spread": timed.spread["plan"], "note": timed.load_note or ""}))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["resnet18-s16", "digits-resnet"])
    p.add_argument("--budget", type=float, default=0.5)
    p.add_argument("--procs", type=int, default=5)
    p.add_argument("--threads", default="1", choices=("1", "all"))
    p.add_argument("--runtime", default="eager", choices=("eager", "onnxruntime"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=HERE / "results" / "latency_repeat.md")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        model_name, keys = json.loads(args.child)
        child(model_name, keys, args.threads, args.runtime, args.seed)
        return 0

    from latency_check import l1_importance
    from latency_models import build

    from lightning_layermerge import Plan, build_latency_table, solve, trace

    lines = ["# The same plan measured in separate processes (issue 12)", "",
             f"Command: `python recipes/benchmarks/latency_repeat.py --models {' '.join(args.models)} --budget "
             f"{args.budget:g} --procs {args.procs} --threads {args.threads} --runtime {args.runtime}`; "
             f"load average before: {os.getloadavg()[0]:.2f}.", "",
             "| model | threads | runtime | plan (DP at budget) | predicted | measured ratio per process | median | "
             "spread (max-min)/median | within 3 % |", "|---|---|---|---|---:|---|---:|---:|:---:|"]
    for name in args.models:
        start = time.perf_counter()
        model, example = build(name, args.seed)
        chain = trace(model, example)
        table = build_latency_table(model, chain, _settings(args.threads, args.runtime), progress=False)
        sol = solve(table.entries, l1_importance(chain), chain.num_layers, table.budget_for(args.budget))
        plan = Plan.from_segments(chain, sol.segments)
        predicted = table.predicted_ms(plan.keys) / table.total_ms
        ratios = []
        for n in range(args.procs):
            out = subprocess.run([sys.executable, __file__, "--child", json.dumps([name, plan.keys]),
                                  "--threads", args.threads, "--runtime", args.runtime, "--seed", str(args.seed)],
                                 capture_output=True, text=True, check=True)
            res = json.loads(out.stdout.strip().splitlines()[-1])
            ratios.append(res["ratio"])
            print(f"{name} process {n}: {res['ratio']:.4f} (in-process spread {res['spread']:.1%}) {res['note']}",
                  flush=True)
        med = statistics.median(ratios)
        spr = (max(ratios) - min(ratios)) / med
        lines.append(f"| {name} | {args.threads} | {args.runtime} | {args.budget:g} ({len(plan.keys)} segments) | "
                     f"{predicted:.3f} | {', '.join(f'{r:.3f}' for r in ratios)} | {med:.3f} | {spr:.1%} | "
                     f"{'yes' if spr <= 0.03 else 'no'} |")
        print(f"{name}: median {med:.4f} spread {spr:.1%} ({time.perf_counter() - start:.0f} s)", flush=True)
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
