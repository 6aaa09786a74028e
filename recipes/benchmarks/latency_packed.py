"""Pricing merged entries by timing them in place, packed into a few plans (issue 12 experiment).

For one network: the default table (factor pricing); then every merged entry (more than one
layer, not an identity) timed in place in a network that merges a packed set of disjoint
merged entries (node-by-node pass, scaled by the keep-all pass's node-overhead factor).
Plans (DP + random) measured side by side (median of 3); predictions: factor (the default),
packed, and hybrids that use the packed price only where factor and additive pricing disagree
by more than 5 / 10 / 20 %. Quiet machine only (nothing else may run):

    python recipes/benchmarks/latency_packed.py digits-mbv2 mobilenet_v2-224

Appends to ``results/latency_packed.jsonl``; per-entry prices to ``results/latency_packed_<net>.json``.
"""
import json
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

from latency_check import default_table, measured_plans, median_node_times, predicted_ratio
from lightning_layermerge import Plan, fold_batchnorm, merge, prune
from lightning_layermerge.planning.tables.pricing import in_context, in_context_additive, with_skip_costs
from lightning_layermerge.planning.tables.segment_modules import batched_example
from lightning_layermerge.planning.tables.timing import timing_environment


RESULTS = Path(__file__).resolve().parent / "results"


def packed_plans(chain, keys):
    """Few plans whose segments cover ``keys`` (greedy: at each position the shortest uncovered entry)."""
    remaining = set(keys)
    by_start = defaultdict(list)
    for k in keys:
        by_start[k[0]].append(k)
    keep = {s.i: s.key for s in Plan.keep_all(chain).segments}
    plans = []
    while remaining:
        at, specs = 0, []
        while at < chain.num_layers:
            cands = sorted((k for k in by_start[at] if k in remaining), key=lambda k: (k[1], -k[2]))
            key = cands[0] if cands else keep[at]
            remaining.discard(key)
            specs.append(key)
            at = key[1]
        plans.append(Plan.from_segments(chain, specs))
    return plans


def segment_nodes(chain, seg, nodes):
    """In-place ms of a merged segment: its conv, its activation and any bias terms after it."""
    act = chain.positions[seg.j].activation
    ms = nodes.get(f"merged_{seg.i}_{seg.j}", 0.0) + (nodes.get(act, 0.0) if act else 0.0)
    ms += sum(v for n, v in nodes.items() if n.startswith(f"merged_{seg.i}_{seg.j}_bias"))
    return ms


def main(name, random_plans=5, rounds=3):
    """Table, packed in-place prices, plans and every pricing's prediction for one network."""
    base = default_table(name)
    model, example, chain, table, t_table = base.model, base.example, base.chain, base.table, base.build_s
    in_place, costs, settings = base.in_place, base.skip_costs, table.settings
    alone = dict(table.alone)
    factor_ctx = in_context(chain, alone, in_place)
    merged_keys = [s.key for s in chain.segments if s.j - s.i > 1 and not s.identity]
    inputs = batched_example(chain, settings.batch_size)
    t0 = time.perf_counter()
    with timing_environment(settings):
        scale = table.total_ms / sum(median_node_times(fold_batchnorm(model, chain), inputs, settings, rounds).values())
        plans = packed_plans(chain, merged_keys)
        packed = {}
        for plan in plans:
            nodes = median_node_times(merge(prune(model, chain, plan)), inputs, settings, rounds)
            packed.update({s.key: segment_nodes(chain, s, nodes) * scale for s in plan.segments if s.key in merged_keys})
    t_packed = time.perf_counter() - t0
    ctx_packed = dict(factor_ctx)
    ctx_packed.update(packed)
    additive = in_context_additive(chain, alone, in_place)
    entries = {"factor": with_skip_costs(chain, factor_ctx, costs), "packed": with_skip_costs(chain, ctx_packed, costs)}
    for thr in (0.05, 0.1, 0.2):
        hyb = dict(factor_ctx)
        sel = [k for k in packed if factor_ctx[k] > 0 and abs(additive[k] - factor_ctx[k]) / factor_ctx[k] > thr]
        hyb.update({k: packed[k] for k in sel})
        entries[f"hyb{thr}"] = with_skip_costs(chain, hyb, costs)
        print(f"hybrid {thr}: {len(sel)}/{len(packed)} entries, {len(packed_plans(chain, sel))} plans")
    (RESULTS / f"latency_packed_{name}.json").write_text(json.dumps(
        {str(k): [factor_ctx[k], additive[k], packed[k], alone[k]] for k in packed}))
    print(f"{name}: table {t_table:.1f} s, {len(merged_keys)} merged entries in {len(plans)} packed plans, "
          f"{t_packed:.1f} s; node scale {scale:.3f}", flush=True)
    ratio = [packed[k] / factor_ctx[k] for k in packed if factor_ctx[k] > 0]
    print("packed/factor per entry: median %.3f min %.3f max %.3f" % (statistics.median(ratio), min(ratio), max(ratio)))
    rows = []
    for label, plan, measured in measured_plans(model, chain, table, example, random_plans, label=name):
        row = {"model": name, "plan": label, "measured": measured, **{k: predicted_ratio(table, chain, e, plan) for k, e in entries.items()}}
        rows.append(row)
        print(label, f"measured {measured:.3f}",
              " ".join(f"{k} {row[k]:.3f} ({(measured - row[k]) / row[k]:+.1%})" for k in entries), flush=True)
    out = RESULTS / "latency_packed.jsonl"
    with out.open("a") as f:
        for r in rows:
            f.write(json.dumps({**r, "t_table": t_table, "t_packed": t_packed, "plans": len(plans)}) + "\n")


if __name__ == "__main__":
    for n in sys.argv[1:]:
        main(n)
