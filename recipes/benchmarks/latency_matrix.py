"""The latency-fidelity matrix: is the table's price of a plan the measured one, in every setting?

``python recipes/benchmarks/latency_check.py --matrix [options]`` runs it (this module does the work).

Matrix: loads {none, loaded} x models (``latency_models.py``) x threads {1, all} x runtimes
{eager, onnxruntime}; one *cell* per combination, each in its own process (fresh allocator,
caches and thread pools). A cell builds the latency table with ``LatencySettings(threads=...,
runtime=...)`` and otherwise default settings (so a busy machine triggers the library's own
load handling), then for every budget solves the DP (L1-norm stand-in importance) and draws
``--random-plans`` random plans, and measures each plan merged against the BN-folded original,
interleaved (``report.side_by_side``), ``--repeats`` times. One CSV row per (cell, budget, plan)
is appended to ``results/latency_matrix.csv`` as soon as it is measured; a rerun skips rows
already present, so an interrupted matrix resumes.

Columns: predicted ratio (table), measured ratio (median of the repeats), spread of the
repeats ((max - min) / median), relative error, and ``flagged``: whether the library said
the numbers are unreliable (a load fallback or warning, unrepeatable table entries, or a
side-by-side spread above ``max_spread``) before the plan was chosen.

The *loaded* half starts ``--load-procs`` busy processes (``load_generator``: each one a
single-threaded matrix-multiply loop, killed when the cell ends and never running longer than
``--load-seconds``) for the duration of the cell.

``--report`` writes ``results/latency_matrix.md`` and ``.png`` from the CSV.
The full matrix needs a quiet machine (about 30 minutes on 2 cores for the quiet half). Before the
quiet half, ``--steady-seconds`` (default 10) of the digits MobileNetV2 timed as ``eager_drift.py``
does say how quiet the machine is: p5-p95 of its 10-pass block medians, as a share of their median
(a steady machine: a few percent; a VM whose neighbours contend for its cache: 30-50 %). The
check is appended to ``<csv>.steadiness.jsonl`` and summarised in the report; with
``--max-drift F`` the quiet half is not run when the drift exceeds ``F``.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
COLUMNS = ["load", "model", "threads", "runtime", "budget", "plan", "status", "predicted", "measured", "spread",
           "error", "flagged", "why", "clock", "threads_used", "table_build_s", "table_max_spread", "segments",
           "seconds"]
BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
RUNTIMES = ("eager", "onnxruntime")
THREADS = ("1", "all")
LOADS = ("none", "loaded")

LOAD_SCRIPT = """
import sys, time
import numpy as np
end = time.time() + float(sys.argv[1])
a = np.random.rand(256, 256)
while time.time() < end:
    a = (a @ a) / 256.0
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The matrix options (added to ``latency_check.py``'s parser)."""
    from latency_models import MODELS

    g = p.add_argument_group("matrix (--matrix)")
    g.add_argument("--matrix", action="store_true", help="run the fidelity matrix (resumable) instead")
    g.add_argument("--report", action="store_true", help="with --matrix: only write the md/png from the CSV")
    g.add_argument("--models", nargs="+", default=list(MODELS), choices=sorted(MODELS))
    g.add_argument("--matrix-budgets", type=float, nargs="+", default=list(BUDGETS))
    g.add_argument("--matrix-threads", nargs="+", default=list(THREADS), choices=THREADS)
    g.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES)
    g.add_argument("--loads", nargs="+", default=list(LOADS), choices=LOADS)
    g.add_argument("--matrix-random-plans", type=int, default=3)
    g.add_argument("--matrix-repeats", type=int, default=3, help="side-by-side measurements per plan")
    g.add_argument("--load-procs", type=int, default=2, help="busy processes in the loaded half")
    g.add_argument("--load-seconds", type=float, default=900.0, help="upper bound on a load process's life")
    g.add_argument("--csv", type=Path, default=RESULTS / "latency_matrix.csv")
    g.add_argument("--matrix-reference", action="store_true",
                   help="build the tables with LatencySettings(reference=True) (eager only): every timing relative to "
                        "one fixed layer of the chain, so that the machine's drift between timings cancels")
    g.add_argument("--matrix-cache", type=Path, default=None,
                   help="latency-table cache directory (default: none, every cell measures its table)")
    g.add_argument("--steady-seconds", type=float, default=10.0,
                   help="before the quiet half: seconds of the machine-steadiness check (0: none)")
    g.add_argument("--max-drift", type=float, default=None,
                   help="skip the quiet half when the steadiness check's p5-p95 / median exceeds this")
    g.add_argument("--cell", default=None, help=argparse.SUPPRESS)  # internal: run one cell in this process


# ---------------------------------------------------------------------- CSV


def done_rows(path: Path) -> set[tuple[str, ...]]:
    """Keys of the rows already in the CSV."""
    if not path.exists():
        return set()
    with path.open(newline="") as fh:
        return {_key(row) for row in csv.DictReader(fh)}


def _key(row: dict) -> tuple[str, ...]:
    return (row["load"], row["model"], str(row["threads"]), row["runtime"], f"{float(row['budget']):g}", row["plan"])


def append_row(path: Path, row: dict) -> None:
    """Append one row (header first if the file is new); flushed at once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in COLUMNS})
        fh.flush()
        os.fsync(fh.fileno())


# ---------------------------------------------------------------------- load generator


def load_generator(procs: int, seconds: float) -> list[subprocess.Popen]:
    """Start ``procs`` single-threaded busy processes that stop by themselves after ``seconds``."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return [subprocess.Popen([sys.executable, "-c", LOAD_SCRIPT, str(seconds)], env=env) for _ in range(procs)]


def stop(procs: list[subprocess.Popen]) -> None:
    """Stop the load processes this script started."""
    for proc in procs:
        proc.kill()
    for proc in procs:
        proc.wait()


# ---------------------------------------------------------------------- one cell (its own process)


def plan_names(args: argparse.Namespace) -> list[str]:
    return ["dp"] + [f"random{n}" for n in range(args.matrix_random_plans)]


def run_cell(args: argparse.Namespace) -> None:
    """Measure every (budget, plan) row of one cell that the CSV lacks."""
    import torch

    from latency_check import l1_importance, random_merge_plan
    from latency_models import build

    from lightning_layermerge import Plan, fold_batchnorm, merge, prune, solve, trace
    from lightning_layermerge.planning.report import side_by_side
    from lightning_layermerge import LatencySettings, build_latency_table

    load, model_name, threads, runtime = args.cell.split(",")
    done = done_rows(args.csv)
    model, example = build(model_name, args.seed)
    chain = trace(model, example)
    settings = LatencySettings(threads=1 if threads == "1" else None, runtime=runtime, reference=args.matrix_reference)
    caught: list[str] = []
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        table = build_latency_table(model, chain, settings, cache_dir=args.matrix_cache, progress=False)
    caught += [str(w.message) for w in seen if "Latency" in type(w.message).__name__]
    build_s = time.perf_counter() - start
    importance = l1_importance(chain)
    folded = fold_batchnorm(model, chain)
    rng = random.Random(args.seed)
    randoms = [random_merge_plan(chain, rng) for _ in range(args.matrix_random_plans)]
    base = {"load": load, "model": model_name, "threads": threads, "runtime": runtime, "clock": table.settings.clock_used,
            "threads_used": table.settings.threads_used, "table_build_s": f"{build_s:.1f}",
            "table_max_spread": f"{table.max_spread:.4f}"}
    for budget in args.matrix_budgets:
        for name, plan in zip(plan_names(args), [None, *randoms]):
            row = {**base, "budget": f"{budget:g}", "plan": name}
            if _key(row) in done:
                continue
            t0 = time.perf_counter()
            if plan is None:
                try:
                    sol = solve(table.entries, importance, chain.num_layers, table.budget_for(budget))
                except ValueError as err:
                    append_row(args.csv, {**row, "status": "infeasible", "why": str(err)[:200]})
                    continue
                plan = Plan.from_segments(chain, sol.segments)
            elif budget != args.matrix_budgets[0]:
                continue  # random plans do not depend on the budget: measured once per cell
            merged = merge(prune(model, chain, plan))
            ratios, spreads, notes = [], [], []
            with warnings.catch_warnings(record=True) as seen:
                warnings.simplefilter("always")
                for _ in range(args.matrix_repeats):
                    timed = side_by_side({"original": folded, "plan": merged}, example, table.settings)
                    ratios.append(timed.ratio["plan"])
                    spreads.append(timed.spread["plan"])
                    notes.append(timed.load_note)
            predicted = table.predicted_ms(plan.keys) / table.total_ms
            measured = statistics.median(ratios)
            why = [*caught, *(str(w.message) for w in seen if "Latency" in type(w.message).__name__),
                   *(n for n in notes if n)]
            if table.unreliable:
                why.append(f"{len(table.unreliable)} unrepeatable table entries")
            if any(s > table.settings.max_spread for s in spreads):
                why.append(f"side-by-side spread up to {max(spreads):.1%}")
            append_row(args.csv, {**row, "status": "ok", "predicted": f"{predicted:.4f}", "measured": f"{measured:.4f}",
                                  "spread": f"{(max(ratios) - min(ratios)) / measured:.4f}",
                                  "error": f"{(measured - predicted) / predicted:.4f}", "flagged": int(bool(why)),
                                  "why": " | ".join(dict.fromkeys(why))[:300], "segments": len(plan.keys),
                                  "seconds": f"{time.perf_counter() - t0:.1f}"})
            print(f"{args.cell} budget {budget:g} {name}: predicted {predicted:.3f} measured {measured:.3f}"
                  f"{' (flagged)' if why else ''}", flush=True)
    del torch


def cell_rows(args: argparse.Namespace, cell: tuple[str, str, str, str]) -> list[tuple[str, ...]]:
    """Row keys a finished cell has (random plans only under the first budget)."""
    keys = []
    for n, budget in enumerate(args.matrix_budgets):
        for name in plan_names(args):
            if name == "dp" or n == 0:
                keys.append((*cell, f"{budget:g}", name))
    return keys


def steadiness_path(csv_path: Path) -> Path:
    """Where the steadiness checks of a matrix CSV are kept."""
    return csv_path.with_suffix(".steadiness.jsonl")


def quiet_rows_missing(args: argparse.Namespace) -> bool:
    """Whether any row of the quiet half is not in the CSV yet (the CSV read once)."""
    done = done_rows(args.csv)
    return any(key not in done for model in args.models for threads in args.matrix_threads
               for runtime in args.runtimes for key in cell_rows(args, ("none", model, threads, runtime)))


def check_steadiness(args: argparse.Namespace) -> bool:
    """Time the machine's steadiness (``eager_drift.steadiness``), record it; False: too unsteady to run."""
    from eager_drift import steadiness

    s = steadiness("digits-mbv2", args.steady_seconds)
    record = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), **{k: v for k, v in s.items() if k != "blocks"}}
    with steadiness_path(args.csv).open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(f"machine steadiness: digits MBv2 at 1 thread, p5 / median / p95 {s['p5']:.3f} / {s['median']:.3f} / "
          f"{s['p95']:.3f} ms, drift {s['drift']:.1%}", flush=True)
    if args.max_drift is not None and s["drift"] > args.max_drift:
        print(f"drift {s['drift']:.1%} > --max-drift {args.max_drift:.1%}: this machine is not quiet; the quiet half "
              "is not run (stop other work, or wait for the host to calm down, and run again)", flush=True)
        return False
    return True


def run_matrix(args: argparse.Namespace) -> int:
    """Every cell the CSV lacks rows of, each in its own process; the load half with the load generator."""
    if args.report:
        write_report(args)
        return 0
    script = HERE / "latency_check.py"
    loads = list(args.loads)
    if "none" in loads and args.steady_seconds > 0 and quiet_rows_missing(args) and not check_steadiness(args):
        loads.remove("none")
    for load in loads:
        for model in args.models:
            for threads in args.matrix_threads:
                for runtime in args.runtimes:
                    cell = (load, model, threads, runtime)
                    done = done_rows(args.csv)
                    if all(k in done for k in cell_rows(args, cell)):
                        print(f"skip {','.join(cell)} (in {args.csv})", flush=True)
                        continue
                    procs = load_generator(args.load_procs, args.load_seconds) if load == "loaded" else []
                    try:
                        cmd = [sys.executable, str(script), "--matrix", "--cell", ",".join(cell), "--csv", str(args.csv),
                               "--matrix-budgets", *map(str, args.matrix_budgets),
                               "--matrix-random-plans", str(args.matrix_random_plans),
                               "--matrix-repeats", str(args.matrix_repeats), "--seed", str(args.seed)]
                        if args.matrix_cache:
                            cmd += ["--matrix-cache", str(args.matrix_cache)]
                        if args.matrix_reference:
                            cmd += ["--matrix-reference"]
                        code = subprocess.call(cmd)
                    finally:
                        stop(procs)
                    if code:
                        print(f"cell {','.join(cell)} failed (exit {code})", flush=True)
    write_report(args)
    return 0


# ---------------------------------------------------------------------- report


def write_report(args: argparse.Namespace) -> None:
    """Markdown summary + scatter plot of predicted vs measured from the CSV."""
    if not args.csv.exists():
        print(f"no {args.csv} yet")
        return
    with args.csv.open(newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["status"] == "ok"]
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["load"], r["threads"], r["runtime"]), []).append(r)
    lines = ["# Latency fidelity matrix", "",
             f"Command: `python recipes/benchmarks/latency_check.py --matrix` (rows: `{args.csv.name}`; "
             f"{len(rows)} measured rows). Predicted = table ratio; measured = median of the side-by-side repeats "
             "(merged vs BN-folded original, interleaved, own process per cell). *flagged*: the library warned that "
             "its numbers are unreliable (load fallback/warning, unrepeatable entries or side-by-side spread).", "",
             "| load | threads | runtime | rows | within 5 % | within 10 % | flagged | unflagged and off > 10 % | "
             "median spread |", "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for (load, threads, runtime), rs in sorted(groups.items()):
        err = [abs(float(r["error"])) for r in rs]
        silent = sum(1 for r, e in zip(rs, err) if e > 0.10 and r["flagged"] != "1")
        lines.append(f"| {load} | {threads} | {runtime} | {len(rs)} | {sum(e <= 0.05 for e in err) / len(rs):.0%} | "
                     f"{sum(e <= 0.10 for e in err) / len(rs):.0%} | {sum(r['flagged'] == '1' for r in rs)} | {silent} | "
                     f"{statistics.median(float(r['spread']) for r in rs):.1%} |")
    lines += ["", "| load | model | threads | runtime | budget | plan | predicted | measured | error | spread | flagged |",
              "|---|---|---|---|---:|---|---:|---:|---:|---:|:---:|"]
    lines += [f"| {r['load']} | {r['model']} | {r['threads']} | {r['runtime']} | {r['budget']} | {r['plan']} | "
              f"{float(r['predicted']):.3f} | {float(r['measured']):.3f} | {float(r['error']):+.1%} | "
              f"{float(r['spread']):.1%} | {'yes' if r['flagged'] == '1' else ''} |" for r in rows]
    lines += steadiness_lines(args.csv)
    out = args.csv.with_suffix(".md")
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(rows, args.csv.with_suffix(".png"))
    print(f"wrote {out}")


def steadiness_lines(csv_path: Path) -> list[str]:
    """The report's lines on the steadiness checks taken before quiet halves (none: no lines)."""
    path = steadiness_path(csv_path)
    if not path.exists():
        return []
    checks = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return ["", "Machine steadiness before the quiet half (digits MBv2, 1 thread, 10-pass block medians; "
                "`eager_drift.py`): " + "; ".join(f"{c['time']}: drift {c['drift']:.1%} (median {c['median']:.3f} ms)"
                                                   for c in checks)]


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not rows:
        return
    fig, ax = plt.subplots(figsize=(5.5, 5))
    styles = {("none", "eager"): ("C0", "o"), ("none", "onnxruntime"): ("C2", "s"),
              ("loaded", "eager"): ("C3", "^"), ("loaded", "onnxruntime"): ("C1", "v")}
    for (load, runtime), (color, marker) in styles.items():
        rs = [r for r in rows if r["load"] == load and r["runtime"] == runtime]
        if rs:
            ax.scatter([float(r["predicted"]) for r in rs], [float(r["measured"]) for r in rs], color=color,
                       marker=marker, s=18, label=f"{runtime}, load {load}",
                       facecolors=[color if r["flagged"] != "1" else "none" for r in rs])
    ax.plot([0, 1.2], [0, 1.2], "k--", lw=1)
    ax.fill_between([0, 1.2], [0, 1.08], [0, 1.32], color="grey", alpha=0.15, label="within 10 %")
    ax.set_xlabel("predicted ratio (table)")
    ax.set_ylabel("measured ratio (side by side)")
    ax.set_title("Latency fidelity matrix (hollow: flagged)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args: argparse.Namespace) -> int:
    """Entry point from ``latency_check.py --matrix``."""
    if args.cell:
        run_cell(args)
        return 0
    return run_matrix(args)


__all__ = ["add_arguments", "load_generator", "main", "json"]
