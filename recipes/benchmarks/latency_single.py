"""One DP plan's merges, one at a time: predicted vs measured saving (issue 12 experiment).

For each budget, the DP plan (L1 stand-in importance) and then, for every segment it changes,
the network with only that segment replaced: predicted saving (table) vs measured saving
(side by side with the BN-folded original, median of 3). Quiet machine only:

    python recipes/benchmarks/latency_single.py digits-mbv2 0.9 0.5
"""
import statistics
import sys
import tempfile

import torch

from latency_models import build
from latency_check import l1_importance
from lightning_layermerge import LatencySettings, Plan, build_latency_table, fold_batchnorm, merge, prune, solve, trace
from lightning_layermerge.planning import side_by_side
torch.set_num_threads(1)
name = sys.argv[1]
model, example = build(name); model.eval()
chain = trace(model, example)
s = LatencySettings()
table = build_latency_table(model, chain, s, cache_dir=tempfile.mkdtemp(), progress=False)
folded = fold_batchnorm(model, chain)
keep = set(Plan.keep_all(chain).keys)
def pred(plan):
    return table.predicted_ms(plan.keys) / table.total_ms
def meas(plan):
    m = merge(prune(model, chain, plan))
    return statistics.median(side_by_side({"original": folded, "p": m}, example, s).ratio["p"] for _ in range(3))
for b in map(float, sys.argv[2:]):
    sol = solve(table.entries, l1_importance(chain), chain.num_layers, table.budget_for(b))
    plan = Plan.from_segments(chain, sol.segments)
    print(f"budget {b}: plan pred {pred(plan):.4f} meas {meas(plan):.4f}", flush=True)
    for seg in plan.segments:
        if seg.key in keep: continue
        p1 = Plan.replacing(chain, seg)
        pr, me = pred(p1), meas(p1)
        print(f"  {seg.key} convs {seg.convs} act {seg.activation} identity {seg.identity}: "
              f"pred saving {1-pr:.4f} measured saving {1-me:.4f}  alone {table.alone[seg.key]:.4f} entry {table.entries[seg.key]:.4f} ms; total {table.total_ms:.3f}", flush=True)
