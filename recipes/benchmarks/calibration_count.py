"""How many candidates does the callback's calibration time? (issue 12)

Acceptance of the latency issue: with the callback's defaults, calibration needs at most 2
timed candidates in at least 90 % of runs. This script runs the real callback's planning
(``LayerMergeCallback`` inside ``Trainer(max_epochs=0)``: trace, tables, DP, calibration, merge;
no fine-tuning) on the trained networks of ``compare.py`` (digits) and ``compare_fashion.py``
(Fashion-MNIST) for every method and budget, with:

* the importance tables those recipes cached (``--digits-work`` / ``--fashion-work``; the
  recipes build them, this script only reads them and stops if one is missing);
* ``LatencySettings(batch_size=64)`` otherwise default, i.e. 1 thread timed by the thread's
  CPU clock, the latency table built once per network (in this process, not read from the
  recipe's cache);
* a fresh plan cache per run (the recipes' cached plans are not read), so every run calibrates.

It writes ``recipes/benchmarks/results/calibration_count.md``: per run the candidates'
predicted and measured ratios, and the share of runs with at most 2 candidates. Timing needs a
quiet machine (nothing else running).

    python recipes/benchmarks/calibration_count.py --digits-work /tmp/cmpnew --fashion-work /work/fashion_paired
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

METHODS = ("layermerge", "layeronly", "depth")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--digits-work", default=None, help="compare.py's --work (trained digits nets and caches)")
    p.add_argument("--fashion-work", default=None, help="compare_fashion.py's --work")
    p.add_argument("--importance-seeds", nargs="+", type=int, default=[0, 1, 2], help="digits importance tables")
    p.add_argument("--budgets", nargs="+", type=float, default=[0.4, 0.5, 0.6, 0.7, 0.8, 0.9])
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--out", type=Path, default=HERE / "results" / "calibration_count.md")
    return p.parse_args(argv)


def _sources(args: argparse.Namespace) -> list[tuple]:
    """``(label, module factory, datamodule, cache dir, importance settings)`` per network and table."""
    out = []
    if args.digits_work:
        import compare

        setup, _ = compare.parse_args(["--work", args.digits_work])
        for net in setup.nets:
            for seed in args.importance_seeds:
                out.append((f"digits-{net}-iseed{seed}", lambda s=setup, n=net: compare._fresh_module(s, n, 0.01),
                            setup.datamodule(), setup.net_dir(net) / "cache", setup.importance_for(seed)))
    if args.fashion_work:
        import compare_fashion as cf
        from nets import Classifier

        setup, _ = cf.parse_args(["--work", args.fashion_work])
        for net in setup.nets:
            out.append((f"fashion-{net}", lambda s=setup, n=net: Classifier(cf.original(s, n).train(), lr=0.01),
                        setup.datamodule(), setup.net_dir(net) / "cache", setup.importance))
    return out


def _plan_cache(cache: Path, into: Path) -> Path:
    """A copy of ``cache`` without its cached plans (tables only), so the callback calibrates."""
    if into.exists():
        shutil.rmtree(into)
    into.mkdir(parents=True)
    importance = list(cache.glob("importance-*.json"))
    if not importance:
        raise SystemExit(f"no importance table in {cache}: run the recipe that builds it first")
    for f in importance:
        shutil.copy2(f, into / f.name)
    return into


def run(label: str, make_module, dm, importance, method: str, budget: float, tables: Path) -> dict:
    """One callback planning run; its calibration rounds."""
    from compare import _trainer

    from lightning_layermerge import LatencySettings, LayerMergeCallback

    # Keep the latency table of this network across runs (it does not depend on the plan),
    # drop every cached plan before the run.
    for f in tables.glob("plan-*.json"):
        f.unlink()
    callback = LayerMergeCallback(budget=budget, target="model", method=method, monitor="val_loss", mode="min",
                                  importance=importance, latency=LatencySettings(batch_size=64),
                                  cache_dir=str(tables), verbose=False)
    trainer = _trainer(tables / "runs", 0, [callback])  # compare.py's trainer, no epoch: planning only
    start = time.perf_counter()
    try:
        trainer.fit(make_module(), datamodule=dm)
    except ValueError as err:
        return {"label": label, "method": method, "budget": budget, "status": "infeasible", "error": str(err)}
    report = callback.report.to_dict()
    return {"label": label, "method": method, "budget": budget, "status": "ok", "rounds": report["calibration"],
            "threads": report["latency_settings"].get("threads"), "seconds": time.perf_counter() - start}


def write(rows: list[dict], args: argparse.Namespace, elapsed: float, path: Path) -> None:
    ok = [r for r in rows if r["status"] == "ok"]
    counts: dict[int, int] = {}
    for r in ok:
        counts[len(r["rounds"])] = counts.get(len(r["rounds"]), 0) + 1
    within = sum(v for k, v in counts.items() if k <= 2)
    cmd = "python recipes/benchmarks/calibration_count.py " + " ".join(sys.argv[1:])
    lines = ["# Calibration candidates per callback run (issue 12)", "",
             f"Command: `{cmd}` ({elapsed / 60:.0f} min). Each run: `LayerMergeCallback` planning in "
             "`Trainer(max_epochs=0)` with the recipe's cached importance table, `LatencySettings(batch_size=64)` "
             "otherwise default (threads: see column), no cached plan.", "",
             f"**Runs with at most 2 timed candidates: {within} / {len(ok)} = {within / max(len(ok), 1):.0%}** "
             f"(distribution: {', '.join(f'{k} candidate(s): {v}' for k, v in sorted(counts.items()))}; "
             f"{len(rows) - len(ok)} budgets infeasible for the method).", "",
             "| network / table | method | budget | threads | candidates | predicted -> measured per candidate |",
             "|---|---|---:|---:|---:|---|"]
    for r in ok:
        cands = "; ".join(f"{c['predicted']:.3f} -> {c['measured']:.3f}" for c in r["rounds"])
        lines.append(f"| {r['label']} | {r['method']} | {r['budget']:g} | {r['threads']} | {len(r['rounds'])} | "
                     f"{cands} |")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore")
    import logging

    for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    sources = _sources(args)
    rows: list[dict] = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="calibration-count-") as tmp:
        for label, make_module, dm, cache, importance in sources:
            tables = _plan_cache(cache, Path(tmp) / label)
            for method in args.methods:
                for budget in args.budgets:
                    row = run(label, make_module, dm, importance, method, budget, tables)
                    rows.append(row)
                    n = len(row.get("rounds", []))
                    print(f"[{time.perf_counter() - start:5.0f} s] {label} {method} {budget:g}: "
                          f"{row['status']} {n} candidate(s)", flush=True)
            write(rows, args, time.perf_counter() - start, args.out)
    write(rows, args, time.perf_counter() - start, args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
