"""Can a measured probe plan correct the table's prices? (issue 12)

The side-by-side measurement of a merged plan (interleaved with the BN-folded original) repeats
where the table's entries do not, so a table could time one or two merged "probe" plans and fit
a correction to its prices. Two one-parameter corrections are scored here:

* ``alpha``: a merged entry (a segment over more than one layer) is priced ``alone + alpha x
  (factor - alone)``, i.e. it inherits a fraction ``alpha`` of the in-place slow-down of the
  layers it replaces (``alpha = 1``: the eager default ``factor``; ``0``: timed alone);
* ``gamma``: a plan's predicted ratio ``p`` becomes ``p x (1 - gamma x (1 - p))``: a smaller
  network runs faster per priced millisecond (its tail operations and kept layers run in a
  smaller working set); monotone in ``p``, so it moves only the budget the DP is given.

Each is fitted on the probe plans (``dp0.5``: the DP plan at budget 0.5 with the L1 stand-in
importance; ``random0``: the first random merge plan) and scored on the other plans of the same
table. Measuring (``--models``) builds each network's default 1-thread eager table
(``latency_check.default_table``), measures the DP plans at 0.4-0.9 and ``--random-plans``
random plans three times side by side (median), and appends one row per plan with its price at
``alpha`` 0 and 1 to ``results/probe_correction.jsonl``. ``--score`` scores that file;
``--score-csv`` scores ``gamma`` on matrix CSVs of ``latency_check.py --matrix`` (the matrix
stores no alone prices), fitted on each table's DP row at 0.5.

    python recipes/benchmarks/probe_correction.py --models digits-resnet resnet18-s16 mobilenet_v2-224
    python recipes/benchmarks/probe_correction.py --score
    python recipes/benchmarks/probe_correction.py --score-csv recipes/benchmarks/results/latency_matrix_v3.csv

Results: ``results/latency_causes.md`` section 17.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import time
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
JSONL = HERE / "results" / "probe_correction.jsonl"
HELD_OUT = ("dp0.5", "random0")  # probes: never scored
VARIANTS = {"default": ((), False, False), "gamma(dp0.5)": (("dp0.5",), False, True),
            "alpha(random0)": (("random0",), True, False), "alpha(dp0.5)": (("dp0.5",), True, False),
            "alpha+gamma(random0, dp0.5)": (("random0", "dp0.5"), True, True)}


def measure(name: str, random_plans: int, run: str) -> list[dict]:
    """One network's default table, its plans measured, each priced at alpha 0 and 1."""
    from latency_check import default_table, measured_plans, predicted_ratio

    from lightning_layermerge.planning.tables.pricing import in_context, with_skip_costs

    base = default_table(name)
    chain, table = base.chain, base.table
    alone, segs = dict(table.alone), {s.key: s for s in chain.segments}
    factor = in_context(chain, alone, base.in_place)

    def entries(alpha: float) -> dict:
        blend = {k: factor[k] if segs[k].j - segs[k].i <= 1 or segs[k].identity else a + alpha * (factor[k] - a)
                 for k, a in alone.items()}
        return with_skip_costs(chain, blend, base.skip_costs)

    at = {alpha: entries(alpha) for alpha in (0.0, 1.0)}
    rows = []
    for label, plan, measured in measured_plans(base.model, chain, table, base.example, random_plans, label=name):
        row = {"run": run, "model": name, "plan": label, "measured": measured,
               "p0": predicted_ratio(table, chain, at[0.0], plan), "p1": predicted_ratio(table, chain, at[1.0], plan)}
        print(f"{name} {label}: measured {measured:.3f}, priced {row['p1']:.3f} (alpha 1), {row['p0']:.3f} (alpha 0)",
              flush=True)
        rows.append(row)
    return rows


def price(row: dict, alpha: float, gamma: float) -> float:
    """A plan's ratio under ``alpha`` (linear between its two stored prices) and ``gamma``."""
    p = row["p0"] + alpha * (row["p1"] - row["p0"])
    return p * (1 - gamma * (1 - p))


def fit(probes: list[dict], fit_alpha: bool, fit_gamma: bool) -> tuple[float, float]:
    """Least squares in log ratio over a grid: alpha in [0, 1.5], gamma in [-0.5, 0.5]."""
    alphas = [a / 50 for a in range(76)] if fit_alpha else [1.0]
    gammas = [g / 100 for g in range(-50, 51)] if fit_gamma else [0.0]
    if not probes:
        return 1.0, 0.0
    return min(((a, g) for a in alphas for g in gammas),
               key=lambda ag: sum(math.log(r["measured"] / price(r, *ag)) ** 2 for r in probes))


def score(rows: list[dict]) -> str:
    """Per table (run, model) and variant: scored plans within 5 %, worst error; then the totals."""
    tables: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        tables[(r["run"], r["model"])].append(r)
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0])
    lines = ["| run | network | " + " | ".join(VARIANTS) + " |", "|---|---|" + "---|" * len(VARIANTS)]
    for (run, model), table in tables.items():
        cells = []
        scored = [r for r in table if r["plan"] not in HELD_OUT]
        for name, (probe_names, fa, fg) in VARIANTS.items():
            alpha, gamma = fit([r for r in table if r["plan"] in probe_names], fa, fg)
            errors = [abs(r["measured"] / price(r, alpha, gamma) - 1) for r in scored]
            t = totals[name]
            t[0] += sum(e <= 0.05 for e in errors)
            t[1] += sum(e <= 0.10 for e in errors)
            t[2] += len(errors)
            cells.append(f"a {alpha:.2f} g {gamma:+.2f}: {sum(e <= 0.05 for e in errors)}/{len(errors)}, "
                         f"worst {max(errors):.1%}")
        lines.append(f"| {run} | {model} | " + " | ".join(cells) + " |")
    lines.append("| all | | " + " | ".join(f"{t[0]} / {t[1]} / {t[2]}" for t in totals.values()) + " |")
    return "\n".join(lines)


def csv_tables(paths: Iterable[Path]) -> Iterable[list[dict]]:
    """The rows of each table of matrix CSVs: consecutive ok rows of one cell, until a budget's DP repeats."""
    for path in paths:
        cur: list[dict] = []
        for r in csv.DictReader(path.open()):
            if r.get("status") != "ok" or not r.get("predicted"):
                continue
            cell = (r["load"], r["model"], r["threads"], r["runtime"])
            repeat = r["plan"] == "dp" and any(x["plan"] == "dp" and x["budget"] == r["budget"] for x in cur)
            if cur and (cell != (cur[0]["load"], cur[0]["model"], cur[0]["threads"], cur[0]["runtime"]) or repeat):
                yield cur
                cur = []
            cur.append(r)
        if cur:
            yield cur


def score_csv(paths: list[Path]) -> str:
    """``gamma`` fitted on each matrix table's DP row at 0.5, scored on its other rows, vs the table's price."""
    n, within = 0, {"default": [0, 0], "gamma": [0, 0]}
    for table in csv_tables(paths):
        probe = next((r for r in table if r["plan"] == "dp" and r["budget"] == "0.5"), None)
        if probe is None:
            continue
        row = {"p0": float(probe["predicted"]), "p1": float(probe["predicted"]), "measured": float(probe["measured"])}
        _, gamma = fit([row], False, True)
        for r in table:
            if r is probe:
                continue
            p, m = float(r["predicted"]), float(r["measured"])
            n += 1
            for name, pred in (("default", p), ("gamma", p * (1 - gamma * (1 - p)))):
                e = abs(m / pred - 1)
                within[name][0] += e <= 0.05
                within[name][1] += e <= 0.10
    return (f"{n} rows scored; within 5 % / 10 %: default {within['default'][0]} / {within['default'][1]}, "
            f"gamma(dp0.5) {within['gamma'][0]} / {within['gamma'][1]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=[])
    p.add_argument("--random-plans", type=int, default=4)
    p.add_argument("--score", action="store_true")
    p.add_argument("--score-csv", nargs="*", type=Path, default=[])
    a = p.parse_args()
    run = time.strftime("%Y-%m-%d %H:%M")
    for name in a.models:
        rows = measure(name, a.random_plans, run)
        with JSONL.open("a") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    if a.score or a.models:
        print(score([json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]))
    if a.score_csv:
        print(score_csv(a.score_csv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
