"""In-context factors from paired rounds: does pairing alone and in-place timings fix the drift? (issue 12)

The table times every segment alone, then the whole network, then the network node by node, and
scales each entry by its replaced layers' in-place / alone time. On a machine whose speed moves
within seconds, that factor also carries whatever changed between the phases, and a slow-down
that hits small layers more than large merged convs is passed on to the merged entries. Here the
factors come from ``--rounds`` paired rounds instead: in each, one node-by-node pass of the
BN-folded original and, right after it, one pass of every keep-all layer alone; a layer's factor
is the median over rounds of its in-place / alone ratio. Entries are then priced as the table
does (``pricing.in_context`` + ``with_skip_costs``) with ``in_place = alone x paired factor``, and
a third price, ``rounds`` (:func:`round_prices`), takes every number from the same interleaved
rounds. The prices of every plan (DP at budgets 0.4-0.9, ``--random-plans`` random plans) are
compared with its side-by-side measurement.

    python recipes/benchmarks/paired_factor.py --models digits-mbv2 digits-resnet --random-plans 3

Appends one JSON line per plan to ``results/paired_factor.jsonl``. Quiet machine, 1 thread.
"""

from __future__ import annotations

import argparse
import json
import statistics
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
JSONL = HERE / "results" / "paired_factor.jsonl"


def _timers(model, chain, settings):
    """On the settings' clock: one node-by-node pass of the BN-folded original (``-> {node: ms}``),
    and one call of a module on its inputs (``(module, inputs) -> ms``)."""
    from lightning_layermerge.planning.tables.segment_modules import _whole_run
    from lightning_layermerge.planning.tables.timing import _clock, _node_pass, _timed_call

    clock, device = _clock(settings), settings.torch_device
    net, inputs = _whole_run(model, chain, settings)
    net.eval()
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    return (lambda: _node_pass(net, args, device, None, clock)[0],
            lambda module, x: _timed_call(lambda: module(*x), device, clock)[1])


def paired_factors(model, chain, settings, rounds: int) -> dict[int, float]:
    """Chain layer -> median over ``rounds`` of (conv + activation in place) / (its segment alone)."""
    from lightning_layermerge import Plan
    from lightning_layermerge.planning.tables.pricing import _in_place_layers
    from lightning_layermerge.planning.tables.segment_modules import _segment_run

    node_pass, once = _timers(model, chain, settings)
    keep = [s for s in Plan.keep_all(chain).segments if not s.identity]
    alone_runs = {s.j: _segment_run(chain, s, settings) for s in keep}
    for module, _ in alone_runs.values():
        module.eval()
    ratios: dict[int, list[float]] = {s.j: [] for s in keep}
    with torch.no_grad():
        for r in range(rounds + settings.warmup):
            layers = _in_place_layers(chain, node_pass())
            alone = {l: once(*alone_runs[l]) for l in alone_runs}
            if r < settings.warmup:
                continue
            for l, ms in layers.items():
                if alone.get(l, 0.0) > 0:
                    ratios[l].append(ms / alone[l])
    return {l: statistics.median(v) for l, v in ratios.items() if v}


def round_prices(model, chain, settings, rounds: int) -> tuple[dict, float]:
    """``rounds`` model: every price from the same interleaved rounds, each module run once per round.

    Per round: one node-by-node pass of the BN-folded original, then every segment geometry once
    (shuffled), so that alone and in-place times share the machine's state and are both "run once
    between other work". Entries: alone (median over rounds) x the replaced layers' in-place / alone
    (``in_context`` with per-layer medians of the per-round ratios) + residual costs as the table
    adds them; total: the median of the rounds' node-pass sums. Returns ``(entries, total_ms)``.
    """
    import random

    from lightning_layermerge import Plan
    from lightning_layermerge.planning.tables.pricing import _in_place_layers, in_context, skip_costs, with_skip_costs
    from lightning_layermerge.planning.tables.segment_modules import _geometry, _segment_run

    node_pass, once = _timers(model, chain, settings)
    runs = {}
    for seg in chain.segments:
        g = _geometry(seg)
        if g not in runs and not (seg.identity and seg.activation is None):
            module, x = _segment_run(chain, seg, settings)
            runs[g] = (module.eval(), x)
    keep = {s.j: s for s in Plan.keep_all(chain).segments if not s.identity}
    alone: dict = {g: [] for g in runs}
    ratio: dict[int, list[float]] = {l: [] for l in keep}
    node_samples: dict[str, list[float]] = {}
    totals = []
    order = list(runs)
    rng = random.Random(0)
    with torch.no_grad():
        for r in range(rounds + settings.warmup):
            nodes = node_pass()
            rng.shuffle(order)
            this = {g: once(*runs[g]) for g in order}
            if r < settings.warmup:
                continue
            totals.append(sum(nodes.values()))
            for n, ms in nodes.items():
                node_samples.setdefault(n, []).append(ms)
            for g, ms in this.items():
                alone[g].append(ms)
            for l, ms in _in_place_layers(chain, nodes).items():
                if l in keep and this[_geometry(keep[l])] > 0:
                    ratio[l].append(ms / this[_geometry(keep[l])])
    med = {g: statistics.median(v) for g, v in alone.items()}
    raw = {s.key: med.get(_geometry(s), 0.0) for s in chain.segments}
    in_place = {l: raw[s.key] * statistics.median(ratio[l]) for l, s in keep.items() if ratio[l]}
    nodes_med = {n: statistics.median(v) for n, v in node_samples.items()}
    entries = with_skip_costs(chain, in_context(chain, raw, in_place), skip_costs(chain, nodes_med))
    return entries, statistics.median(totals)


def measure(name: str, random_plans: int, rounds: int) -> list[dict]:
    from latency_check import default_table, measured_plans, predicted_ratio

    from lightning_layermerge import Plan
    from lightning_layermerge.planning.tables.pricing import in_context, with_skip_costs
    from lightning_layermerge.planning.tables.timing import timing_environment

    base = default_table(name)
    model, example, chain, table = base.model, base.example, base.chain, base.table
    with timing_environment(table.settings):
        factors = paired_factors(model, chain, table.settings, rounds)
        rounds_entries, rounds_total = round_prices(model, chain, table.settings, rounds)
    rounds_chain = sum(rounds_entries[k] for k in Plan.keep_all(chain).keys)
    keep = {s.j: s for s in Plan.keep_all(chain).segments}
    in_place = {l: table.alone[keep[l].key] * f for l, f in factors.items()}
    old = {l: base.in_place[l] / table.alone[keep[l].key] for l in factors if l in base.in_place and table.alone[keep[l].key] > 0}
    print(f"{name}: table factors " + " ".join(f"{old[l]:.2f}" for l in sorted(old))
          + " | paired " + " ".join(f"{factors[l]:.2f}" for l in sorted(factors)))
    prices = {"factor": dict(table.entries),
              "paired": with_skip_costs(chain, in_context(chain, dict(table.alone), in_place), base.skip_costs)}
    rows = []
    for label, plan, measured in measured_plans(model, chain, table, example, random_plans, label=name):
        row = {"model": name, "plan": label, "measured": measured,
               **{m: predicted_ratio(table, chain, e, plan) for m, e in prices.items()},
               "rounds": (rounds_total - rounds_chain + sum(rounds_entries[k] for k in plan.keys)) / rounds_total}
        print(f"  {label}: measured {measured:.4f}, "
              + ", ".join(f"{m} {row[m]:.4f} ({(measured - row[m]) / row[m]:+.1%})" for m in (*prices, "rounds")),
              flush=True)
        rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["digits-mbv2", "digits-resnet"])
    p.add_argument("--random-plans", type=int, default=3)
    p.add_argument("--rounds", type=int, default=30)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for name in args.models:
        rows = measure(name, args.random_plans, args.rounds)
        with JSONL.open("a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
