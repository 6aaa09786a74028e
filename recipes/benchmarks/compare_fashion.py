"""Fashion-MNIST: LayerMerge vs LayerOnly vs Depth vs width pruning at equal measured latency.

A sibling of ``compare.py`` (same trainer, classifier, KD, importance / latency settings style)
on real data with 10,000 test images (one image = 0.01 points), adding the baseline users
actually reach for: width (channel) pruning with Torch-Pruning.

For each network (``resnet20``: a CIFAR-style ResNet-20, 3 stages x 3 BasicBlocks, widths
8/16/32; ``mobilenetv2``: ``nets.SmallMobileNetV2``, inverted residuals with depthwise convs):

1. train once on the 55,000-image training split (``--train-epochs``; ``trained.pt`` is
   cached, reruns skip training) and record the test accuracy;
2. for every method and budget build the compressed network from those weights:

   * ``layermerge`` / ``layeronly`` / ``depth``: ``LayerMergeCallback(budget, method,
     distill=Distillation())`` inside ``trainer.fit`` (tables cached per network, plan cached
     per budget, so every seed fine-tunes the same plan);
   * ``width``: Torch-Pruning ``MetaPruner`` with L1-magnitude group importance
     (``MagnitudeImportance(p=1)``, the same ratio in every prunable layer, the classifier
     kept); the ratio is bisected until the *BN-folded* pruned network's measured latency
     ratio against the BN-folded original is within 3 % of the budget (side-by-side,
     interleaved, batch 64, 1 thread); the searched ratio is cached per budget;

3. fine-tune every compressed network in the *same* way: ``--finetune-epochs`` epochs, SGD lr
   ``--finetune-lr`` one-cycle cosine, batch 128, KD from the original (alpha 1, T 4: the
   callback's ``Distillation`` for the LayerMerge methods, the same ``kd_loss`` added to the
   loss for width pruning), per fine-tuning seed;
4. save the final network and measure its latency in a **separate process** against the
   BN-folded original, side by side (interleaved in ABBA order, median), at batch 1 and at
   batch 64, by the thread CPU time of each pass (wall time is recorded too: on a busy shared
   machine it swings by several x; see ``time_pair``). ``--remeasure`` re-times every saved
   network (e.g. on a quieter machine); ``--redo METHOD`` drops that method's rows;
5. append one row to the results CSV. A (net, method, budget, seed) already in the CSV is
   skipped, so the benchmark resumes after a stop.

The control row (``method = control``, budget 1.0): the uncompressed network fine-tuned with
the same schedule (without KD, which would distil it into itself), per seed.

Run (``pip install -e ".[bench]"`` for Torch-Pruning; Fashion-MNIST from
``apt-get install dataset-fashion-mnist`` or ``--data-dir``)::

    python recipes/benchmarks/compare_fashion.py --quick    # budget 0.5, seed 0, short fine-tuning
    python recipes/benchmarks/compare_fashion.py            # budgets 0.3-0.8, seeds 0 1 2 (~2 h on 2 cores)
    python recipes/benchmarks/compare_fashion.py --remeasure # re-time every saved network (quiet machine)
    python recipes/benchmarks/compare_fashion.py --report-only
    # LayerMerge with importance tables that train nothing (ImportanceSettings(method="finetune", steps=0, bn_batches=8)):
    python recipes/benchmarks/compare_fashion.py --zero-training --methods layermerge --no-control \
        --work runs/fashion_zt --csv runs/fashion_zt/compare_fashion_zt.csv

Outputs: the CSV (``recipes/benchmarks/results/compare_fashion.csv``; ``--quick``:
``compare_fashion_quick.csv``), ``compare_fashion[_quick].md`` (tables, plans, run times) and
``.png`` (test accuracy vs measured latency ratio, mean +- sd over seeds, one line per method).
Work files (weights, tables, plans, saved networks) go to ``runs/fashion``.
Text between ``<!-- notes -->`` and ``<!-- /notes -->`` of an existing ``.md`` is kept.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import lightning.pytorch as L
import torch
from torch import nn

from compare import _notes, _test_acc, _trainer, _write
from nets import Classifier, SmallMobileNetV2

from lightning_layermerge import Distillation, ImportanceSettings, LatencySettings, LayerMergeCallback, fold_batchnorm
from lightning_layermerge import trace
from lightning_layermerge.fit.distill import kd_loss
from lightning_layermerge.planning.tables.allocator import cached_allocator

# The Fashion-MNIST data and the digits ResNet come from the recipes folder above this one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits import DigitsResNet  # noqa: E402
from fashion import DEFAULT_DIR, FashionMNISTDataModule  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
LM_METHODS = ("layermerge", "layeronly", "depth")
METHODS = (*LM_METHODS, "width")
BUDGETS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
NETS = ("resnet20", "mobilenetv2")
CSV_FIELDS = ("net", "method", "budget", "seed", "status", "test_acc", "ratio_b1", "ratio_b64", "ms_b1", "ms_b64",
              "orig_ms_b1", "orig_ms_b64", "wall_ratio_b1",
              "wall_ratio_b64", "wall_ms_b1", "wall_ms_b64", "wall_orig_ms_b1", "wall_orig_ms_b64", "callback_ratio", "predicted_ratio", "width_ratio", "search_ratio",
              "kept_convs", "num_layers", "kept_acts", "segments", "params", "finetune_s", "plan_s", "total_s",
              "load", "error")
TOLERANCE = 0.03  # width pruning: |measured / budget - 1| <= 3 %


def build_net(name: str) -> nn.Module:
    """The two networks (1 input channel, 10 classes, 28x28 inputs)."""
    if name == "resnet20":
        # ResNet-20 (He et al., CIFAR variant): stem + 3 stages x 3 BasicBlocks, widths 8/16/32
        # (half the original 16/32/64, to train on 2 shared CPU cores): 19 chain convs.
        return DigitsResNet(width=8, blocks=(3, 3, 3), in_channels=1)
    if name == "mobilenetv2":
        return SmallMobileNetV2(1)  # 16 chain convs, 13 irreducible (see nets.py)
    raise ValueError(f"unknown network {name!r}; use one of {NETS}")


@dataclass(frozen=True)
class Setup:
    data_dir: str
    nets: tuple[str, ...]
    methods: tuple[str, ...]
    budgets: tuple[float, ...]
    seeds: tuple[int, ...]
    train_epochs: int
    finetune_epochs: int
    finetune_limit: int | None
    control: bool
    quick: bool
    work: Path
    csv: Path
    train_lr: float = 0.1
    finetune_lr: float = 0.02
    batch_size: int = 128
    seed: int = 0
    val_size: int = 5000
    timing_scale: float = 1.0
    # The library's defaults (what a user gets): importance entries fine-tuned for at least 30
    # steps and scored on the validation set; latency at 1 thread, in context, batch 64.
    importance: ImportanceSettings = field(default_factory=ImportanceSettings)
    latency: LatencySettings = field(default_factory=lambda: LatencySettings(batch_size=64))
    distill: Distillation = field(default_factory=lambda: Distillation(alpha=1.0, temperature=4.0))

    def datamodule(self, limit: int | None = None) -> FashionMNISTDataModule:
        return FashionMNISTDataModule(self.data_dir, batch_size=self.batch_size, val_size=self.val_size,
                                      seed=self.seed, train_limit=limit)

    def net_dir(self, net: str) -> Path:
        return self.work / net


def parse_args(argv: list[str] | None = None) -> tuple[Setup, argparse.Namespace]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=DEFAULT_DIR, help=f"the four IDX files (default {DEFAULT_DIR})")
    p.add_argument("--quick", action="store_true",
                   help="budget 0.5, seed 0, 1 fine-tuning epoch on 10,000 images; own CSV")
    p.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    p.add_argument("--budgets", nargs="+", type=float, default=None)
    p.add_argument("--seeds", nargs="+", type=int, default=None, help="fine-tuning seeds (default 0 1 2)")
    p.add_argument("--train-epochs", type=int, default=3)
    p.add_argument("--finetune-epochs", type=int, default=None,
                   help="default 1: one epoch over all 55,000 training images (quick: over 10,000)")
    p.add_argument("--finetune-limit", type=int, default=None,
                   help="fine-tune on the first N training images only (quick: 10000)")
    p.add_argument("--no-control", action="store_true", help="skip the fine-tuned uncompressed control")
    p.add_argument("--batch-size", type=int, default=128, help="training and fine-tuning batch size")
    p.add_argument("--val-size", type=int, default=5000, help="training images held out for validation")
    p.add_argument("--work", default="runs/fashion", help="weights, tables, plans, saved networks")
    p.add_argument("--csv", default=None, help="results CSV (default results/compare_fashion[_quick].csv)")
    p.add_argument("--report-only", action="store_true", help="only rebuild the .md / .png from the CSV")
    p.add_argument("--remeasure", action="store_true",
                   help="re-time every saved network of the CSV's ok rows (separate processes) and rewrite the CSV")
    p.add_argument("--redo", nargs="+", default=(), metavar="METHOD",
                   help="drop these methods' rows (and width-ratio searches) of the selected nets and budgets, then run")
    p.add_argument("--train-only", action="store_true", help="only train (or load) the networks")
    p.add_argument("--zero-training", action="store_true",
                   help="importance without sub-run training: ImportanceSettings(method='finetune', steps=0, bn_batches=8) "
                        "(each entry scored right after BatchNorm re-estimation); use its own --work and --csv")
    p.add_argument("--timing-scale", type=float, default=1.0,
                   help="scale the timed passes (tests: 0.05); 1 = 40 at batch 64, 300 at batch 1")
    # Internal: latency of one saved network in its own process.
    p.add_argument("--measure", nargs=2, metavar=("NET", "MODEL"), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    quick = a.quick
    stem = "compare_fashion_quick" if quick else "compare_fashion"
    return Setup(
        data_dir=a.data_dir, nets=tuple(a.nets), methods=tuple(a.methods),
        budgets=tuple(a.budgets or ((0.5,) if quick else BUDGETS)),
        seeds=tuple(a.seeds if a.seeds is not None else ((0,) if quick else (0, 1, 2))),
        train_epochs=a.train_epochs, finetune_epochs=a.finetune_epochs or 1,
        finetune_limit=a.finetune_limit if a.finetune_limit is not None else (10000 if quick else None),
        control=not a.no_control, quick=quick, work=Path(a.work),
        csv=Path(a.csv) if a.csv else RESULTS / f"{stem}.csv", val_size=a.val_size,
        batch_size=a.batch_size, timing_scale=a.timing_scale,
        importance=ImportanceSettings(method="finetune",
                                      steps=0, bn_batches=8) if a.zero_training else ImportanceSettings(),
    ), a


def _importance_words(settings: ImportanceSettings) -> str:
    """How the importance table of these settings was estimated, in words."""
    if settings.steps == 0:
        return (f"--zero-training: no sub-run training; each entry scored by val_loss on the validation set right "
                f"after re-estimating BatchNorm statistics on {settings.bn_batches} training batches")
    return (f"the library's defaults: at least {settings.min_steps} SGD steps per entry, scored by val_loss on the "
            "validation set")


def load_avg() -> str:
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return ""


# ---------------------------------------------------------------------- networks


def trained(setup: Setup, net: str, log: Any) -> dict:
    """Train ``net`` once on the full training split (cached: ``trained.pt`` + ``trained.json``)."""
    info_path = setup.net_dir(net) / "trained.json"
    if info_path.exists() and (setup.net_dir(net) / "trained.pt").exists():
        return json.loads(info_path.read_text())
    dm = setup.datamodule()
    start = time.perf_counter()
    L.seed_everything(setup.seed, workers=True)
    module = Classifier(build_net(net), lr=setup.train_lr)
    trainer = _trainer(setup.net_dir(net) / "train", setup.train_epochs)
    log(f"[{net}] training {setup.train_epochs} epochs (load {load_avg()})")
    trainer.fit(module, datamodule=dm)
    train_s = time.perf_counter() - start
    setup.net_dir(net).mkdir(parents=True, exist_ok=True)
    torch.save(module.model.state_dict(), setup.net_dir(net) / "trained.pt")
    acc = _test_acc(trainer, module, dm)
    model = module.model.eval()
    chain = trace(model, dm.train_set[:64][0])
    info = {"net": net, "test_acc": acc, "train_epochs": setup.train_epochs, "train_s": train_s,
            "params": sum(p.numel() for p in model.parameters()), "num_layers": chain.num_layers,
            "segments": len(chain.segments), "irreducible": sorted(chain.irreducible), "load_end": load_avg()}
    _write(info_path, info)
    log(f"[{net}] trained in {train_s:.0f} s: test acc {acc:.4f}")
    return info


def original(setup: Setup, net: str) -> nn.Module:
    model = build_net(net)
    model.load_state_dict(torch.load(setup.net_dir(net) / "trained.pt", map_location="cpu", weights_only=True))
    return model.eval()


def fold(model: nn.Module, example: torch.Tensor) -> nn.Module:
    """BatchNorm folded into the convs (the library's keep-all merge): the deployment form."""
    model = model.eval()
    chain = trace(model, example)
    return fold_batchnorm(model, chain).eval()


EXAMPLE = torch.zeros(64, 1, 28, 28)


def time_pair(ref: nn.Module, model: nn.Module, batch: int, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of ``ref`` and ``model`` per forward, interleaved pass by pass, 1 thread.

    Two clocks per pass: wall time (``perf_counter``) and the CPU time of the calling thread
    (``thread_time``; with one torch thread the forward runs in it). On a machine shared by
    several busy processes a pass is preempted for a time that grows faster than its length
    (load 7-9 on 2 cores here: the same BN-folded network's batch-64 wall median ranged
    20-98 ms between runs), so wall-time ratios swing by several x; thread CPU time counts only
    the work done and is what an otherwise idle core would show. Both are recorded; the CPU-time
    ratio is the one the tables report.

    Timed with the allocator keeping freed memory (the library's ``cached_allocator``, as every
    latency table and report is): otherwise glibc gives each large activation fresh pages, and
    the page faults land in the thread's CPU time. Measured on the Fashion MobileNetV2 at batch
    64 in fresh processes: the BN-folded original 15.3 / 25.9 ms without it against 6.4 / 5.7 ms with it,
    so a Depth-0.5 network's ratio read 0.24 / 0.29 instead of 0.56 / 0.57.
    """
    x = torch.randn(batch, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    pair = [copy.deepcopy(ref).eval(), copy.deepcopy(model).eval()]
    wall: list[list[float]] = [[], []]
    cpu: list[list[float]] = [[], []]
    with torch.no_grad(), cached_allocator():
        for m in pair:
            for _ in range(warmup):
                m(x)
        for rep in range(repeats):
            # ABBA order: whichever runs first after the other processes had the core pays for
            # cold caches; alternating cancels that (it made identical networks differ by 1.6x).
            for i in ((0, 1) if rep % 2 == 0 else (1, 0)):
                m = pair[i]
                w0, c0 = time.perf_counter(), time.thread_time()
                m(x)
                cpu[i].append((time.thread_time() - c0) * 1e3)
                wall[i].append((time.perf_counter() - w0) * 1e3)
    med = statistics.median
    return {"ref_cpu": med(cpu[0]), "cpu": med(cpu[1]), "ref_wall": med(wall[0]), "wall": med(wall[1])}


# ---------------------------------------------------------------------- width pruning


def width_prune(model: nn.Module, ratio: float) -> nn.Module:
    """L1-magnitude group pruning (Torch-Pruning), ``ratio`` of the channels of every group."""
    import torch_pruning as tp

    model = copy.deepcopy(model).eval()
    if ratio <= 0:
        return model
    last = [m for m in model.modules() if isinstance(m, nn.Linear)]
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 1, 28, 28), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=ratio, ignored_layers=last)
    pruner.step()
    return model


def width_search(setup: Setup, net: str, budget: float, log: Any) -> dict:
    """The pruning ratio whose BN-folded network measures ``budget`` +- 3 % (bisection; cached)."""
    path = setup.net_dir(net) / "width" / f"search-{budget:.2f}.json"
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    model = original(setup, net)
    ref = fold(model, EXAMPLE)
    repeats = max(2, round(25 * setup.timing_scale))
    lo, hi, tries, best = 0.0, 0.95, [], None
    for _ in range(10 if setup.timing_scale >= 1 else 3):
        r = (lo + hi) / 2
        pruned = fold(width_prune(model, r), EXAMPLE)
        t = time_pair(ref, pruned, 64, 3, repeats)
        measured = t["cpu"] / t["ref_cpu"]
        tries.append({"ratio": r, "measured": measured})
        if best is None or abs(measured / budget - 1) < abs(best["measured"] / budget - 1):
            best = tries[-1]
        if abs(measured / budget - 1) <= TOLERANCE:
            break
        lo, hi = (r, hi) if measured > budget else (lo, r)
    data = {"budget": budget, "ratio": best["ratio"], "measured": best["measured"],
            "within": abs(best["measured"] / budget - 1) <= TOLERANCE, "tries": tries,
            "seconds": time.perf_counter() - start, "load": load_avg()}
    log(f"[{net}] width-{budget:.2f}: ratio {data['ratio']:.3f} measures {data['measured']:.3f} "
        f"({len(tries)} tries, {data['seconds']:.0f} s)")
    _write(path, data)
    return data


class KDClassifier(Classifier):
    """:class:`Classifier` + ``alpha * kd_loss(student, teacher)`` (the callback's distillation term)."""

    def __init__(self, model: nn.Module, teacher: nn.Module, distill: Distillation, lr: float) -> None:
        super().__init__(model, lr=lr)
        self._teacher = [copy.deepcopy(teacher).eval().requires_grad_(False)]  # a list: not a submodule
        self.distill = distill

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        out = self(x)
        loss = torch.nn.functional.cross_entropy(out, y)
        if self.distill.alpha:
            with torch.no_grad():
                teacher = self._teacher[0](x)
            loss = loss + self.distill.alpha * kd_loss(out, teacher, self.distill.temperature)
        self.log("train_loss", loss)
        return loss


# ---------------------------------------------------------------------- runs


def run_key(net: str, method: str, budget: float, seed: int) -> tuple[str, str, str, str]:
    return net, method, f"{budget:.2f}", str(seed)


def read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open(newline="") as f:
        return [{k: v or "" for k, v in r.items() if k is not None} for r in csv.DictReader(f)]


def append_row(path: Path, row: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            w.writeheader()
        w.writerow({k: row.get(k, "") for k in CSV_FIELDS})


def measure_in_subprocess(setup: Setup, net: str, model_path: Path) -> dict:
    """Batch-1 and batch-64 latency ratio vs the BN-folded original, in a fresh process."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", net, str(model_path),
           "--work", str(setup.work), "--data-dir", setup.data_dir, "--timing-scale", str(setup.timing_scale)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode or not lines:
        raise RuntimeError(f"latency process failed ({out.returncode}): {out.stderr[-2000:]}")
    return json.loads(lines[-1])


def measure_main(setup: Setup, net: str, model_path: str) -> None:
    """The ``--measure`` process: side by side with the BN-folded original, batch 1 then batch 64."""
    compressed = torch.load(model_path, map_location="cpu", weights_only=False).eval()
    if not isinstance(compressed, torch.fx.GraphModule):  # width-pruned (or control): fold its BatchNorms
        compressed = fold(compressed, EXAMPLE)
    ref = fold(original(setup, net), EXAMPLE)
    result = {"load": load_avg()}
    torch.set_num_threads(1)
    for batch, warmup, repeats in ((1, 20, 300), (64, 5, 40)):
        t = time_pair(ref, compressed, batch, warmup, max(2, round(repeats * setup.timing_scale)))
        result.update({f"orig_ms_b{batch}": t["ref_cpu"], f"ms_b{batch}": t["cpu"],
                       f"ratio_b{batch}": t["cpu"] / t["ref_cpu"], f"wall_ratio_b{batch}": t["wall"] / t["ref_wall"],
                       f"wall_ms_b{batch}": t["wall"], f"wall_orig_ms_b{batch}": t["ref_wall"]})
    print(json.dumps(result), flush=True)


def model_path(setup: Setup, net: str, method: str, budget: float, seed: int) -> Path:
    name = f"{method}-{budget:.2f}-s{seed}" + ("-quick" if setup.quick else "")
    return setup.net_dir(net) / "models" / f"{name}.pt"


def write_rows(path: Path, rows: list[dict]) -> None:
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in CSV_FIELDS})
    os.replace(tmp, path)


def remeasure(setup: Setup, log: Any) -> None:
    """New latency columns for every ok row whose saved network exists (e.g. on a quieter machine)."""
    rows = read_rows(setup.csv)
    for r in rows:
        path = model_path(setup, r["net"], r["method"], float(r["budget"]), int(r["seed"]))
        if r["status"] == "ok" and path.exists() and r["net"] in setup.nets:
            r.update(measure_in_subprocess(setup, r["net"], path))
            log(f"[{r['net']}] {path.stem}: ratio b1 {r['ratio_b1']:.3f} b64 {r['ratio_b64']:.3f} "
                f"(wall {r['wall_ratio_b1']:.3f} / {r['wall_ratio_b64']:.3f}), load {r['load']}")
    write_rows(setup.csv, rows)


def redo(setup: Setup, methods: tuple[str, ...]) -> None:
    """Forget the rows (and width searches) of ``methods`` for the selected nets and budgets."""
    budgets = {f"{b:.2f}" for b in setup.budgets}
    rows = read_rows(setup.csv)
    keep = [r for r in rows if not (r["method"] in methods and r["net"] in setup.nets and r["budget"] in budgets)]
    write_rows(setup.csv, keep)
    if "width" in methods:
        for net in setup.nets:
            for b in setup.budgets:
                (setup.net_dir(net) / "width" / f"search-{b:.2f}.json").unlink(missing_ok=True)


def run_one(setup: Setup, net: str, method: str, budget: float, seed: int, log: Any) -> dict:
    """Compress (or not: control), fine-tune, save, measure in a separate process; one CSV row."""
    saved = model_path(setup, net, method, budget, seed)
    name = saved.stem
    row: dict[str, Any] = {"net": net, "method": method, "budget": f"{budget:.2f}", "seed": seed}
    start = time.perf_counter()
    dm = setup.datamodule()
    saved.parent.mkdir(parents=True, exist_ok=True)
    try:
        plan_s = 0.0
        callbacks: list = []
        if method in LM_METHODS:
            L.seed_everything(seed, workers=True)
            module = Classifier(original(setup, net).train(), lr=setup.finetune_lr)
            callback = LayerMergeCallback(budget=budget, target="model", method=method, monitor="val_loss",
                                          mode="min", importance=setup.importance, latency=setup.latency,
                                          distill=setup.distill, cache_dir=str(setup.net_dir(net) / "cache"),
                                          verbose=False)
            callbacks = [callback]
        elif method == "width":
            search = width_search(setup, net, budget, log)
            plan_s = time.perf_counter() - start
            row.update(width_ratio=search["ratio"], search_ratio=search["measured"])
            L.seed_everything(seed, workers=True)
            teacher = original(setup, net)
            module = KDClassifier(width_prune(teacher, search["ratio"]).train(), teacher, setup.distill,
                                  setup.finetune_lr)
        else:  # control: uncompressed, same schedule, no KD
            L.seed_everything(seed, workers=True)
            module = Classifier(original(setup, net).train(), lr=setup.finetune_lr)
        # --finetune-limit: fewer batches per epoch (shuffled, so a random subset per seed); the
        # importance sub-runs still draw from the whole training split, so quick and full share tables.
        limit = max(1, setup.finetune_limit // setup.batch_size) if setup.finetune_limit else None
        trainer = L.Trainer(max_epochs=setup.finetune_epochs, accelerator="cpu", devices=1, callbacks=callbacks,
                            logger=False, default_root_dir=str(setup.net_dir(net) / "runs" / name),
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, limit_train_batches=limit)
        ft_start = time.perf_counter()
        trainer.fit(module, datamodule=dm)
        acc = _test_acc(trainer, module, dm)
        row.update(test_acc=acc, finetune_s=time.perf_counter() - ft_start)
        if callbacks:
            rep = callbacks[0].report.to_dict()
            row.update(callback_ratio=rep["measured_ratio"], predicted_ratio=rep["predicted_ratio"],
                       kept_convs=len(rep["kept_convs"]), num_layers=rep["num_layers"],
                       kept_acts=len(rep["kept_activations"]),
                       segments=" ".join(f"({i},{j}]k{k}" for i, j, k in rep["segments"] if j - i > 1) or "-",
                       params=rep["params_after"])
            row["finetune_s"] = row["finetune_s"]  # includes the callback's tables / plan on a first run
        else:
            row["params"] = sum(p.numel() for p in module.model.parameters())
        row["plan_s"] = plan_s
        torch.save(module.model.eval(), saved)
        row.update(measure_in_subprocess(setup, net, saved))
        row["status"] = "ok"
    except ValueError as err:
        row.update(status="infeasible" if "smallest latency" in str(err) else "error", error=str(err)[:300])
    except Exception as err:  # noqa: BLE001 - a failed run is a row; rerun after a fix by deleting it
        row.update(status="error", error=f"{type(err).__name__}: {err}"[:300])
        traceback.print_exc()
    row["total_s"] = time.perf_counter() - start
    append_row(setup.csv, row)
    if row["status"] == "ok":
        log(f"[{net}] {name}: acc {row['test_acc']:.4f}, ratio b1 {row['ratio_b1']:.3f} b64 {row['ratio_b64']:.3f}"
            f" (callback {row.get('callback_ratio') or float('nan'):.3f}), {row['total_s']:.0f} s, load {row['load']}")
    else:
        log(f"[{net}] {name}: {row['status']}: {row.get('error')}")
    return row


# ---------------------------------------------------------------------- outputs


def _f(row: dict, key: str) -> float | None:
    try:
        return float(row[key])
    except (KeyError, TypeError, ValueError):
        return None


@dataclass
class Point:
    b1: float
    b64: float
    acc: float
    sd: float
    n: int


def point(rows: list[dict]) -> Point | None:
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return None
    accs = [100 * float(r["test_acc"]) for r in ok]
    return Point(statistics.median(float(r["ratio_b1"]) for r in ok), statistics.median(float(r["ratio_b64"])
                 for r in ok), statistics.fmean(accs), statistics.stdev(accs) if len(accs) > 1 else 0.0, len(ok))


def cell(rows: list[dict]) -> str:
    p = point(rows)
    if p is None:
        return "not run" if not rows else rows[-1]["status"]
    sd = f" ± {p.sd:.2f}" if p.n > 1 else ""
    return f"{p.acc:.2f}{sd} (n={p.n}) @ {p.b1:.2f} / {p.b64:.2f}"


#: Latency ratios within this relative margin count as equal (the width search's tolerance).
EQUAL_LATENCY = 0.03


def verdict(lm: Point, other: Point, batch: str = "b64") -> str:
    """LayerMerge against one other method at one budget, at one batch size's measured latency.

    "wins" / "loses": more / less accurate by more than one standard deviation over seeds (the
    larger of the two) at equal or lower / equal or higher measured latency (equal: within
    :data:`EQUAL_LATENCY`); "ties": within one standard deviation at equal latency; otherwise a
    trade-off (one is more accurate, the other faster), with both differences.
    """
    t_lm, t_other = getattr(lm, batch), getattr(other, batch)
    gap = lm.acc - other.acc
    sd = max(lm.sd, other.sd)
    faster_or_equal = t_lm <= t_other * (1 + EQUAL_LATENCY)
    slower_or_equal = t_lm >= t_other * (1 - EQUAL_LATENCY)
    detail = f"{gap:+.2f} points (sd {sd:.2f}), latency {t_lm:.3f} vs {t_other:.3f}"
    if gap > sd and faster_or_equal:
        return f"wins, {detail}"
    if gap < -sd and slower_or_equal:
        return f"loses, {detail}"
    if abs(gap) <= sd and faster_or_equal and slower_or_equal:
        return f"ties, {detail}"
    if abs(gap) <= sd:
        return f"ties on accuracy and is {'faster' if t_lm < t_other else 'slower'}, {detail}"
    return f"trade-off, {detail}"


def verdict_lines(groups: dict[tuple, list[dict]], net: str, budgets: Sequence[float],
                  methods: Sequence[str]) -> list[str]:
    """One line per budget: LayerMerge against each other method that ran, at batch 64 and batch 1."""
    def plan_of(rows: list[dict]) -> tuple | None:
        ok = [r for r in rows if r["status"] == "ok"]
        return (ok[0].get("segments"), ok[0].get("kept_convs"), ok[0].get("kept_acts")) if ok else None

    lines = []
    for b in budgets:
        lm_rows = groups.get((net, "layermerge", f"{b:.2f}"), [])
        lm = point(lm_rows)
        if lm is None:
            continue
        parts = []
        for m in methods:
            rows = groups.get((net, m, f"{b:.2f}"), []) if m != "layermerge" else []
            other = point(rows)
            if other is None:
                continue
            if m != "width" and plan_of(rows) == plan_of(lm_rows):  # same network: only the timing differs
                parts.append(f"vs {m}: the same plan (accuracy {lm.acc:.2f} for both; the two measurements of it "
                             f"gave {lm.b64:.3f} / {other.b64:.3f} at batch 64)")
            else:
                parts.append(f"vs {m}: batch 64 {verdict(lm, other)}; batch 1 {verdict(lm, other, 'b1')}")
        if parts:
            lines.append(f"- **{b:.2f}**: " + "; ".join(parts) + ".")
    return lines


def write_outputs(setup: Setup, command: str) -> Path:
    rows = read_rows(setup.csv)
    stem = setup.csv.stem
    md = setup.csv.with_suffix(".md")
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["net"], r["method"], r["budget"]), []).append(r)
    lines = [
        "# Fashion-MNIST: LayerMerge vs LayerOnly vs Depth vs width pruning at equal measured latency (CPU)", "",
        _notes(md), "",
        f"Command: `{command}`. Rows: {len(rows)} "
        f"({sum(r['status'] == 'ok' for r in rows)} ok); compute summed over them: "
        f"{sum(_f(r, 'total_s') or 0 for r in rows) / 60:.0f} min.", "",
        f"Setup: Fashion-MNIST 28x28, 55,000 train / 5,000 val (seed 0) / 10,000 test images; each network "
        f"trained once ({setup.train_epochs} epochs, SGD lr {setup.train_lr} one-cycle, batch {setup.batch_size}); "
        f"every compressed network fine-tuned the same way: {setup.finetune_epochs} epoch(s) on "
        f"{setup.finetune_limit or 55000:,} training images, SGD lr {setup.finetune_lr} one-cycle cosine, batch "
        f"{setup.batch_size}, KD from the original (alpha {setup.distill.alpha}, T {setup.distill.temperature}); "
        f"seeds {', '.join(map(str, setup.seeds))}. Importance (LayerMerge methods): `{setup.importance}` "
        f"({_importance_words(setup.importance)}); latency: `{setup.latency}`. Width pruning: "
        "Torch-Pruning MetaPruner, L1 magnitude group importance, uniform ratio, bisected to ±3 % of the budget "
        "on the BN-folded network (batch 64).",
        "**Measured ratio**: the final network against the BN-folded original, side by side (interleaved, "
        "median of 300 passes at batch 1 and 40 at batch 64, 1 thread) in a separate process after "
        f"fine-tuning. Machine: {platform.machine()}, 2 cores shared with other jobs (load average at "
        f"measurement in the CSV's `load` column); torch {torch.__version__}.", "",
    ]
    for net in setup.nets:
        info_path = setup.net_dir(net) / "trained.json"
        lines += [f"## {net}", ""]
        if info_path.exists():
            info = json.loads(info_path.read_text())
            lines += [f"Uncompressed: test acc **{100 * info['test_acc']:.2f} %** after {info['train_epochs']} "
                      f"epochs ({info['train_s'] / 60:.0f} min), {info['params']:,} parameters, L = "
                      f"{info['num_layers']} chain convs ({len(info['irreducible'])} irreducible), "
                      f"{info['segments']} table entries.", ""]
        ctrl = groups.get((net, "control", "1.00"), [])
        if ctrl:
            lines += [f"Control (uncompressed + the same fine-tuning): {cell(ctrl)}.", ""]
        lines += ["Test accuracy % (mean ± sd over seeds, n seeds) @ measured latency ratio batch 1 / batch 64:", "",
                  "| budget | " + " | ".join(setup.methods) + " |", "|---:|" + ":---:|" * len(setup.methods)]
        for b in setup.budgets:
            lines.append(f"| {b:.2f} | " + " | ".join(cell(groups.get((net, m, f"{b:.2f}"), []))
                                                      for m in setup.methods) + " |")
        verdicts = verdict_lines(groups, net, setup.budgets, setup.methods)
        if verdicts:
            lines += ["", "LayerMerge against each method, per budget (wins / loses: more than one sd over seeds apart "
                      f"at equal or lower / higher measured latency, equal meaning within {EQUAL_LATENCY:.0%}):", "",
                      *verdicts]
        lines += ["", "<details><summary>every run</summary>", "",
                  "| method | budget | seed | status | test acc | ratio b1 | ratio b64 | callback ratio (b64) | "
                  "predicted | width ratio | kept convs | acts | merged segments | params | run s | load |",
                  "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|"]
        for r in rows:
            if r["net"] != net:
                continue
            def g(k: str, fmt: str = "{:.3f}") -> str:
                v = _f(r, k)
                return fmt.format(v) if v is not None else ""
            kept = f"{r['kept_convs']}/{r['num_layers']}" if r.get("kept_convs") else ""
            lines.append(f"| {r['method']} | {r['budget']} | {r['seed']} | {r['status']} {r.get('error', '')[:80]} "
                         f"| {g('test_acc', '{:.4f}')} | {g('ratio_b1')} | {g('ratio_b64')} | {g('callback_ratio')} "
                         f"| {g('predicted_ratio')} | {g('width_ratio')} | {kept} | {r.get('kept_acts', '')} "
                         f"| {r.get('segments', '')} | {r.get('params', '')} | {g('total_s', '{:.0f}')} "
                         f"| {r.get('load', '')} |")
        lines += ["", "</details>", ""]
    lines += [f"![accuracy vs measured latency]({stem}.png)", ""]
    md.write_text("\n".join(lines))
    plot(setup, rows, setup.csv.with_suffix(".png"))
    return md


def plot(setup: Setup, rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = {"layermerge": ("tab:red", "o"), "layeronly": ("tab:blue", "s"), "depth": ("tab:green", "^"),
              "width": ("tab:purple", "D")}
    fig, axes = plt.subplots(2, len(setup.nets), figsize=(5.5 * len(setup.nets), 8), squeeze=False)
    for col, net in enumerate(setup.nets):
        info_path = setup.net_dir(net) / "trained.json"
        for row_i, batch in enumerate(("b1", "b64")):
            ax = axes[row_i][col]
            for m in setup.methods:
                pts = []
                for b in setup.budgets:
                    p = point([r for r in rows if (r["net"], r["method"], r["budget"]) == (net, m, f"{b:.2f}")])
                    if p:
                        pts.append((p.b1 if batch == "b1" else p.b64, p.acc, p.sd))
                if pts:
                    xs, ys, sds = zip(*sorted(pts))
                    color, marker = styles[m]
                    ax.errorbar(xs, ys, yerr=sds, marker=marker, color=color, label=m, capsize=3)
            ctrl = point([r for r in rows if (r["net"], r["method"]) == (net, "control")])
            if ctrl:
                ax.errorbar([ctrl.b1 if batch == "b1" else ctrl.b64], [ctrl.acc], yerr=[ctrl.sd], marker="o",
                            markerfacecolor="none", color="gray", linestyle="none", label="control", capsize=3)
            if info_path.exists():
                ax.plot([1.0], [100 * json.loads(info_path.read_text())["test_acc"]], marker="*", markersize=12,
                        color="black", linestyle="none", label="uncompressed")
            ax.set_title(f"{net}, latency at batch {batch[1:]}")
            ax.set_xlabel("measured latency / BN-folded original")
            ax.set_ylabel("test accuracy (%)")
            ax.grid(alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8, loc="lower right")
    fig.suptitle("Fashion-MNIST: accuracy vs measured CPU latency (same fine-tuning; mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    setup, a = parse_args(argv)
    if a.measure:
        measure_main(setup, *a.measure)
        return
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=".*(LeafSpec|does not have many workers|litlogger|Checkpoint).*")
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')} {time.perf_counter() - t0:6.0f} s] {msg}", flush=True)

    command = "python recipes/benchmarks/compare_fashion.py " + " ".join(argv if argv is not None else sys.argv[1:])
    if a.remeasure:
        remeasure(setup, log)
    elif a.redo:
        redo(setup, tuple(a.redo))
    if not a.report_only and not a.remeasure:
        FashionMNISTDataModule(setup.data_dir).prepare_data()  # the install hint, before any work
        for net in setup.nets:
            trained(setup, net, log)
        if a.train_only:
            return
        done = {run_key(r["net"], r["method"], float(r["budget"]), int(r["seed"])) for r in read_rows(setup.csv)
                if r["status"] in ("ok", "infeasible")}
        for net in setup.nets:
            grid = [("control", 1.0)] if setup.control else []
            grid += [(m, b) for b in setup.budgets for m in setup.methods]
            for method, budget in grid:
                for seed in setup.seeds:
                    if run_key(net, method, budget, seed) in done:
                        continue
                    row = run_one(setup, net, method, budget, seed, log)
                    done.add(run_key(net, method, budget, seed))
                    if row["status"] == "infeasible":
                        break  # the same plan for every seed
                write_outputs(setup, command)
    path = write_outputs(setup, command)
    log(f"wrote {path}")


if __name__ == "__main__":
    main()
