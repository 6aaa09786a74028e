"""Entries timed in rounds over the whole build vs one after another: does it steady the prices? (issue 12)

On a VM whose speed drifts within seconds, entries timed one after another see different machine
speeds. Here every segment geometry, the whole BN-folded network and its node-by-node pass are
timed in ``rounds`` rounds spread over the build (each round: every geometry, shuffled, 2 untimed
+ 3 timed passes, median; the network likewise; 3 node passes), each timing the median over the
rounds, priced as the default table does (``in_context``, ``with_skip_costs``). ``builds`` times,
alternating with a default build (``build_latency_table``, no cache, 1 thread), each pair followed by
one side-by-side measurement of the same four plans (the DP plan at 0.5 with the L1 stand-in
importance of the first default table, three random merge plans, seed 0).

    python recipes/benchmarks/round_robin_table.py --model digits-mbv2 --builds 4 --rounds 10

Results: ``results/latency_causes.md`` section 17.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
import warnings
from collections.abc import Callable

import torch
from latency_check import dp_and_random_plans
from latency_models import MODELS, build

from lightning_layermerge import LatencySettings, Plan, build_latency_table, fold_batchnorm, merge, prune, trace
from lightning_layermerge.planning.report import side_by_side
from lightning_layermerge.planning.tables.pricing import (_in_place_layers, _scaled_to, in_context, skip_costs,
                                                          with_skip_costs)
from lightning_layermerge.planning.tables.segment_modules import _geometry, _segment_run, _whole_run
from lightning_layermerge.planning.tables.timing import _clock, _node_pass, _timed_call, timing_environment

UNTIMED, TIMED = 2, 3  # passes per geometry and round


def _median_of(call: Callable[[], object], settings: LatencySettings) -> float:
    """``UNTIMED`` untimed calls, then the median of ``TIMED`` timed ones (ms)."""
    for _ in range(UNTIMED):
        call()
    return statistics.median(_timed_call(call, settings.torch_device, _clock(settings))[1] for _ in range(TIMED))


def round_robin_prices(model, chain, settings: LatencySettings, rounds: int) -> Callable[[Plan], float]:
    """Every geometry, the whole network and its node pass timed in ``rounds`` rounds; the plan pricer."""
    runs, keys = {}, {}
    for seg in chain.segments:
        geometry = _geometry(seg)
        keys.setdefault(geometry, []).append(seg.key)
        if geometry not in runs and not (seg.identity and seg.activation is None):
            module, inputs = _segment_run(chain, seg, settings)
            runs[geometry] = (module.eval(), inputs)
    whole, args = _whole_run(model, chain, settings)
    whole.eval()
    args = args if isinstance(args, tuple) else (args,)
    samples: dict[tuple, list[float]] = {g: [] for g in runs}
    totals: list[float] = []
    nodes: dict[str, list[float]] = {}
    with timing_environment(settings), torch.no_grad():
        for r in range(rounds):
            order = list(runs)
            random.Random(r).shuffle(order)
            for geometry in order:
                module, inputs = runs[geometry]
                samples[geometry].append(_median_of(lambda: module(*inputs), settings))
            totals.append(_median_of(lambda: whole(*args), settings))
            for _ in range(TIMED):
                for name, ms in _node_pass(whole, args, settings.torch_device, None, _clock(settings))[0].items():
                    nodes.setdefault(name, []).append(ms)
    alone = {k: statistics.median(samples[g]) if g in samples else 0.0 for g, ks in keys.items() for k in ks}
    total = statistics.median(totals)
    placed = _scaled_to({name: statistics.median(v) for name, v in nodes.items()}, total)
    entries = with_skip_costs(chain, in_context(chain, alone, _in_place_layers(chain, placed)), skip_costs(chain, placed))
    keep_all = sum(entries[k] for k in Plan.keep_all(chain).keys)
    return lambda plan: (total - keep_all + sum(entries[k] for k in plan.keys)) / total


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="digits-mbv2", choices=sorted(MODELS))
    p.add_argument("--builds", type=int, default=4)
    p.add_argument("--rounds", type=int, default=10)
    a = p.parse_args()
    warnings.simplefilter("ignore")
    model, example = build(a.model, 0)
    model.eval()
    chain = trace(model, example)
    settings = LatencySettings(threads=1)
    folded = fold_batchnorm(model, chain)
    plans: list[Plan] = []
    prices: dict[str, list[list[float]]] = {"default": [], "rounds": []}
    measured: list[list[float]] = []
    for b in range(a.builds):
        start = time.perf_counter()
        table = build_latency_table(model, chain, settings, progress=False)
        default_s = time.perf_counter() - start
        if not plans:
            plans = dp_and_random_plans(table, chain)
            merged = [merge(prune(model, chain, plan)) for plan in plans]
        prices["default"].append([table.predicted_ms(plan.keys) / table.total_ms for plan in plans])
        start = time.perf_counter()
        pricer = round_robin_prices(model, chain, settings, a.rounds)
        rounds_s = time.perf_counter() - start
        prices["rounds"].append([pricer(plan) for plan in plans])
        measured.append([side_by_side({"original": folded, "plan": m}, example, table.settings).ratio["plan"]
                         for m in merged])
        print(f"build {b}: default {default_s:.1f} s " + " ".join(f"{x:.3f}" for x in prices["default"][-1])
              + f" | rounds {rounds_s:.1f} s " + " ".join(f"{x:.3f}" for x in prices["rounds"][-1])
              + " | measured " + " ".join(f"{x:.3f}" for x in measured[-1]), flush=True)
    truth = [statistics.median(m[i] for m in measured) for i in range(len(plans))]
    for kind, table_prices in prices.items():
        errors = [row[i] / truth[i] - 1 for row in table_prices for i in range(len(plans))]
        ranges = [max(row[i] for row in table_prices) / min(row[i] for row in table_prices) - 1 for i in range(len(plans))]
        print(f"{a.model} {kind}: price / median measured - 1: median {statistics.median(errors):+.3f}, within 5 % "
              f"{sum(abs(e) <= 0.05 for e in errors)}/{len(errors)}; build-to-build range per plan "
              + " ".join(f"{x:.1%}" for x in ranges))


if __name__ == "__main__":
    main()
