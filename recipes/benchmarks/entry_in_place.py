"""Merged entries as priced vs as they run inside the merged network (issue 12, pricing data).

For each ``--models`` network (``latency_models.py``): the default latency table (``LatencySettings()``,
1 thread, eager), its DP plans at budgets 0.4-0.9 (L1 stand-in importance) and ``--random-plans``
random merge plans (seed 0); every plan is merged and timed operation by operation in place (median
of 5 node-by-node passes, rescaled to the median whole pass, as the table's build does for the
original). For every segment of a plan that replaces more than one layer, one JSON line: its key and
geometry (multiply-adds, weight elements, input and output elements), its time alone, its price
under the eager default (``factor``: :func:`in_context`) and the additive correction
(:func:`in_context_additive`), and its time in place (merged conv + the activation after it); also the
network's keep-all in-place / alone ratio and the alone and in-place sums of the layers the entry replaces.
Residual additions are left out on both sides (they are priced separately).

The lines let any pricing model be scored per entry, offline, without the whole-network noise:

    python recipes/benchmarks/entry_in_place.py --models digits-mbv2 mobilenet_v2-224 efficientnet_b0-64
    python recipes/benchmarks/entry_in_place.py --report-only

Writes ``results/entry_in_place.jsonl`` (appends) and prints, per network, the median and worst
error of each price against the in-place time. Quiet machine only.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
JSONL = HERE / "results" / "entry_in_place.jsonl"
PRICES = ("factor", "additive", "alone")


def measure(name: str, random_plans: int) -> list[dict]:
    """One JSON-able row per merged segment of every plan of network ``name``."""
    import random

    from latency_check import default_table, dp_plans, median_node_times, random_merge_plan

    from lightning_layermerge import Plan, merge, prune
    from lightning_layermerge.planning.tables.latency_timer import _flops
    from lightning_layermerge.planning.tables.pricing import _scaled_to, in_context, in_context_additive
    from lightning_layermerge.planning.tables.segment_modules import batched_example
    from lightning_layermerge.planning.tables.timing import time_module, timing_environment

    base = default_table(name)
    model, chain, table = base.model, base.chain, base.table
    alone = dict(table.alone)
    keep = {s.j: s for s in Plan.keep_all(chain).segments if not s.identity}
    layer_alone = {l: alone[s.key] for l, s in keep.items()}
    layer_in_place = {l: base.in_place.get(l, layer_alone[l]) for l in keep}
    network_ratio = sum(layer_in_place.values()) / sum(layer_alone.values())
    factor = in_context(chain, alone, base.in_place)
    additive = in_context_additive(chain, alone, base.in_place)
    rng = random.Random(0)
    plans = dp_plans(table, chain, label=name) + [(f"random{n}", random_merge_plan(chain, rng))
                                                   for n in range(random_plans)]
    settings = table.settings
    x = batched_example(chain, settings.batch_size)
    rows, seen = [], set()
    for label, plan in plans:
        merged = merge(prune(model, chain, plan))
        with timing_environment(settings):
            nodes = _scaled_to(median_node_times(merged, x, settings, 5),
                               statistics.median(time_module(merged, x, settings) for _ in range(5)))
        for seg in plan.segments:
            if seg.j - seg.i < 2 or seg.identity or seg.key in seen:
                continue
            conv = nodes.get(f"merged_{seg.i}_{seg.j}")
            if conv is None:
                continue
            seen.add(seg.key)
            act = chain.positions[seg.j].activation
            in_place = conv + (nodes.get(act, 0.0) if act is not None else 0.0)
            weights = seg.out_shape[1] * (seg.in_shape[1] // seg.groups) * seg.kernel * seg.kernel
            row = {"model": name, "plan": label, "key": list(seg.key), "layers": seg.j - seg.i,
                   "macs": _flops(seg), "weights": weights, "in_elements": math.prod(seg.in_shape),
                   "out_elements": math.prod(seg.out_shape), "in_place": in_place, "alone": alone[seg.key],
                   "factor": factor[seg.key], "additive": additive[seg.key], "network_ratio": network_ratio,
                   "replaced_alone": sum(layer_alone.get(l, 0.0) for l in range(seg.i + 1, seg.j + 1)),
                   "replaced_in_place": sum(layer_in_place.get(l, 0.0) for l in range(seg.i + 1, seg.j + 1))}
            rows.append(row)
            print(f"{name} {label} {seg.key}: in place {in_place:.4f} alone {row['alone']:.4f} "
                  f"factor {row['factor']:.4f} additive {row['additive']:.4f}", flush=True)
    return rows


def summary(rows: list[dict]) -> str:
    """Per network and price: median and worst (price - in place) / in place over its merged entries."""
    lines = ["| network | entries | " + " | ".join(f"{p}: median / worst" for p in PRICES) + " |",
             "|---|---:|" + "---|" * len(PRICES)]
    for net in list(dict.fromkeys(r["model"] for r in rows)) + ["all"]:
        sel = [r for r in rows if net in ("all", r["model"])]
        cells = []
        for p in PRICES:
            errors = [(r[p] - r["in_place"]) / r["in_place"] for r in sel if r["in_place"] > 0]
            worst = max(errors, key=abs)
            cells.append(f"{statistics.median(errors):+.1%} / {worst:+.1%}")
        lines.append(f"| {net} | {len(sel)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits-resnet", "digits-mbv2", "resnet18-s16"])
    p.add_argument("--random-plans", type=int, default=6)
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    if not args.report_only:
        for name in args.models:
            rows = measure(name, args.random_plans)
            with JSONL.open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in rows)
    print(summary([json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
