"""Why does the latency table mispredict? Causes of the error, measured one by one (CPU).

For each network (``latency_models.py``) the script builds the latency table with the given
settings (default: ``LatencySettings()``, 1 thread, per-thread CPU time), solves the DP at a
few budgets (L1-norm stand-in importance, as ``latency_check.py``) and draws random plans with
merged kernels, then measures, for the BN-folded original and every plan:

* **whole**: one forward pass, timed side by side with the original (median of pass-pair
  ratios; the plan's measured ratio) -- what the user gets;
* **nodes**: every operation timed in place (``time_nodes``), split into merged/chain convs,
  activations and *other* operations (residual additions, shortcut projections, pooling,
  classifier, ...);
* **table**: ``outside_ms + sum(entries)`` -- what the DP believes.

From these the prediction error of each plan is split into

* *context*: chain convs + activations in place vs the same modules timed alone (the table's
  entries): cache state, memory layout, what the neighbours left in cache;
* *outside*: operations outside the chain in the plan vs in the original: what removing a
  conv or folding a shortcut takes with it (an addition, a projection), which the table
  prices as a constant;
* *framework*: whole forward minus the sum of its operations (per-call and ``fx`` overhead
  between operations, which grows with the number of operations).

It also measures the per-call overhead of a module call, the cache-warmth effect on the
table's entries (each keep-all layer timed alone with warm caches, as the table does, and
with a cache flush before every pass), and, for the first plan, the effect of the clock and
thread count under the current machine load: the ratio measured 3 times with 2 threads and
the wall clock, 1 thread and the wall clock, and 1 thread with the thread CPU clock.

Run (about 1-4 minutes per network on 2 cores)::

    python recipes/benchmarks/latency_diagnose.py --models digits-resnet digits-mbv2 resnet18-s16

Writes ``recipes/benchmarks/results/latency_diagnose.md`` (+ ``.json`` with every number, and
``.png``). The machine load during the run is recorded (``/proc/stat``) in the report: run
it on a quiet machine for quiet-machine numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from latency_check import l1_importance, random_merge_plan
from latency_models import MODELS, build

from lightning_layermerge import Chain, Plan, fold_batchnorm, merge, prune, solve, trace
from lightning_layermerge.planning import side_by_side
from lightning_layermerge.planning.tables.latency import (
    LatencySettings,
    LatencyTable,
    batched_example,
    build_latency_table,
    interleaved_samples,
    probe_load,
    segment_module,
    time_nodes,
)

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
ACTIVATIONS = ("relu", "relu6", "silu", "gelu", "sigmoid", "hardswish", "hardsigmoid", "tanh", "mish", "leaky_relu")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["digits-resnet", "digits-mbv2", "resnet18-s16"],
                   choices=sorted(MODELS))
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.7])
    p.add_argument("--random-plans", type=int, default=2)
    p.add_argument("--repeats", type=int, default=30, help="timed passes (table entries and side by side)")
    p.add_argument("--clock-repeats", type=int, default=3, help="repetitions of the clock/threads comparison")
    p.add_argument("--no-context", dest="context", action="store_false",
                   help="price entries as timed alone (LatencySettings(context=False)), the pre-issue-12 model")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default="latency_diagnose")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def _kind(gm: torch.fx.GraphModule, node: torch.fx.Node) -> str:
    """``conv`` (a merged or kept chain conv), ``act`` (an activation) or ``other``."""
    target = str(node.target)
    if node.op == "call_module":
        if target.startswith("merged_"):
            return "conv"
        name = type(gm.get_submodule(target)).__name__.lower()
        return "act" if name in ACTIVATIONS else "other"
    name = getattr(node.target, "__name__", target).lower()
    return "act" if name in ACTIVATIONS else "other"


def node_split(gm: torch.fx.GraphModule, inputs: tuple, settings: LatencySettings) -> dict[str, float]:
    """Sum of in-place operation times (ms) by kind, and their count."""
    times = time_nodes(gm, inputs, settings)
    kinds = {n.name: _kind(gm, n) for n in gm.graph.nodes if n.name in times}
    out = {k: sum(t for n, t in times.items() if kinds[n] == k) for k in ("conv", "act", "other")}
    out["calls"] = len(times)
    return out


def call_overhead_us(settings: LatencySettings) -> float:
    """Thread CPU time of calling an ``nn.Sequential(nn.Identity())`` (µs): the price of a module call."""
    tiny = nn.Sequential(nn.Identity())
    (samples,) = interleaved_samples([(tiny, (torch.zeros(1),))], LatencySettings(warmup=50, repeats=500))
    return statistics.median(samples) * 1e3


def alone_warm_cold(chain: Chain, settings: LatencySettings) -> dict[str, float]:
    """Sum over the keep-all layers of the layer alone: warm caches (as the table) and flushed before each pass."""
    flush = torch.empty(32 * 1024 * 1024 // 4)  # 32 MiB, larger than the last-level cache share
    warm = cold = 0.0
    clock = time.thread_time if settings.clock_used == "thread" else time.perf_counter
    torch.set_num_threads(1)
    with torch.no_grad():
        for seg in Plan.keep_all(chain).segments:
            if seg.identity:
                continue
            module = segment_module(chain, seg).eval()
            x = torch.randn((settings.batch_size or seg.in_shape[0], *seg.in_shape[1:]))
            for _ in range(5):
                module(x)
            w, c = [], []
            for _ in range(max(settings.repeats // 2, 5)):
                t = clock(); module(x); w.append(clock() - t)  # noqa: E702
                flush.add_(1.0)
                t = clock(); module(x); c.append(clock() - t)  # noqa: E702
            warm += statistics.median(w) * 1e3
            cold += statistics.median(c) * 1e3
    return {"warm_ms": warm, "cold_ms": cold}


def plans_for(chain: Chain, table: LatencyTable, args: argparse.Namespace) -> list[tuple[str, Plan]]:
    importance = l1_importance(chain)
    plans = []
    for budget in args.budgets:
        try:
            sol = solve(table.entries, importance, chain.num_layers, table.budget_for(budget), method="layermerge")
        except ValueError as err:  # budget below what the table allows
            print(f"  budget {budget}: {err}", flush=True)
            continue
        plans.append((f"DP {budget:g}", Plan.from_segments(chain, sol.segments)))
    rng = random.Random(args.seed)
    plans += [(f"random {n}", random_merge_plan(chain, rng)) for n in range(args.random_plans)]
    return plans


def diagnose(name: str, args: argparse.Namespace) -> dict:
    """Every measurement for one network."""
    model, example = build(name, args.seed)
    chain = trace(model, example)
    settings = LatencySettings(repeats=args.repeats, context=args.context)
    t0 = time.perf_counter()
    table = build_latency_table(model, chain, settings, progress=False)
    build_s = time.perf_counter() - t0
    inputs = batched_example(chain, None)
    folded = fold_batchnorm(model, chain)
    base_nodes = node_split(folded, inputs, settings)
    out = {"model": name, "layers": chain.num_layers, "entries": len(table.entries), "build_s": build_s,
           "table_total_ms": table.total_ms, "table_chain_ms": table.chain_ms, "table_max_spread": table.max_spread,
           "unreliable": len(table.unreliable), "original_nodes": base_nodes,
           "call_overhead_us": call_overhead_us(settings), "alone": alone_warm_cold(chain, settings), "plans": []}
    print(f"[{name}] L={chain.num_layers}, {len(table.entries)} entries in {build_s:.0f} s; total "
          f"{table.total_ms:.3f} ms, chain {table.chain_ms:.3f} ms, nodes {base_nodes}", flush=True)
    for label, plan in plans_for(chain, table, args):
        merged = merge(prune(model, chain, plan))
        timed = side_by_side({"original": folded, "plan": merged}, inputs, settings)
        nodes = node_split(merged, inputs, settings)
        entries = sum(table.entries[k] for k in plan.keys)
        row = {"plan": label, "segments": len(plan.keys), "predicted": table.predicted_ms(plan.keys) / table.total_ms,
               "measured": timed.ratio["plan"], "spread": timed.spread["plan"], "entries_ms": entries,
               "whole_ms": timed.ms["plan"], "original_whole_ms": timed.ms["original"], "nodes": nodes,
               "keys": [list(k) for k in plan.keys]}
        row["error"] = (row["measured"] - row["predicted"]) / row["predicted"]
        out["plans"].append(row)
        print(f"  {label}: predicted {row['predicted']:.3f} measured {row['measured']:.3f} "
              f"(spread {row['spread']:.1%}) error {row['error']:+.1%}", flush=True)
    if out["plans"]:
        out["clocks"] = clock_comparison(model, chain, folded, out["plans"][0], inputs, args)
    return out


def clock_comparison(model: nn.Module, chain: Chain, folded: nn.Module, row: dict, inputs: tuple,
                     args: argparse.Namespace) -> dict[str, list[float]]:
    """The first plan's ratio measured ``clock_repeats`` times per clock/thread setting, under the current load."""
    merged = merge(prune(model, chain, Plan.from_segments(chain, [tuple(k) for k in row["keys"]])))
    cores = torch.get_num_threads() if torch.get_num_threads() > 1 else 2
    setups = {f"{cores} threads, wall clock": LatencySettings(threads=cores, clock="wall", on_load="ignore",
                                                              repeats=args.repeats, retries=0),
              "1 thread, wall clock": LatencySettings(threads=1, clock="wall", on_load="ignore", repeats=args.repeats,
                                                      retries=0),
              "1 thread, thread CPU clock": LatencySettings(threads=1, clock="thread", on_load="ignore",
                                                            repeats=args.repeats, retries=0)}
    result = {}
    for label, settings in setups.items():
        ratios = []
        for _ in range(args.clock_repeats):
            ratios.append(side_by_side({"original": folded, "plan": merged}, inputs, settings).ratio["plan"])
        result[label] = ratios
        print(f"    {label}: {', '.join(f'{r:.3f}' for r in ratios)}", flush=True)
    return result


def decompose(model_out: dict, row: dict) -> dict[str, float]:
    """The plan's prediction error (as a fraction of the original), split by cause."""
    base = model_out["original_nodes"]
    total = model_out["table_total_ms"]
    whole0 = row["original_whole_ms"]
    n = row["nodes"]
    # Everything in units of "fraction of the original network", each side against its own original.
    in_place_chain = (n["conv"] + n["act"]) / whole0
    table_chain = row["entries_ms"] / total
    outside_change = (n["other"] - base["other"]) / whole0
    framework0 = whole0 - sum(base[k] for k in ("conv", "act", "other"))
    framework = row["whole_ms"] - sum(n[k] for k in ("conv", "act", "other"))
    return {"context": in_place_chain - table_chain, "outside": outside_change,
            "framework": (framework - framework0) / whole0,
            "residual": (row["measured"] - row["predicted"])
            - (in_place_chain - table_chain) - outside_change - (framework - framework0) / whole0}


def load_now() -> str:
    probe = probe_load(1.0)
    return probe.describe()


def write(results: list[dict], args: argparse.Namespace, load_before: str, load_after: str, wall_s: float) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.stem}.json").write_text(json.dumps(results, indent=1))
    lines = [
        "# Why the latency table mispredicts: causes measured one by one",
        "",
        f"Command: `python recipes/benchmarks/latency_diagnose.py --models {' '.join(args.models)}"
        + (f" --repeats {args.repeats}" if args.repeats != 30 else "") + ("" if args.context else " --no-context")
        + (f" --stem {args.stem}" if args.stem != "latency_diagnose" else "") + "`",
        "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; torch {torch.__version__}. "
        f"Load (`/proc/stat`, other processes): before {load_before}, after {load_after}. Whole run {wall_s:.0f} s.",
        "",
        "Table and side-by-side: `LatencySettings()` defaults (1 thread, per-thread CPU time, "
        f"{args.repeats} passes, spread checked), "
        + ("entries priced in context (`context=True`, the default)" if args.context else
           "entries priced as timed alone (`context=False`)") + "; importance: L1 stand-in.",
        "",
        "## Prediction error by cause (fractions of the original latency)",
        "",
        "error = measured ratio - predicted ratio = context + outside + framework + residual. "
        "*context*: chain convs and activations in place minus the table's entries (timed alone); "
        "*outside*: change of the operations outside the chain (additions, shortcut projections, pooling...) "
        "between plan and original; *framework*: change of the time between operations (whole forward minus "
        "the sum of its operations); *residual*: the rest (timing noise, per-node timing overhead).",
        "",
        "| network | plan | segments | predicted | measured | spread | error (rel.) | context | outside | framework | residual |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for res in results:
        for row in res["plans"]:
            d = decompose(res, row)
            lines.append(f"| {res['model']} | {row['plan']} | {row['segments']} | {row['predicted']:.3f} | "
                         f"{row['measured']:.3f} | {row['spread']:.1%} | {row['error']:+.1%} | {d['context']:+.3f} | "
                         f"{d['outside']:+.3f} | {d['framework']:+.3f} | {d['residual']:+.3f} |")
    lines += ["", "## The original network, operation by operation (thread CPU time, ms)", "",
              "| network | L | table build s | table total | table chain | in place: convs | activations | other "
              "| calls | whole forward | per-call overhead µs | keep-all layers alone warm / flushed cache |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for res in results:
        b, a = res["original_nodes"], res["alone"]
        whole0 = res["plans"][0]["original_whole_ms"] if res["plans"] else math.nan
        lines.append(f"| {res['model']} | {res['layers']} | {res['build_s']:.0f} | {res['table_total_ms']:.3f} | "
                     f"{res['table_chain_ms']:.3f} | {b['conv']:.3f} | {b['act']:.3f} | {b['other']:.3f} | "
                     f"{b['calls']} | {whole0:.3f} | {res['call_overhead_us']:.1f} | "
                     f"{a['warm_ms']:.3f} / {a['cold_ms']:.3f} |")
    lines += ["", "## Clock and threads under the load of this run (first plan, ratio measured 3 times each)", "",
              "| network | setting | ratios | spread of the 3 |", "|---|---|---|---:|"]
    for res in results:
        for label, ratios in res.get("clocks", {}).items():
            s = (max(ratios) - min(ratios)) / statistics.median(ratios)
            lines.append(f"| {res['model']} | {label} | {', '.join(f'{r:.3f}' for r in ratios)} | {s:.1%} |")
    (args.out / f"{args.stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(results, args.out / f"{args.stem}.png")


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [(res["model"], row) for res in results for row in res["plans"]]
    if not rows:
        return
    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4))
    causes = ("context", "outside", "framework", "residual")
    bottoms_pos = [0.0] * len(rows)
    bottoms_neg = [0.0] * len(rows)
    for c, color in zip(causes, ("C0", "C1", "C2", "C7")):
        vals = [decompose(next(r for r in results if r["model"] == m), row)[c] for m, row in rows]
        base = [bp if v >= 0 else bn for v, bp, bn in zip(vals, bottoms_pos, bottoms_neg)]
        ax.bar(range(len(rows)), vals, bottom=base, color=color, label=c)
        for i, v in enumerate(vals):
            if v >= 0:
                bottoms_pos[i] += v
            else:
                bottoms_neg[i] += v
    ax.scatter(range(len(rows)), [row["measured"] - row["predicted"] for _, row in rows], color="k", zorder=3,
               label="measured - predicted")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{m}\n{row['plan']}" for m, row in rows], fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("error, fraction of original latency")
    ax.legend(fontsize=7)
    ax.set_title("Prediction error by cause (1 thread, thread CPU time)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    before = load_now()
    results = [diagnose(name, args) for name in args.models]
    after = load_now()
    write(results, args, before, after, time.perf_counter() - start)
    print(f"wrote {args.out / (args.stem + '.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
