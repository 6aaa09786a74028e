"""LayerMerge vs LayerOnly vs Depth at equal measured latency (the paper's comparison, at CPU scale).

For each network (a small ResNet and a small MobileNetV2, ``nets.py``) on real data:

1. train it once (``--train-epochs``) and keep the weights (``trained.pt``);
2. for each method (``layermerge``, ``layeronly``, ``depth``) and budget (0.4 ... 0.8), run
   ``trainer.fit`` from the trained weights with ``LayerMergeCallback(budget, method,
   distill=Distillation())`` and the *same* fine-tuning budget (``--finetune-epochs``, same
   learning rate, same seeds: ``--seeds``); record the callback's report (measured latency ratio: the merged
   network timed side by side with the original network with BatchNorm folded, interleaved in
   one run, median of ``--repeats`` passes) and the test accuracy;
3. also record the uncompressed baseline, and as a control the uncompressed network
   fine-tuned for the same epochs (so extra training is not mistaken for compression gains).

Data: ``sklearn.datasets.load_digits`` (1797 images, 8x8, upsampled bilinearly to 16x16 as in
the quickstart: at 8x8 a stride-2 stage leaves 4x4 maps and 3x3 convs are mostly padding, so
merging has little to work with; 16x16 gives real spatial extent at the same cost as a
larger batch). Split 65 / 15 / 20 % train / val / test with a fixed seed (359 test images:
one image is 0.28 points of accuracy). ``--cifar10 PATH`` uses a local CIFAR-10 copy in
torchvision's format instead (3x32x32; never downloaded).

Cost control (2 shared CPU cores): torch runs with 1 thread; one latency table per network
(``cache_dir`` shared by all its runs), and one importance table per network shared by the
three methods: the table's entries do not depend on the method (LayerOnly reads the
single-layer entries ``(l-1, l, k)``, Depth the all-convs-kept entry of each ``(i, j)``,
LayerMerge all of them), and its cache key (weights, data, settings) is the same for all
runs of a network, so only the first run builds it. Every run writes its own JSON
(``<work>/<dataset>/<net>/runs/<method>-<budget>[-s<seed>][-i<importance seed>].json``) and is skipped when it exists, so
an interrupted script resumes where it stopped; ``--report-only`` just rebuilds the outputs.
``--importance-seeds`` repeats everything with other ``ImportanceSettings.seed`` values (one
importance table, and so maybe one plan, per seed; run files get an ``-i<seed>`` suffix).

Run::

    python recipes/benchmarks/compare.py                  # full grid on digits, one fine-tuning seed
    python recipes/benchmarks/compare.py --seeds 0 1 2    # the committed results: 3 fine-tuning seeds
    python recipes/benchmarks/compare.py --quick          # 2 budgets, short training (a few minutes)
    # issue 13's repeatability check: 3 importance tables (seeds 0-2), budget 0.7, 3 epochs
    python recipes/benchmarks/compare.py --methods layermerge depth --budgets 0.7 --finetune-epochs 3 \
        --importance-seeds 0 1 2 --work /tmp/importance_budget07 --out importance_budget07
    python recipes/benchmarks/compare.py --cifar10 ~/data/cifar10 --train-epochs 30

Runtime here (2 CPU cores shared with other jobs, 1 torch thread; 2026-11-30): the seed-0 grid
took 381 s (training both networks 47 s, the ResNet / MobileNetV2 importance tables 60 / 87 s
inside their first run, then 3-8 s per run); seeds 1 and 2 added 271 s (the tables and plans
come from the cache, only fine-tuning and the final measurement run).

Writes ``recipes/benchmarks/results/compare.md`` (tables), ``compare.png`` (test accuracy vs
measured latency ratio, one line per method, one panel per network) and ``compare.json``
(every run's numbers); ``--quick`` writes ``compare_quick.*`` into the work directory instead.
Text between ``<!-- notes -->`` and ``<!-- /notes -->`` at the top of an existing
``compare.md`` (the human-written reading of the results) is kept when it is rewritten.
``--out STEM`` writes ``STEM.*`` into ``recipes/benchmarks/results`` instead (e.g.
``importance_budget07``). ``--objective exp`` solves the paper's sum of I instead of the
library's default sum of ln I (``ImportanceSettings.objective``; the tables are shared, the
plans are not).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import platform
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch

from nets import Cifar10DataModule, Classifier, DigitsDataModule, build_net

from lightning_layermerge import Distillation, LayerMergeCallback, fold_batchnorm, trace
from lightning_layermerge.planning.side_by_side import measure_side_by_side
from lightning_layermerge import ImportanceSettings, LatencySettings

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("layermerge", "layeronly", "depth")
BUDGETS = (0.4, 0.5, 0.6, 0.7, 0.8)
NETS = ("resnet", "mobilenetv2")
NOTES_BEGIN, NOTES_END = "<!-- notes -->", "<!-- /notes -->"


@dataclass(frozen=True)
class Setup:
    """Everything that defines the experiment (and is written into the results)."""

    dataset: str
    data_root: str | None
    nets: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    train_epochs: int
    finetune_epochs: int
    train_lr: float
    finetune_lr: float
    batch_size: int
    importance: ImportanceSettings
    latency: LatencySettings
    distill: Distillation
    seed: int
    seeds: tuple[int, ...]
    work: Path
    quick: bool
    importance_seeds: tuple[int, ...] = (0,)
    out: str | None = None  # stem of the outputs (default: compare, quick: compare_quick)
    argv: tuple[str, ...] = ()  # the command-line arguments (written into the outputs)

    @property
    def in_channels(self) -> int:
        return 3 if self.dataset == "cifar10" else 1

    def datamodule(self) -> L.LightningDataModule:
        if self.dataset == "cifar10":
            return Cifar10DataModule(self.data_root, batch_size=self.batch_size, seed=self.seed)
        return DigitsDataModule(image_size=16, batch_size=self.batch_size, seed=self.seed)

    def net_dir(self, net: str) -> Path:
        return self.work / self.dataset / net

    def importance_for(self, importance_seed: int) -> ImportanceSettings:
        """The importance settings of one importance seed (its subsets and sub-runs).

        ``ImportanceSettings.seed`` is part of the importance cache key (all its fields are),
        and the plan cache keys on the table's values, so each seed builds its own table and plan.
        """
        return dataclasses.replace(self.importance, seed=importance_seed)

    @property
    def command(self) -> str:
        args = [a for a in self.argv if a != "--report-only"]
        return " ".join(["python recipes/benchmarks/compare.py", *args])


def parse_args(argv: list[str] | None = None) -> tuple[Setup, bool]:
    """The experiment setup and whether only the outputs are rebuilt."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cifar10", metavar="PATH", help="local CIFAR-10 (torchvision format) instead of digits")
    p.add_argument("--quick", action="store_true", help="reduced grid: budgets 0.5/0.7, short training")
    p.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--budgets", nargs="+", type=float, default=None)
    p.add_argument("--train-epochs", type=int, default=None, help="default 20 (quick: 8)")
    p.add_argument("--finetune-epochs", type=int, default=None, help="default 8 (quick: 2)")
    p.add_argument("--seeds", nargs="+", type=int, default=[0],
                   help="fine-tuning seeds per (method, budget); the plan is the same for every seed (plan cache)")
    p.add_argument("--importance-seeds", nargs="+", type=int, default=[0],
                   help="ImportanceSettings.seed values: each builds its own importance table (other subsets and "
                        "sub-run seeds) and so possibly another plan; every fine-tuning seed runs for each")
    p.add_argument("--objective", choices=("log", "exp"), default="log",
                   help="what the DP maximises: the sum of ln I (the library's default) or of I (the paper's Eq. 5)")
    p.add_argument("--out", default=None,
                   help="stem of the output files (default compare in recipes/benchmarks/results; quick: "
                        "compare_quick in the work directory)")
    p.add_argument("--repeats", type=int, default=None, help="timed passes per latency measurement (default 40)")
    p.add_argument("--work", default=None, help="work directory (default runs/compare, quick: runs/compare_quick)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is stable on a shared CPU)")
    p.add_argument("--report-only", action="store_true", help="only rebuild compare.md/png from the run JSONs")
    argv = list(sys.argv[1:] if argv is None else argv)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cifar = a.cifar10 is not None
    quick = a.quick
    return Setup(
        dataset="cifar10" if cifar else "digits",
        data_root=os.path.expanduser(a.cifar10) if cifar else None,
        nets=tuple(a.nets), methods=tuple(a.methods),
        budgets=tuple(a.budgets or ((0.5, 0.7) if quick else BUDGETS)),
        train_epochs=a.train_epochs or (8 if quick else 20),
        finetune_epochs=a.finetune_epochs or (2 if quick else 8),
        train_lr=0.1, finetune_lr=0.02, batch_size=64,
        # The library's defaults (issue 13, recipes/benchmarks/results/importance_check.md): at
        # least 30 optimizer steps per entry with the module's own optimizer (SGD at the
        # fine-tuning lr, one-cycle cosine, batch 64), scored by val_loss on the validation set
        # (at least 1000 samples: all 270 on digits, 1000 of CIFAR-10's 5000). On CIFAR-10,
        # fraction 0.04 (1800 images) is 28 steps of 64, so the 30-step floor applies there too.
        # Only the seed varies (--importance-seeds, Setup.importance_for).
        importance=ImportanceSettings(objective=a.objective),
        # 1 thread and reference-relative table entries: the stable choice on a shared CPU.
        latency=LatencySettings(device="cpu", batch_size=64, threads=a.threads, warmup=10,
                                repeats=a.repeats or (20 if quick else 40), reference=True),
        distill=Distillation(alpha=1.0, temperature=4.0),
        seed=0,
        seeds=tuple(a.seeds),
        importance_seeds=tuple(a.importance_seeds),
        out=a.out,
        argv=tuple(argv),
        work=Path(a.work or ("runs/compare_quick" if quick else "runs/compare")),
        quick=quick,
    ), a.report_only


# ---------------------------------------------------------------------- runs


def _trainer(root: Path, epochs: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, callbacks=callbacks or [], logger=False,
                     default_root_dir=str(root), enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, num_sanity_val_steps=0)


def _test_acc(trainer: L.Trainer, module: L.LightningModule, dm: L.LightningDataModule) -> float:
    return float(trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"])


def _write(path: Path, data: dict) -> None:
    """Atomic JSON write: an interrupted run never leaves a half file that would be skipped."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def _fresh_module(setup: Setup, net: str, lr: float) -> Classifier:
    """A classifier holding the trained weights of ``net`` (same start for every run)."""
    module = Classifier(build_net(net, setup.in_channels), lr=lr)
    module.model.load_state_dict(torch.load(setup.net_dir(net) / "trained.pt", map_location="cpu",
                                            weights_only=True))
    return module


def baseline(setup: Setup, net: str, log: Any) -> dict:
    """Train once (or load), then the uncompressed rows: accuracy, BN folding, fine-tuned control."""
    out = setup.net_dir(net) / "baseline.json"
    if out.exists():
        return json.loads(out.read_text())
    dm = setup.datamodule()
    start = time.perf_counter()
    L.seed_everything(setup.seed, workers=True)
    module = Classifier(build_net(net, setup.in_channels), lr=setup.train_lr)
    setup.net_dir(net).mkdir(parents=True, exist_ok=True)
    trainer = _trainer(setup.net_dir(net) / "train", setup.train_epochs)
    trainer.fit(module, datamodule=dm)
    torch.save(module.model.state_dict(), setup.net_dir(net) / "trained.pt")
    acc = _test_acc(trainer, module, dm)
    train_s = time.perf_counter() - start
    log(f"[{net}] trained {setup.train_epochs} epochs in {train_s:.0f} s: test acc {acc:.4f}")

    # How much of a "speed-up" BatchNorm folding alone gives (not compression: every ratio in
    # this benchmark is against the folded network).
    model = module.model.eval()
    dm.setup("fit")
    example = dm.train_set[:setup.latency.batch_size][0]
    chain = trace(model, example)
    folded = fold_batchnorm(model, chain)
    times = measure_side_by_side({"folded": folded, "unfolded": model}, (example,), setup.latency)

    # Control: the uncompressed network fine-tuned exactly like the compressed ones (minus KD,
    # which would distil it into itself).
    L.seed_everything(setup.seed, workers=True)
    control = _fresh_module(setup, net, setup.finetune_lr)
    ctrainer = _trainer(setup.net_dir(net) / "control", setup.finetune_epochs)
    ctrainer.fit(control, datamodule=dm)
    control_acc = _test_acc(ctrainer, control, dm)
    data = {"net": net, "test_acc": acc, "control_test_acc": control_acc,
            "params": sum(p.numel() for p in model.parameters()), "num_layers": chain.num_layers,
            "segments": len(chain.segments), "irreducible": sorted(chain.irreducible),
            "folded_ms": times["folded"], "unfolded_ms": times["unfolded"],
            "unfolded_ratio": times["unfolded"] / times["folded"], "seconds": time.perf_counter() - start}
    log(f"[{net}] BN-unfolded / folded latency {data['unfolded_ratio']:.3f}; fine-tuned control acc "
        f"{control_acc:.4f}")
    _write(out, data)
    return data


def run_name(method: str, budget: float, seed: int, importance_seed: int = 0) -> str:
    """File stem of a run (seeds 0 unsuffixed, so single-seed results keep their names):
    ``<method>-<budget>[-s<fine-tuning seed>][-i<importance seed>]``."""
    return (f"{method}-{budget:.2f}" + (f"-s{seed}" if seed else "")
            + (f"-i{importance_seed}" if importance_seed else ""))


def compress(setup: Setup, net: str, method: str, budget: float, seed: int, log: Any,
             importance_seed: int = 0) -> dict:
    """One compression run; its JSON is the resume point (status ok / infeasible are final).

    The trained weights, the latency table and, for one importance seed, the importance table
    and (through the callback's plan cache) the plan are the same for every fine-tuning seed:
    only the fine-tuning (data order, augmentation-free SGD noise) differs. Another importance
    seed builds another importance table (other subsets and sub-run seeds), hence maybe another plan.
    """
    name = run_name(method, budget, seed, importance_seed)
    out = setup.net_dir(net) / "runs" / f"{name}.json"
    if out.exists():
        data = json.loads(out.read_text())
        if data.get("status") in ("ok", "infeasible"):
            return data
    dm = setup.datamodule()
    start = time.perf_counter()
    L.seed_everything(seed, workers=True)
    module = _fresh_module(setup, net, setup.finetune_lr)
    callback = LayerMergeCallback(budget=budget, target="model", method=method, monitor="val_loss", mode="min",
                                  importance=setup.importance_for(importance_seed), latency=setup.latency,
                                  distill=setup.distill,
                                  cache_dir=str(setup.net_dir(net) / "cache"), verbose=False)
    trainer = _trainer(setup.net_dir(net) / "runs" / name, setup.finetune_epochs, [callback])
    data: dict[str, Any] = {"net": net, "method": method, "budget": budget, "seed": seed,
                            "importance_seed": importance_seed}
    try:
        trainer.fit(module, datamodule=dm)
    except ValueError as err:  # e.g. a budget below what the method can reach: a result, not a crash
        infeasible = "smallest latency" in str(err)
        data.update(status="infeasible" if infeasible else "error", error=str(err),
                    seconds=time.perf_counter() - start)
        log(f"[{net}] {name}: {data['status']}: {err}")
        _write(out, data)
        return data
    except Exception as err:  # noqa: BLE001 - record and go on with the grid; retried on the next start
        data.update(status="error", error=f"{type(err).__name__}: {err}", traceback=traceback.format_exc(),
                    seconds=time.perf_counter() - start)
        log(f"[{net}] {name}: ERROR {data['error']}")
        _write(out, data)
        return data
    acc = _test_acc(trainer, module, dm)
    report = callback.report
    data.update(status="ok", test_acc=acc, report=report.to_dict(), seconds=time.perf_counter() - start)
    log(f"[{net}] {name}: measured ratio {report.measured_ratio:.3f} (predicted "
        f"{report.predicted_ratio:.3f}), test acc {acc:.4f}, kept {len(report.kept_convs)}/{report.num_layers} "
        f"convs, {len(report.kept_activations)} activations, {data['seconds']:.0f} s")
    _write(out, data)
    return data


# ---------------------------------------------------------------------- outputs


def _load(setup: Setup) -> tuple[dict[str, dict], list[dict]]:
    bases, runs = {}, []
    for net in setup.nets:
        path = setup.net_dir(net) / "baseline.json"
        if path.exists():
            bases[net] = json.loads(path.read_text())
        for method in setup.methods:
            for budget in setup.budgets:
                for iseed in setup.importance_seeds:
                    for seed in setup.seeds:
                        run = setup.net_dir(net) / "runs" / f"{run_name(method, budget, seed, iseed)}.json"
                        if run.exists():
                            runs.append({"seed": 0, "importance_seed": 0, **json.loads(run.read_text())})
    return bases, runs


def _ratio(run: dict) -> float | None:
    return run.get("report", {}).get("measured_ratio") if run.get("status") == "ok" else None


@dataclass
class Point:
    """The runs of one (net, method, budget): every seed of the same plan."""

    ratio: float  # median measured ratio over the seeds' reports
    acc: float  # mean test accuracy (%)
    sd: float  # standard deviation of the test accuracy over seeds (0 for one seed)
    n: int


def _point(runs: list[dict]) -> Point | None:
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return None
    accs = [100 * r["test_acc"] for r in ok]
    sd = statistics.stdev(accs) if len(accs) > 1 else 0.0
    return Point(statistics.median(_ratio(r) for r in ok), statistics.fmean(accs), sd, len(ok))


def _cell(runs: list[dict]) -> str:
    point = _point(runs)
    if point is None:
        if not runs:
            return "not run"
        return "infeasible" if any(r["status"] == "infeasible" for r in runs) else "error"
    acc = f"{point.acc:.2f}" + (f" ± {point.sd:.2f}" if point.n > 1 else "")
    return f"{point.ratio:.3f} / {acc}"


def _seg_text(report: dict) -> str:
    merged = [f"({i},{j}]k{k}" for i, j, k in report["segments"] if j - i > 1]
    return " ".join(merged) or "-"


def _importance_text(runs: list[dict]) -> str:
    """Steps, scoring samples, noise level and build time of the tables, from the runs' reports."""
    built = {}
    for r in runs:
        imp = r.get("report", {}).get("importance") or {}
        key = (r["net"], r["importance_seed"])
        if imp.get("build_seconds") is not None and imp["build_seconds"] > built.get(key, {}).get("build_seconds", -1):
            built[key] = imp  # the run that built it (the others read the cache)
    if not built:
        return "no table built yet"
    parts = [f"{net} seed {iseed}: {imp.get('entries')} entries x "
             f"{'head probe' if imp.get('method') == 'probe' else str(imp.get('steps_per_entry')) + ' steps'}, "
             f"scored on "
             f"{imp.get('score_samples')} samples, sigma {imp.get('sigma', math.nan):.3g}, "
             f"{imp.get('distinguishable')} beyond 2 sigma, {imp['build_seconds']:.0f} s"
             for (net, iseed), imp in sorted(built.items())]
    return "; ".join(parts)


def _removed(report: dict) -> str:
    """Chain indices (1-based) of the convs the plan removes."""
    removed = sorted(set(range(1, report["num_layers"] + 1)) - set(report["kept_convs"]))
    return " ".join(map(str, removed)) or "-"


def _notes(path: Path) -> str:
    """The human-written notes block of an existing file (kept across rewrites)."""
    if path.exists():
        text = path.read_text()
        if NOTES_BEGIN in text and NOTES_END in text:
            return text[text.index(NOTES_BEGIN):text.index(NOTES_END) + len(NOTES_END)]
    return f"{NOTES_BEGIN}\n(no notes yet)\n{NOTES_END}"


def write_outputs(setup: Setup, elapsed: float | None) -> Path:
    """``compare.md`` + ``compare.png`` + ``compare.json`` from every run JSON found."""
    bases, runs = _load(setup)
    out_dir = setup.work if setup.quick and setup.out is None else RESULTS
    stem = setup.out or ("compare_quick" if setup.quick else "compare")
    md_path = out_dir / f"{stem}.md"
    by_key: dict[tuple, list[dict]] = {}
    for r in sorted(runs, key=lambda r: (r["importance_seed"], r["seed"])):
        by_key.setdefault((r["net"], r["method"], r["budget"]), []).append(r)
    total_s = sum(r.get("seconds", 0.0) for r in runs) + sum(b.get("seconds", 0.0) for b in bases.values())
    ls = setup.latency
    lines = [
        f"# LayerMerge vs LayerOnly vs Depth at equal measured latency ({setup.dataset}, CPU)", "",
        _notes(md_path), "",
        f"Command: `{setup.command}`. "
        f"Compute time summed over the {len(runs)} runs and {len(bases)} baselines found: {total_s / 60:.0f} min "
        "(the first run of each network includes building its latency and importance tables)"
        + (f"; wall time of the last invocation: {elapsed / 60:.0f} min." if elapsed else "."), "",
        "Setup: " + ("load_digits upsampled to 16x16 (1168 train / 270 val / 359 test images)"
                     if setup.dataset == "digits" else "CIFAR-10 (45k train / 5k val / 10k test)")
        + f"; each network trained once ({setup.train_epochs} epochs, SGD lr {setup.train_lr}), then every "
        f"compression run starts from those weights with the same fine-tuning: {setup.finetune_epochs} epochs, "
        f"SGD lr {setup.finetune_lr} one-cycle cosine, batch {setup.batch_size}, KD alpha {setup.distill.alpha} "
        f"T {setup.distill.temperature}, fine-tuning seed(s) {', '.join(map(str, setup.seeds))}. "
        f"Importance: `{setup.importance}` (the library's defaults) with seed(s) "
        f"{', '.join(map(str, setup.importance_seeds))}: " + _importance_text(runs)
        + "; one table per network and importance seed, shared by the methods.",
        f"Latency: {ls.device}, batch {ls.batch_size}, {ls.dtype}, {ls.threads} thread; table entries "
        f"reference-relative ({ls.warmup} warm-up + {ls.repeats} timed passes); the plan is calibrated against "
        "side-by-side measurements before fine-tuning. **Measured ratio** = the callback's report: merged "
        "network / original network with BatchNorm folded, timed interleaved in one run, median of "
        f"{ls.repeats} passes each. Machine: {platform.processor() or platform.machine()}, 2 cores shared with "
        f"other jobs; torch {torch.__version__}.", "",
    ]
    for net in setup.nets:
        base = bases.get(net)
        lines += [f"## {net}", ""]
        if base:
            lines += [
                f"Uncompressed: test acc **{100 * base['test_acc']:.2f} %**, {base['params']:,} parameters, "
                f"L = {base['num_layers']} chain convs ({len(base['irreducible'])} irreducible), "
                f"{base['segments']} table entries; BN-folded {base['folded_ms']:.2f} ms "
                f"(unfolded: {base['unfolded_ratio']:.3f}x of that). Uncompressed + the same fine-tuning "
                f"(control): {100 * base['control_test_acc']:.2f} %.", "",
            ]
        seeds = ""
        if len(setup.seeds) > 1 or len(setup.importance_seeds) > 1:
            seeds = (f" (median ratio and mean ± sd of the accuracy over the runs: fine-tuning seeds "
                     f"{', '.join(map(str, setup.seeds))} x importance seeds "
                     f"{', '.join(map(str, setup.importance_seeds))}; the same plan for every fine-tuning seed "
                     "of one importance seed)")
        lines += [f"Measured latency ratio / test accuracy (%) per method and budget{seeds}:", "",
                  "| budget | " + " | ".join(setup.methods) + " |",
                  "|---:|" + ":---:|" * len(setup.methods)]
        for b in setup.budgets:
            lines.append(f"| {b:.2f} | " + " | ".join(_cell(by_key.get((net, m, b), [])) for m in setup.methods)
                         + " |")
        lines += ["", "<details><summary>details per run</summary>", "",
                  "| method | budget | imp. seed | seed | measured ratio | predicted ratio | speed-up | test acc "
                  "| vs uncompressed | kept convs | removed convs | kept acts | merged segments (i,j]k | params | run s |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|---:|"]
        for m in setup.methods:
            for b in setup.budgets:
                for r in by_key.get((net, m, b), []):
                    if r["status"] != "ok":
                        why = r.get("error", "")[:160]
                        lines.append(f"| {m} | {b:.2f} | {r['importance_seed']} | {r['seed']} | {r['status']}: {why} "
                                     "| | | | | | | | | | |")
                        continue
                    rep = r["report"]
                    delta = 100 * (r["test_acc"] - base["test_acc"]) if base else math.nan
                    lines.append(
                        f"| {m} | {b:.2f} | {r['importance_seed']} | {r['seed']} | {rep['measured_ratio']:.3f} "
                        f"| {rep['predicted_ratio']:.3f} "
                        f"| {rep['measured_speedup']:.2f}x | {100 * r['test_acc']:.2f} | {delta:+.2f} "
                        f"| {len(rep['kept_convs'])}/{rep['num_layers']} | {_removed(rep)} | {len(rep['kept_activations'])} "
                        f"| {_seg_text(rep)} | {rep['params_after']:,} | {r['seconds']:.0f} |")
        lines += ["", "</details>", ""]
    lines += [f"![accuracy vs measured latency]({stem}.png)", ""]
    md_path.parent.mkdir(parents=True, exist_ok=True)
    md_path.write_text("\n".join(lines))
    (out_dir / f"{stem}.json").write_text(json.dumps({"baselines": bases, "runs": runs}, separators=(",", ":")))
    _plot(setup, bases, runs, out_dir / f"{stem}.png")
    return md_path


def _plot(setup: Setup, bases: dict, runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"layermerge": ("tab:red", "o"), "layeronly": ("tab:blue", "s"), "depth": ("tab:green", "^")}
    fig, axes = plt.subplots(1, len(setup.nets), figsize=(5.5 * len(setup.nets), 4.2), squeeze=False)
    for ax, net in zip(axes[0], setup.nets):
        for m in setup.methods:
            pts = sorted((p.ratio, p.acc, p.sd) for b in setup.budgets
                         if (p := _point([r for r in runs if (r["net"], r["method"], r["budget"]) == (net, m, b)])))
            if pts:
                color, marker = styles[m]
                xs, ys, sds = zip(*pts)
                ax.errorbar(xs, ys, yerr=sds if len(setup.seeds) * len(setup.importance_seeds) > 1 else None, marker=marker, color=color,
                            label=m, capsize=3)
        base = bases.get(net)
        if base:
            ax.plot([1.0], [100 * base["test_acc"]], marker="*", markersize=13, color="black", linestyle="none",
                    label="uncompressed")
            # Hollow, so that the uncompressed star stays visible when both are equal.
            ax.plot([1.0], [100 * base["control_test_acc"]], marker="o", markersize=12, markerfacecolor="none",
                    markeredgecolor="gray", linestyle="none", label="uncompressed + same fine-tuning")
        ax.set_title(f"{net} ({setup.dataset})")
        ax.set_xlabel("measured latency / original (BN folded)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Accuracy vs measured CPU latency (same fine-tuning for every run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    setup, report_only = parse_args(argv)
    # One line per run is the useful log; Lightning's per-trainer banners would drown it.
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|litlogger).*")
    log_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - log_start:7.0f} s] {msg}", flush=True)

    if not report_only:
        for net in setup.nets:
            baseline(setup, net, log)
            for method in setup.methods:
                for budget in setup.budgets:
                    for iseed in setup.importance_seeds:
                        for seed in setup.seeds:
                            data = compress(setup, net, method, budget, seed, log, iseed)
                            if data["status"] == "infeasible":
                                break  # the same for every seed (the latency table decides it)
                        if data["status"] == "infeasible":
                            break
                    write_outputs(setup, None)  # outputs stay current while the grid runs
    path = write_outputs(setup, None if report_only else time.perf_counter() - log_start)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
