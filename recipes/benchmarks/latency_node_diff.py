"""Node by node: the BN-folded original vs the network with one segment merged (issue 12 experiment).

Every operation of both networks timed in place (median of 5 node-by-node passes) and the whole
passes (median of 5); prints the nodes whose time changed by more than 4 us. Quiet machine only:

    python recipes/benchmarks/latency_node_diff.py digits-mbv2 3 5 3
"""
import statistics
import sys

import torch

from latency_check import median_node_times
from latency_models import build
from lightning_layermerge import LatencySettings, Plan, fold_batchnorm, merge, prune, trace
from lightning_layermerge.planning.tables.segment_modules import batched_example
from lightning_layermerge.planning.tables.timing import time_module, timing_environment
torch.set_num_threads(1)
model, example = build(sys.argv[1]); model.eval()
chain = trace(model, example)
s = LatencySettings()
x = batched_example(chain, s.batch_size)
folded = fold_batchnorm(model, chain)
seg = chain.segment(*map(int, sys.argv[2:5]))
plan = merge(prune(model, chain, Plan.replacing(chain, seg)))
with timing_environment(s):
    a, b = median_node_times(folded, x, s, 5), median_node_times(plan, x, s, 5)
    wa = statistics.median(time_module(folded, x, s) for _ in range(5))
    wb = statistics.median(time_module(plan, x, s) for _ in range(5))
print(f"whole: original {wa:.4f} plan {wb:.4f} saving {wa-wb:.4f} ms; node sums {sum(a.values()):.4f} {sum(b.values()):.4f}")
for n in list(dict.fromkeys(list(a) + list(b))):
    va, vb = a.get(n), b.get(n)
    if va is None or vb is None or abs(va - vb) > 0.004:
        print(f"  {n:28s} orig {va if va is None else round(va,4)} plan {vb if vb is None else round(vb,4)}")
