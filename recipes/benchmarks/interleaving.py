"""How should two networks be timed side by side? Three protocols compared (issue 12).

A merged plan and the BN-folded original (``latency_models.py``), three random merge plans (seed 0,
``latency_check.random_merge_plan``) or the solved plan at ``--budget``, timed in one process by:

* ``back-to-back``: each network for 30 passes in a row, twice in turn; ratio of the medians
  (what a deployed network sees, but not protected against the machine's drift);
* ``pass``: one pass of each in turn (A, B, A, B, ...); median of the per-pair ratios (what
  ``side_by_side`` did until this comparison);
* ``settled``: one untimed pass before every timed one (A, A*, B, B*, ...); median of the per-pair
  ratios (what ``side_by_side`` does now);
* ``block4``: one untimed and three timed passes of each in turn; ratio of the block medians.

Under the parallel-state gate (ONNX Runtime at more than one thread) each protocol starts in the
fast state. Three rounds; one line per round and protocol.

    python recipes/benchmarks/interleaving.py --model mobilenet_v2-224 --threads all --runtime onnxruntime

Measured on this project's 2-vCPU VM: ``results/latency_causes.md`` section 12.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch


def _ms(call: Callable[[], object]) -> float:
    start = time.perf_counter()
    call()
    return (time.perf_counter() - start) * 1e3


def protocols(calls: dict[str, Callable[[], object]]) -> dict[str, dict[str, float]]:
    """Each network's ratio to ``calls["original"]`` under each protocol (see the module docstring)."""
    def pairs(times: dict[str, list[float]]) -> dict[str, float]:
        return {k: statistics.median(a / b for a, b in zip(v, times["original"])) for k, v in times.items()}

    out = {}
    b2b: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(2):
        for k, call in calls.items():
            call()
            b2b[k] += [_ms(call) for _ in range(30)]
    out["back-to-back"] = {k: statistics.median(v) / statistics.median(b2b["original"]) for k, v in b2b.items()}
    for name, untimed, timed in (("pass", 0, 1), ("settled", 1, 1), ("block4", 1, 3)):
        times: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(60 // timed):
            for k, call in calls.items():
                for _ in range(untimed):
                    call()
                times[k].append(statistics.median(_ms(call) for _ in range(timed)))
        out[name] = pairs(times)
    return out


def main() -> None:
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from latency_check import dp_plans, random_merge_plan
    from latency_models import build

    from lightning_layermerge import LatencySettings, build_latency_table, fold_batchnorm, merge, prune, trace
    from lightning_layermerge.planning.tables.parallel_gate import gate_for
    from lightning_layermerge.planning.tables.timing import _prepare, timing_environment

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="mobilenet_v2-224")
    p.add_argument("--threads", default="all", help="an integer or 'all'")
    p.add_argument("--runtime", default="onnxruntime", choices=["eager", "torchscript", "onnxruntime"])
    p.add_argument("--budget", type=float, default=None, help="time the solved plan at this budget instead")
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    model, example = build(args.model, 0)
    chain = trace(model, example)
    settings = LatencySettings(threads=None if args.threads == "all" else int(args.threads), runtime=args.runtime)
    if args.budget is not None:
        table = build_latency_table(model, chain, settings, progress=False)
        plans = {f"dp{args.budget:g}": plan for _, plan in dp_plans(table, chain, budgets=(args.budget,))}
    else:
        rng = random.Random(0)
        plans = {f"random{n}": random_merge_plan(chain, rng) for n in range(3)}
    nets = {"original": fold_batchnorm(model, chain), **{k: merge(prune(model, chain, v)) for k, v in plans.items()}}
    gate = gate_for(settings)
    with timing_environment(settings), torch.no_grad():
        calls = {k: _prepare(net, tuple(example), settings) for k, net in nets.items()}
        for call in calls.values():
            for _ in range(settings.warmup):
                call()
        for rnd in range(args.rounds):
            if gate is not None:
                gate.wait()
            out = protocols(calls)
            print(f"round {rnd}: original {statistics.median(_ms(calls['original']) for _ in range(10)):.3f} ms")
            for name, ratios in out.items():
                print(f"  {name:12s} " + " ".join(f"{k} {v:.4f}" for k, v in ratios.items() if k != "original"),
                      flush=True)


if __name__ == "__main__":
    main()
