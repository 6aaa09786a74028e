"""Do the operations outside the chain cost less in a smaller network? A pricing experiment (issue 12).

The table charges everything outside the chain that no segment carries (stem pooling, average
pool, flatten, classifier, ...) as it runs in the original network. In a network that a plan has shrunk, the same operations run faster
(measured: the digits ResNet's pool + flatten + fc 0.134 ms in the original, 0.030 ms after one
merged conv). This recipe times those operations in place (node by node, rescaled to the whole
pass, as the table's build does) and alone (each called 40 times in a row on its own input, warm),
and compares two prices of every plan against its side-by-side measurement:

* ``factor``: the table as built (the eager default);
* ``tail``: the excess of those operations (in place minus alone) made proportional to the chain:
  every entry x ``(1 + excess / chain_ms)``, the constant part less the excess (the keep-all plan
  keeps its price; a plan of half the chain pays half the excess).

Residual additions and shortcuts are left out (the table already prices them with the segments).
One JSON line per plan is appended to ``results/tail_pricing.jsonl``. Quiet machine, 1 thread.

    python recipes/benchmarks/tail_pricing.py --models digits-resnet digits-mbv2 --random-plans 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from pathlib import Path

import torch
from torch import fx

HERE = Path(__file__).resolve().parent
JSONL = HERE / "results" / "tail_pricing.jsonl"


def alone_node_times(gm: fx.GraphModule, args: tuple, calls: int = 40) -> dict[str, float]:
    """ms of every call node run on its own: ``calls`` timed calls in a row (thread clock), median."""
    env: dict[fx.Node, object] = {}
    out: dict[str, float] = {}
    inputs = iter(args)
    for node in gm.graph.nodes:
        a = fx.node.map_arg(node.args, lambda n: env[n])
        kw = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":
            env[node] = next(inputs)
            continue
        if node.op == "get_attr":
            env[node] = getattr(gm, str(node.target))
            continue
        if node.op == "output":
            break
        if node.op == "call_module":
            fn = lambda m=gm.get_submodule(str(node.target)), a=a, kw=kw: m(*a, **kw)  # noqa: E731
        elif node.op == "call_function":
            fn = lambda t=node.target, a=a, kw=kw: t(*a, **kw)  # noqa: E731
        else:
            fn = lambda t=str(node.target), a=a, kw=kw: getattr(a[0], t)(*a[1:], **kw)  # noqa: E731
        with torch.no_grad():
            env[node] = fn()
            for _ in range(3):
                fn()
            times = []
            for _ in range(calls):
                start = time.thread_time()
                fn()
                times.append((time.thread_time() - start) * 1e3)
        out[node.name] = statistics.median(times)
    return out


def measure(name: str, random_plans: int) -> list[dict]:
    """Both prices and the side-by-side measurement of the DP and random plans of one network."""
    from latency_check import default_table, measured_plans, median_node_times, predicted_ratio

    from lightning_layermerge import Plan, merge, prune
    from lightning_layermerge.planning.tables.pricing import _scaled_to
    from lightning_layermerge.planning.tables.segment_modules import batched_example
    from lightning_layermerge.planning.tables.timing import time_module, timing_environment

    base = default_table(name)
    model, example, chain, table = base.model, base.example, base.chain, base.table
    settings = table.settings
    folded = merge(prune(model, chain, Plan.keep_all(chain)))
    x = batched_example(chain, settings.batch_size)
    args = x if isinstance(x, tuple) else (x,)
    with timing_environment(settings):
        in_place = median_node_times(folded, x, settings, 5)
        in_place = _scaled_to(in_place, statistics.median(time_module(folded, x, settings) for _ in range(5)))
        alone = alone_node_times(folded, tuple(t.clone() for t in args))
    priced_elsewhere = set()
    for seg in Plan.keep_all(chain).segments:
        priced_elsewhere.add(f"merged_{seg.i}_{seg.j}")
        if chain.positions[seg.j].activation is not None:
            priced_elsewhere.add(chain.positions[seg.j].activation)
    for skip in chain.skips:
        priced_elsewhere.update((skip.add, *skip.shortcut))
    tail = [n for n in in_place if n not in priced_elsewhere]
    excess = sum(max(in_place[n] - alone.get(n, in_place[n]), 0.0) for n in tail)
    print(f"{name}: total {table.total_ms:.3f} ms, outside {table.outside_ms:.3f}, tail excess {excess:.3f}; "
          + " ".join(f"{n} {in_place[n]:.4f}/{alone.get(n, 0.0):.4f}" for n in tail) + " (in place/alone ms)")
    prices = {"factor": dict(table.entries),
              "tail": {k: v * (1 + excess / table.chain_ms) for k, v in table.entries.items()}}
    rows = []
    for label, plan, measured in measured_plans(model, chain, table, example, random_plans, label=name):
        row = {"model": name, "plan": label, "measured": measured, "tail_excess_ms": excess,
               **{m: predicted_ratio(table, chain, e, plan) for m, e in prices.items()}}
        print(f"  {label}: measured {measured:.4f}, "
              + ", ".join(f"{m} {row[m]:.4f} ({(measured - row[m]) / row[m]:+.1%})" for m in prices), flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["digits-resnet", "digits-mbv2"])
    p.add_argument("--random-plans", type=int, default=3)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for name in args.models:
        rows = measure(name, args.random_plans)
        with JSONL.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
