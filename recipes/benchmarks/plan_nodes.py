"""One plan's table prices next to its operations timed in place (issue 12 diagnosis).

Builds the default latency table (``LatencySettings()``: 1 thread, eager, thread CPU clock) of
``--model`` (``latency_models.py``), takes random merge plan ``--plan`` (seed 0,
``latency_check.random_merge_plan``), and prints: the table's total, chain and outside parts; each
of the plan's entries as priced (in context) and as timed alone; then the BN-folded original and the
merged network, each timed whole (median of 5) and operation by operation in place (median of 5
node-by-node passes). Where the price and the measurement part, the node times say which operation
is priced wrong (a merged conv, or the operations after the chain).

    python recipes/benchmarks/plan_nodes.py --model digits-mbv2 --plan 1

Measured on this project's 2-vCPU VM: ``results/latency_causes.md`` section 14.
"""

from __future__ import annotations

import argparse
import random
import statistics
import warnings

from latency_check import default_table, median_node_times, random_merge_plan
from latency_models import MODELS

from lightning_layermerge import Plan, fold_batchnorm, merge, prune
from lightning_layermerge.planning.tables.segment_modules import batched_example
from lightning_layermerge.planning.tables.timing import time_module, timing_environment


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-mbv2", choices=sorted(MODELS))
    p.add_argument("--plan", type=int, default=0, help="which of the first random plans (seed 0)")
    args = p.parse_args()
    warnings.simplefilter("ignore")
    base = default_table(args.model)  # 1 thread, LatencySettings(), a fresh cache
    model, chain, table, settings = base.model, base.chain, base.table, base.table.settings
    rng = random.Random(0)
    plan = [random_merge_plan(chain, rng) for _ in range(args.plan + 1)][-1]
    print(f"table: total {table.total_ms:.4f} ms, chain {table.chain_ms:.4f}, outside {table.outside_ms:.4f}")
    for key in plan.keys:
        print(f"  entry {key}: priced {table.entries[key]:.4f} ms, alone {table.alone[key]:.4f}")
    keep = " ".join(f"{k}:{table.entries[k]:.4f}/{table.alone[k]:.4f}" for k in Plan.keep_all(chain).keys)
    print(f"  keep-all entries (priced/alone): {keep}")
    x = batched_example(chain, settings.batch_size)
    folded, merged = fold_batchnorm(model, chain), merge(prune(model, chain, plan))
    with timing_environment(settings):
        nodes = {name: median_node_times(net, x, settings, 5) for name, net in (("original", folded), ("plan", merged))}
        whole = {name: statistics.median(time_module(net, x, settings) for _ in range(5))
                 for name, net in (("original", folded), ("plan", merged))}
    predicted = table.predicted_ms(plan.keys) / table.total_ms
    print(f"whole: original {whole['original']:.4f} ms, plan {whole['plan']:.4f} ms, "
          f"ratio {whole['plan'] / whole['original']:.4f} (priced {predicted:.4f})")
    for name, times in nodes.items():
        print(f"{name} in place (sum {sum(times.values()):.4f} ms): "
              + " ".join(f"{k}:{v:.4f}" for k, v in times.items()))


if __name__ == "__main__":
    main()
