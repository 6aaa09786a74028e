"""Does the latency table predict the real latency of a merged network? (ResNet-34, CPU)

For each budget (a fraction of the original network's latency) the LayerMerge DP chooses a
plan from the measured latency table; the plan is pruned and merged, and the merged network
is timed side by side with the original network with BatchNorm folded (``merge`` of the
keep-all plan, the honest baseline), interleaved (A, B, A, B, ...) in one run,
``--compare-repeats`` passes each; the measured ratio is the median over pass pairs of
merged / baseline, which cancels slow-downs from other processes lasting longer than a pair
(the ms columns are each network's median). Reported per budget: the predicted latency ratio
``table.predicted_ms(sol.segments) / table.total_ms``, the measured ratio, their relative
difference and whether the measured ratio stays within 5 % above the budget. Target: within
10 % of predicted and at most 5 % above budget.

On this CPU the DP removes convolutions rather than merging them (a merged 5x5 costs more
than the two 3x3 convs it replaces), so the solved plans hardly test merged kernels; a few
random plans made of merged segments (kernels 5 and 7) are checked the same way as a
supplement (``--random-plans``).

Settings (defaults): torchvision resnet34 with random weights and randomised BatchNorm
statistics, CPU, float32, batch 8 at 112x112, ``torch.set_num_threads(1)`` (on a shared
2-core machine any other process inflates multi-threaded timings 6-40x; single-thread
timings are the stable ones), table: 5 warm-up + 15 timed passes per entry, each entry
timed interleaved with a reference layer (``LatencySettings(reference=True)``), because
other processes on the machine slow everything down by a factor that changes from minute
to minute while the table is built (``--no-reference`` to turn it off).

Importance is a deterministic stand-in, because this script checks latency prediction only:
for segment (i, j, k), the fraction of the L1 norm of the chain convs in (i, j] that it
keeps, ``sum(L1[c] for c in convs) / sum(L1[l] for l in i+1..j)`` (1 for every kept conv).

Run (about 7 minutes on 2 cores)::

    python recipes/benchmarks/latency_check.py

``--matrix`` runs the latency-fidelity matrix instead (models x budgets x threads x runtimes x
load, resumable; see ``latency_matrix.py``)::

    python recipes/benchmarks/latency_check.py --matrix              # all of it (quiet machine)
    python recipes/benchmarks/latency_check.py --matrix --models digits-resnet --loads none
    python recipes/benchmarks/latency_check.py --matrix --report     # md + png from the CSV

Writes ``recipes/benchmarks/results/latency_check.md`` and ``latency_check.png``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402
from torch import nn  # noqa: E402

from lightning_layermerge import Chain, Plan, fold_batchnorm, merge, prune, solve, trace  # noqa: E402
from lightning_layermerge.planning.tables.latency import (  # noqa: E402
    LatencySettings,
    LatencyTable,
    build_latency_table,
    interleaved_samples,
)
from lightning_layermerge.surgery.testing import randomize_batchnorm  # noqa: E402  (realistic BN statistics)

BUDGETS = (0.5, 0.6, 0.7, 0.8, 0.9)
RESULTS = Path(__file__).resolve().parent / "results"

# Known limits of the table's prediction, written into every report.
NOTES = [
    "- Why `reference=True`: the machine is shared, and other jobs slow everything down by a factor that "
    "changes from minute to minute (1x to 2x here, single-thread CPU time included). Entries timed minutes "
    "apart, and the whole-model total, then disagree; `--no-reference` runs show it as an implausible "
    "outside-the-chain part (see `latency_check_no_reference.md`). Timing each entry interleaved with a fixed "
    "reference layer and rescaling cancels slow-downs that outlast a pass.",
    "- Identity segments (conv removed, nothing merged) are stored as 0 ms, but the activation ending them "
    "still runs (a ReLU here: about 0.3 ms, under 0.1 % of the total each); plans that remove many convs "
    "are predicted slightly fast.",
    "- Shortcut projections and residual additions are part of the outside-the-chain time, measured on the "
    "original network. A segment that folds a residual block (random plans here) removes them, which the "
    "table does not credit, so such plans run faster than predicted (the safe side for a budget).",
    "- A layer timed alone is not exactly as fast as inside the network (cache state); the difference ends "
    "up in `outside_ms = total_ms - chain_ms`, which is therefore not a pure measure of the ops outside "
    "the chain.",
]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options (defaults are the documented settings)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=112, help="input height = width")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=5, help="table: untimed passes per entry")
    p.add_argument("--repeats", type=int, default=15, help="table: timed passes per entry (median)")
    p.add_argument("--compare-repeats", type=int, default=25, help="side-by-side: timed passes per network")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--random-plans", type=int, default=3, help="supplementary random plans with merged kernels")
    p.add_argument("--no-reference", dest="reference", action="store_false",
                   help="time table entries on their own, not interleaved with a reference layer")
    p.add_argument("--cache-dir", default=None, help="latency-table cache (default: none, measure afresh)")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default="latency_check", help="file name stem of the .md and .png written")
    p.add_argument("--seed", type=int, default=0)
    from latency_matrix import add_arguments  # the --matrix options

    add_arguments(p)
    return p.parse_args(argv)


def l1_importance(chain: Chain) -> dict[tuple[int, int, int], float]:
    """Stand-in importance: the fraction of the segment's conv L1 norm that it keeps."""
    l1 = {layer.index: layer.weight_l1 for layer in chain.layers}
    return {s.key: sum(l1[c] for c in s.convs) / sum(l1[l] for l in range(s.i + 1, s.j + 1))
            for s in chain.segments}


def dp_plans(table: LatencyTable, chain: Chain, budgets=(0.4, 0.5, 0.6, 0.7, 0.8, 0.9),
             label: str = "") -> list[tuple[str, Plan]]:
    """The DP plan (L1 stand-in importance) at each reachable budget, as ``("dp<budget>", plan)``;
    an unreachable budget is printed with the solver's reason and skipped."""
    plans = []
    for budget in budgets:
        try:
            sol = solve(table.entries, l1_importance(chain), chain.num_layers, table.budget_for(budget))
        except ValueError as err:
            print(f"{label} dp{budget}: {err}")
            continue
        plans.append((f"dp{budget}", Plan.from_segments(chain, sol.segments)))
    return plans


@dataclass
class DefaultTable:
    """A network's latency table with default ``LatencySettings()`` and the in-place times its
    build stored (what the pricing experiments re-price)."""

    model: nn.Module
    example: torch.Tensor
    chain: Chain
    table: LatencyTable
    in_place: dict[int, float]  # chain layer -> its conv + activation timed in place
    skip_costs: list[float]  # per chain.skips entry, timed in place
    build_s: float


def default_table(name: str) -> DefaultTable:
    """Build ``name``'s (``latency_models.build``) default table in a fresh cache, 1 thread."""
    import tempfile

    from latency_models import build
    from lightning_layermerge.planning.tables.latency_store import IN_PLACE, IN_PLACE_SKIP, _cache_key, _open_cache

    torch.set_num_threads(1)
    model, example = build(name)
    model.eval()
    chain = trace(model, example)
    settings, cache = LatencySettings(), tempfile.mkdtemp()
    start = time.perf_counter()
    table = build_latency_table(model, chain, settings, cache_dir=cache, progress=False)
    build_s = time.perf_counter() - start
    store = _open_cache(cache, chain, _cache_key(chain, settings, settings.batch_size))
    in_place = {l: store.get((IN_PLACE, l, 0)) for l in range(1, chain.num_layers + 1)
                if store.get((IN_PLACE, l, 0)) is not None}
    costs = [store.get((IN_PLACE_SKIP, i, 0)) or 0.0 for i in range(len(chain.skips))]
    return DefaultTable(model, example, chain, table, in_place, costs, build_s)


def measured_plans(model: nn.Module, chain: Chain, table: LatencyTable, example, random_plans: int,
                   label: str = "", calls: int = 3):
    """The DP plans and ``random_plans`` random merge plans (seed 0), each merged and timed side by
    side with the BN-folded original ``calls`` times: yields ``(label, plan, median ratio)``."""
    from lightning_layermerge.planning import side_by_side

    rng = random.Random(0)
    plans = dp_plans(table, chain, label=label) + [(f"random{n}", random_merge_plan(chain, rng))
                                                    for n in range(random_plans)]
    folded = fold_batchnorm(model, chain)
    for name, plan in plans:
        merged = merge(prune(model, chain, plan))
        yield name, plan, statistics.median(side_by_side({"original": folded, "plan": merged}, example,
                                                         table.settings).ratio["plan"] for _ in range(calls))


def median_node_times(gm: nn.Module, inputs: tuple, settings: LatencySettings, rounds: int) -> dict[str, float]:
    """Every operation of ``gm`` timed in place (``time_nodes``), median over ``rounds`` passes.
    Call it inside ``timing_environment(settings)``."""
    from lightning_layermerge.planning.tables.timing import time_nodes

    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        for node, ms in time_nodes(gm, inputs, settings).items():
            samples.setdefault(node, []).append(ms)
    return {node: statistics.median(v) for node, v in samples.items()}


def predicted_ratio(table: LatencyTable, chain: Chain, entries: dict, plan: Plan) -> float:
    """A plan's latency ratio under other prices ``entries`` (the table's whole-network time, and
    the part outside the chain as those prices leave it)."""
    outside = table.total_ms - sum(entries[k] for k in Plan.keep_all(chain).keys)
    return (outside + sum(entries[k] for k in plan.keys)) / table.total_ms


def dp_and_random_plans(table: LatencyTable, chain: Chain, budget: float = 0.5, randoms: int = 3) -> list[Plan]:
    """The DP plan at ``budget`` (L1 stand-in importance) and ``randoms`` random merge plans (seed 0):
    the fixed plan set the table-variation experiments price and measure."""
    rng = random.Random(0)
    return [dp_plans(table, chain, budgets=(budget,))[0][1]] + [random_merge_plan(chain, rng) for _ in range(randoms)]


def random_merge_plan(chain: Chain, rng: random.Random) -> Plan:
    """A random covering that prefers merged segments of kernel 5 or 7 where there are some."""
    at, keys = 0, []
    while at < chain.num_layers:
        options = [s for s in chain.segments if s.i == at]
        merged = [s for s in options if s.k in (5, 7) and len(s.convs) > 1]
        seg = rng.choice(merged or [s for s in options if s.k <= 3] or options)
        keys.append(seg.key)
        at = seg.j
    return Plan.from_segments(chain, keys)


def measure_plan(model: nn.Module, chain: Chain, table: LatencyTable, plan: Plan, baseline: nn.Module,
                 x: torch.Tensor, compare: LatencySettings) -> dict:
    """Prune and merge ``plan`` and time it against the baseline; predicted vs measured ratio."""
    merged = merge(prune(model, chain, plan))
    # Side by side, alternating passes (A, B, A, B, ...); the ratio of each merged pass to the
    # baseline pass just before it cancels slow-downs from other processes that outlast a pair.
    base, ours = interleaved_samples([(baseline, (x,)), (merged, (x,))], compare)
    base_ms, merged_ms = statistics.median(base), statistics.median(ours)
    measured = statistics.median(o / b for o, b in zip(ours, base))
    predicted_ms = table.predicted_ms(plan.keys)
    predicted = predicted_ms / table.total_ms
    merges = sum(len(s.convs) > 1 for s in plan.segments)
    return {"segments": len(plan.segments), "convs": len(plan.kept_convs), "merges": merges,
            "predicted_ms": predicted_ms, "base_ms": base_ms, "merged_ms": merged_ms, "predicted": predicted,
            "measured": measured, "error": abs(measured - predicted) / predicted, "plan": str(plan)}


def check_budget(model: nn.Module, chain: Chain, table: LatencyTable, importance: dict, baseline: nn.Module,
                 x: torch.Tensor, fraction: float, compare: LatencySettings) -> dict:
    """Solve for one budget, then measure the plan against the baseline."""
    sol = solve(table.entries, importance, chain.num_layers, table.budget_for(fraction), method="layermerge")
    row = measure_plan(model, chain, table, Plan.from_segments(chain, sol.segments), baseline, x, compare)
    return {"budget": fraction, "within_budget": row["measured"] <= fraction * 1.05, **row}


def _cpu_name() -> str:
    """The CPU model, for the report."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        return platform.processor()


def _row(r: dict, label: str, chain: Chain, verdict: str) -> str:
    return (f"| {label} | {r['segments']} | {r['merges']} | {r['convs']}/{chain.num_layers} | {r['predicted_ms']:.2f} | "
            f"{r['base_ms']:.2f} | {r['merged_ms']:.2f} | {r['predicted']:.3f} | {r['measured']:.3f} | "
            f"{r['error']:.1%} | {verdict} |")


def write_report(rows: list[dict], extra: list[dict], table: LatencyTable, chain: Chain, args: argparse.Namespace,
                 build_s: float, wall_s: float) -> None:
    """Markdown table + PNG plot of predicted vs measured ratio."""
    args.out.mkdir(parents=True, exist_ok=True)
    ok = all(r["error"] <= 0.10 and r["within_budget"] for r in rows)
    head = ("| {} | segments | merged segments | kept convs | predicted ms | baseline ms | merged ms | "
            "predicted ratio | measured ratio | abs(meas - pred) / pred | {} |")
    rule = "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|"
    lines = [
        "# Latency prediction check: ResNet-34, CPU",
        "",
        f"Command: `python recipes/benchmarks/latency_check.py{_cli(args)}`",
        "",
        f"Settings: torchvision resnet34, random weights, randomised BatchNorm statistics (seed {args.seed}); "
        f"CPU ({_cpu_name() or platform.machine()}, 2 cores shared with other users' jobs), float32, batch "
        f"{args.batch}, {args.size}x{args.size} input, torch.set_num_threads({args.threads}); torch "
        f"{torch.__version__}, Python {platform.python_version()}.",
        "",
        f"Table: {len(table.entries)} entries (L = {chain.num_layers}), {args.warmup} warm-up + {args.repeats} "
        f"timed passes per entry (median), geometries shared by several segments timed once, "
        + ("each entry interleaved with a reference layer (`LatencySettings(reference=True)`)"
           if args.reference else "entries timed on their own (`reference=False`)")
        + f"; built in {build_s:.0f} s. Table total (keep-all, BN folded) {table.total_ms:.2f} ms, chain "
        f"{table.chain_ms:.2f} ms, outside the chain {table.outside_ms:.2f} ms.",
        "",
        f"Side by side: baseline = keep-all plan merged (BN folded), interleaved A/B in one run, "
        f"{args.compare_repeats} passes each; measured ratio = median over the pass pairs of merged / baseline "
        f"(ms columns: medians of each network's passes). Importance: L1-norm-fraction stand-in (see the script). "
        f"Whole run {wall_s:.0f} s.",
        "",
        "## Solved plans (LayerMerge DP)",
        "",
        head.format("budget", "measured <= 1.05 x budget"),
        rule,
    ]
    lines += [_row(r, f"{r['budget']:.2f}", chain, "yes" if r["within_budget"] else "NO") for r in rows]
    lines += ["", f"Target (within 10 % of predicted and at most 5 % above budget): "
              f"{'met' if ok else 'NOT met'} for all budgets."]
    if extra:
        lines += ["", "## Random plans with merged kernels (supplement)", "",
                  head.format("plan", "within 10 %"), rule]
        lines += [_row(r, f"random {n}", chain, "yes" if r["error"] <= 0.10 else "NO") for n, r in enumerate(extra)]
    lines += ["", "## Notes", "", *NOTES, "", "## Plans", ""]
    lines += [f"- budget {r['budget']:.2f}: `{r['plan']}`" for r in rows]
    lines += [f"- random {n}: `{r['plan']}`" for n, r in enumerate(extra)]
    (args.out / f"{args.stem}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    plot(rows, extra, args.out / f"{args.stem}.png")


def plot(rows: list[dict], extra: list[dict], path: Path) -> None:
    """Predicted vs measured latency ratio, with y = x and the budget + 5 % line."""
    fig, ax = plt.subplots(figsize=(5.5, 5))
    pred = [r["predicted"] for r in rows + extra]
    meas = [r["measured"] for r in rows + extra]
    lo, hi = min(pred + meas + [r["budget"] for r in rows]) - 0.05, max(pred + meas + [1.0]) + 0.02
    ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x (perfect prediction)")
    ax.fill_between([lo, hi], [lo * 0.9, hi * 0.9], [lo * 1.1, hi * 1.1], color="grey", alpha=0.15,
                    label="within 10 % of predicted")
    ax.scatter([r["predicted"] for r in rows], [r["measured"] for r in rows], color="C0", zorder=3,
               label="solved plans (label: budget)")
    if extra:
        ax.scatter([r["predicted"] for r in extra], [r["measured"] for r in extra], color="C2", marker="s",
                   zorder=3, label="random plans with merged kernels")
    for r in rows:
        ax.hlines(r["budget"] * 1.05, r["predicted"] - 0.02, r["predicted"] + 0.02, color="C3", lw=2)
        ax.annotate(f"{r['budget']:.1f}", (r["predicted"], r["measured"]), textcoords="offset points", xytext=(5, -10))
    ax.plot([], [], color="C3", lw=2, label="budget x 1.05 (at each point)")
    ax.set_xlabel("predicted latency ratio (table)")
    ax.set_ylabel("measured latency ratio (merged / original, BN folded)")
    ax.set_title("ResNet-34 on CPU: predicted vs measured")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cli(args: argparse.Namespace) -> str:
    """Non-default options as they would be typed."""
    defaults = parse_args([])
    parts = []
    for name in ("batch", "size", "threads", "warmup", "repeats", "compare_repeats", "budgets", "random_plans",
                 "seed", "stem"):
        if getattr(args, name) != getattr(defaults, name):
            value = getattr(args, name)
            value = " ".join(map(str, value)) if isinstance(value, list) else value
            parts.append(f" --{name.replace('_', '-')} {value}")
    if not args.reference:
        parts.append(" --no-reference")
    return "".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Build the table, check every budget, write the report; exit 1 if the target is missed."""
    args = parse_args(argv)
    if args.matrix:
        from latency_matrix import main as matrix_main

        return matrix_main(args)
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)  # for the side-by-side runs too (the table sets it itself)
    model = randomize_batchnorm(torchvision.models.resnet34(), args.seed).eval()
    x = torch.randn(args.batch, 3, args.size, args.size)
    chain = trace(model, x)
    settings = LatencySettings(device="cpu", warmup=args.warmup, repeats=args.repeats, threads=args.threads,
                               reference=args.reference)
    t0 = time.perf_counter()
    table = build_latency_table(model, chain, settings, cache_dir=args.cache_dir)
    build_s = time.perf_counter() - t0
    importance = l1_importance(chain)
    compare = LatencySettings(device="cpu", warmup=3, repeats=args.compare_repeats, threads=args.threads)
    baseline = fold_batchnorm(model, chain)
    rows = []
    for fraction in args.budgets:
        row = check_budget(model, chain, table, importance, baseline, x, fraction, compare)
        rows.append(row)
        print(f"budget {fraction:.2f}: predicted {row['predicted']:.3f} measured {row['measured']:.3f} "
              f"error {row['error']:.1%} within budget: {row['within_budget']}", flush=True)
    rng = random.Random(args.seed)
    extra = []
    for n in range(args.random_plans):
        row = measure_plan(model, chain, table, random_merge_plan(chain, rng), baseline, x, compare)
        extra.append(row)
        print(f"random plan {n} ({row['merges']} merged segments): predicted {row['predicted']:.3f} "
              f"measured {row['measured']:.3f} error {row['error']:.1%}", flush=True)
    write_report(rows, extra, table, chain, args, build_s, time.perf_counter() - start)
    ok = all(r["error"] <= 0.10 and r["within_budget"] for r in rows)
    print(f"wrote {args.out / (args.stem + '.md')}; target {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
