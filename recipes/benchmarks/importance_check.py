"""Does the importance table rank segments like long fine-tunes do? (issue 13, item 3)

For each network (the digits ResNet and MobileNetV2 of ``compare.py``, 16 px digits):

1. train it once (``--train-epochs``, SGD lr 0.1 one-cycle, as ``compare.py``);
2. sample ``--entries`` table entries (segments whose replacement changes the network, plus
   none of the trivial keep-the-conv single-layer ones) with a fixed seed;
3. **oracle** per entry: prune, re-estimate BatchNorm, fine-tune ``--oracle-epochs`` epochs on
   the whole training set (SGD lr 0.02 one-cycle, batch 64) and score on the whole
   validation set (270 images): ``val_loss`` and ``val_acc``;
4. for each importance setting (``SETTINGS``): the entry as the callback computes it
   (``SubRunner.finetune`` + ``SubRunner.metrics``, the real code path), and the noise level
   (the unmodified network through the same protocol, ``noise_repeats`` times);
5. Spearman rank correlation between each setting's Perf and the oracle's (both
   ``-val_loss`` and ``val_acc`` as Perf), the setting's compute per entry, and its noise.

Every entry's result is appended to ``<work>/results.jsonl`` as soon as it is known and
skipped when present, so an interrupted run resumes; ``--report-only`` rebuilds the outputs.
Writes ``importance_check.md``, ``.json`` and ``.png`` to ``--out`` (default
``recipes/benchmarks/results/``).

Run::

    python recipes/benchmarks/importance_check.py                       # default grid
    python recipes/benchmarks/importance_check.py --entries 12 --settings new_default old_default
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import random
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from nets import Classifier, DigitsDataModule, build_net

from lightning_layermerge import Plan, prune, trace
from lightning_layermerge.planning.bn_recalibration import recalibrate_batchnorm
from lightning_layermerge.fit.importance_settings import ImportanceSettings, Monitor
from lightning_layermerge.fit.subruns import SubRunner, quiet

RESULTS = Path(__file__).resolve().parent / "results"
NETS = ("resnet", "mobilenetv2")

#: The settings compared. ``old_*``: what the code did before issue 13 (no floors, scored on
#: held-out training samples, no BatchNorm re-estimation).
SETTINGS: dict[str, ImportanceSettings] = {
    # The library default before issue 13: fraction 0.04 = 47 images, 1 step, scored on 47.
    "old_default": ImportanceSettings(method="finetune", min_steps=0, min_score_samples=1, score_on="train",
                                      bn_batches=0, noise_repeats=3),
    # compare.py's settings before issue 13: 20 SGD steps on 15 %, scored on another 15 %.
    "old_compare": ImportanceSettings(method="finetune", fraction=0.15, steps=20, batch_size=32, lr=0.02,
                                      min_score_samples=1, score_on="train", bn_batches=0, noise_repeats=3),
    # old_compare's fine-tune scored on the validation set: the scoring set's effect alone.
    "old_compare_val": ImportanceSettings(method="finetune", fraction=0.15, steps=20, batch_size=32, lr=0.02,
                                          bn_batches=0),
    # The library default: the head probe (BatchNorm re-estimation, the classifier head refit on
    # frozen features; no optimizer step through the network).
    "default": ImportanceSettings(),
    # The fine-tune chosen from this study: floors of 30 steps and 1000 (here: all 270 val) samples
    # (the default before the probe; ``default`` in results written before 2026-12-01).
    "finetune": ImportanceSettings(method="finetune"),
    # The same + BatchNorm re-estimation (8 batches) before each fine-tune, and variants of it.
    "floors_bn8": ImportanceSettings(method="finetune", bn_batches=8),
    "bn8_only": ImportanceSettings(method="finetune", steps=0, bn_batches=8),
    "bn8_10_steps": ImportanceSettings(method="finetune", steps=10, bn_batches=8),
    "floors_bn8_60_steps": ImportanceSettings(method="finetune", min_steps=60, bn_batches=8),
    "floors_bn8_kd": ImportanceSettings(method="finetune", bn_batches=8, kd_alpha=1.0),
}

#: Entries (positions in the sorted sample) re-run with 2 more seeds to measure the noise of
#: damaged networks (the noise level of the unmodified network alone underestimates it).
REPEATED = (0, 7, 14)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nets", nargs="+", choices=NETS, default=list(NETS))
    p.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    p.add_argument("--entries", type=int, default=30, help="sampled table entries per network")
    p.add_argument("--train-epochs", type=int, default=20)
    p.add_argument("--oracle-epochs", type=int, default=3)
    p.add_argument("--work", default="runs/importance_check")
    p.add_argument("--budget-s", type=float, default=None, help="stop (resumably) after this many seconds")
    p.add_argument("--plans", type=int, default=0,
                   help="random plans per network whose summed table importance (finetune setting, whole "
                        "table) is compared with their accuracy after the oracle's fine-tuning")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=str(RESULTS),
                   help="folder for importance_check.md/.json/.png (default: the committed results; "
                        "pass another folder when trying settings, so the committed report is kept)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    return a


# ---------------------------------------------------------------------- data, nets


def datamodule() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=16, batch_size=64, seed=0)
    dm.setup("fit")
    return dm


def _trainer(epochs: int) -> L.Trainer:
    return L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)


def trained(work: Path, net: str, epochs: int) -> nn.Module:
    """The trained network (trained once, then loaded)."""
    path = work / net / "trained.pt"
    model = build_net(net, 1)
    if path.exists():
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        return model.eval()
    L.seed_everything(0, workers=True)
    module = Classifier(model, lr=0.1)
    with quiet():
        _trainer(epochs).fit(module, datamodule=datamodule())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model.eval()


def sample_entries(chain: Any, n: int) -> list[tuple[int, int, int]]:
    """``n`` entries whose replacement changes the network (fixed seed), sorted."""
    trivial = {s.key for s in chain.segments if s.j == s.i + 1 and s.convs == (s.j,)}
    keys = sorted(s.key for s in chain.segments if s.key not in trivial)
    random.Random(0).shuffle(keys)  # a fixed order: a larger n extends a smaller one
    return sorted(keys[:n])


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader) -> dict[str, float]:
    """val_loss / val_acc on a whole loader."""
    model.eval()
    loss = correct = count = 0.0
    for x, y in loader:
        logits = model(x)
        loss += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += float((logits.argmax(1) == y).sum())
        count += len(y)
    return {"val_loss": loss / count, "val_acc": correct / count}


def oracle(model: nn.Module, chain: Any, key: tuple[int, int, int], epochs: int) -> dict[str, float]:
    """The entry after a long fine-tune, scored on the whole validation set."""
    return finetuned_plan(model, chain, Plan.replacing(chain, chain.segment(*key)), epochs)


def runner_for(model: nn.Module, settings: ImportanceSettings, dm: Any = None) -> SubRunner:
    """The callback's sub-run machinery on the recipe's module and ``dm``'s loaders (default: the digits),
    checked as the callback checks it (which also measures the probe's blind head)."""
    dm = dm if dm is not None else datamodule()
    runner = SubRunner(Classifier(copy.deepcopy(model), lr=0.02), "model", dm.train_dataloader(), settings,
                       val_loader=dm.val_dataloader())
    runner.monitor = Monitor("val_loss", "min", False)
    runner.check_finetune(model)
    return runner


# ---------------------------------------------------------------------- results file


class Store:
    """Append-only JSON lines, keyed; a key present is never recomputed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows: dict[str, dict] = {}
        if path.exists():
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    self.rows[row["id"]] = row

    def __contains__(self, key: str) -> bool:
        return key in self.rows

    def add(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        self.rows[row["id"]] = row


def run(args: argparse.Namespace) -> None:
    work = Path(args.work)
    store = Store(work / "results.jsonl")
    start = time.perf_counter()

    def out_of_time() -> bool:
        return args.budget_s is not None and time.perf_counter() - start > args.budget_s

    for net in args.nets:
        model = trained(work, net, args.train_epochs)
        dm = datamodule()
        chain = trace(model, dm.train_set[:2][0])
        keys = sample_entries(chain, args.entries)
        base_id = f"{net}/base"
        if base_id not in store:
            store.add({"id": base_id, "net": net, "kind": "base", **evaluate(model, dm.val_dataloader()),
                       "segments": len(chain.segments), "num_layers": chain.num_layers,
                       "train_size": len(dm.train_set), "val_size": len(dm.val_set)})
        for key in keys:
            rid = f"{net}/oracle/{key}"
            if rid in store:
                continue
            if out_of_time():
                return
            t = time.perf_counter()
            store.add({"id": rid, "net": net, "kind": "oracle", "key": list(key),
                       **oracle(model, chain, key, args.oracle_epochs), "seconds": time.perf_counter() - t})
            print(f"[{net}] oracle {key}: {store.rows[rid]}", flush=True)
        for name in args.settings:
            settings = SETTINGS[name]
            runner = runner_for(model, settings)
            nid = f"{net}/{name}/null"
            if nid not in store:
                if out_of_time():
                    return
                t = time.perf_counter()
                nulls = []
                for r in range(settings.noise_repeats):
                    trained_net = runner.finetune(copy.deepcopy(model), None, repeat=r)
                    nulls.append(runner.metrics(trained_net, training_loss=False, repeat=r))
                base = runner.metrics(copy.deepcopy(model), training_loss=False)
                store.add({"id": nid, "net": net, "kind": "null", "setting": name, "nulls": nulls, "base": base,
                           "steps": runner.steps, "score_samples": runner.score_samples,
                           "train_samples": len(runner.train_idx), "batch_size": runner.batch_size,
                           "seconds": time.perf_counter() - t})
            for key in keys:
                rid = f"{net}/{name}/{key}"
                if rid in store:
                    continue
                if out_of_time():
                    return
                t = time.perf_counter()
                pruned = prune(model, chain, Plan.replacing(chain, chain.segment(*key)))
                trained_net = runner.finetune(pruned, chain.segment(*key))
                metrics = runner.metrics(trained_net, training_loss=False)
                store.add({"id": rid, "net": net, "kind": "entry", "setting": name, "key": list(key),
                           "val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"],
                           "seconds": time.perf_counter() - t})
            for pos in REPEATED:
                if pos >= len(keys):
                    continue
                key = keys[pos]
                for r in (1, 2):
                    rid = f"{net}/{name}/{key}/r{r}"
                    if rid in store:
                        continue
                    if out_of_time():
                        return
                    seg = chain.segment(*key)
                    trained_net = runner.finetune(prune(model, chain, Plan.replacing(chain, seg)), seg, repeat=r)
                    metrics = runner.metrics(trained_net, training_loss=False, repeat=r)
                    store.add({"id": rid, "net": net, "kind": "repeat", "setting": name, "key": list(key),
                               "repeat": r, "val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"]})
            print(f"[{net}] {name} done ({time.perf_counter() - start:.0f} s)", flush=True)
        if args.plans and not plans_stage(store, net, model, chain, args, out_of_time):
            return


def default_entry(runner: SubRunner, net: str, model: nn.Module, chain: Any, seg: Any,
                  setting: str = "default") -> dict:
    """One entry of the ``setting`` table as the callback computes it with ``runner`` (a store row)."""
    t = time.perf_counter()
    trained_net = runner.finetune(prune(model, chain, Plan.replacing(chain, seg)), seg)
    metrics = runner.metrics(trained_net, training_loss=False)
    return {"id": f"{net}/{setting}/{seg.key}", "net": net, "kind": "entry", "setting": setting,
            "key": list(seg.key), "val_loss": metrics["val_loss"], "val_acc": metrics["val_acc"],
            "perf": runner.score(trained_net), "seconds": time.perf_counter() - t}


def finetuned_plan(model: nn.Module, chain: Any, plan: Plan, epochs: int, dm: Any = None) -> dict[str, float]:
    """``plan`` pruned, BatchNorm re-estimated on 8 batches, fine-tuned ``epochs`` on ``dm``'s whole
    training set (default: the digits) and scored on its whole validation set: val_loss / val_acc."""
    dm = dm if dm is not None else datamodule()
    pruned = prune(model, chain, plan)
    L.seed_everything(0, workers=True)
    recalibrate_batchnorm(pruned, dm.train_dataloader(), 8)
    module = Classifier(pruned.train(), lr=0.02)  # Lightning keeps eval() modules in eval mode
    with quiet():
        _trainer(epochs).fit(module, train_dataloaders=dm.train_dataloader())
    return evaluate(pruned, dm.val_dataloader())


def random_plan(chain: Any, rng: random.Random) -> Plan:
    """``Plan.random``: a uniformly random walk over legal segments from position 0 to L."""
    return Plan.random(chain, rng)


def plans_stage(store: Store, net: str, model: nn.Module, chain: Any, args: argparse.Namespace,
                out_of_time: Any) -> bool:
    """The whole ``finetune`` table, then random plans fine-tuned like the oracle; False if out of time."""
    runner = runner_for(model, SETTINGS["finetune"])
    for seg in chain.segments:
        rid = f"{net}/finetune/{seg.key}"
        if rid in store:
            continue
        if out_of_time():
            return False
        store.add(default_entry(runner, net, model, chain, seg, "finetune"))
    rng = random.Random(1)
    for index in range(args.plans):
        plan = random_plan(chain, rng)
        rid = f"{net}/plan/{index}"
        if rid in store:
            continue
        if out_of_time():
            return False
        store.add({"id": rid, "net": net, "kind": "plan", "segments": [list(k) for k in plan.keys],
                   **finetuned_plan(model, chain, plan, args.oracle_epochs)})
    return True


def plan_rows(store: Store) -> list[dict]:
    """Spearman of the plans' summed log-importance (``finetune`` table) with their accuracy (the probe's
    plan sums: ``importance_zero_training.py``)."""
    out = []
    for net in NETS:
        null = store.rows.get(f"{net}/finetune/null")
        plans = [r for r in store.rows.values() if r["net"] == net and r["kind"] == "plan"]
        table = {tuple(r["key"]): r for r in store.rows.values()
                 if r["net"] == net and r.get("setting") == "finetune" and r["kind"] == "entry"}
        if null is None or len(plans) < 3:
            continue
        base = -null["base"]["val_loss"]
        summed = []
        for r in plans:
            perf = [-table[tuple(k)]["val_loss"] for k in r["segments"] if tuple(k) in table]
            if len(perf) != len(r["segments"]):
                break
            summed.append(sum(_perf(perf)) - base * len(perf))
        else:
            out.append({"net": net, "plans": len(plans),
                        "rho_loss": spearman(summed, _perf([-r["val_loss"] for r in plans])),
                        "rho_acc": spearman(summed, [r["val_acc"] for r in plans]),
                        "acc_range": (min(r["val_acc"] for r in plans), max(r["val_acc"] for r in plans))})
    return out


# ---------------------------------------------------------------------- report


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    from scipy.stats import spearmanr

    if len(a) < 3 or len(set(a)) < 2 or len(set(b)) < 2:
        return math.nan
    return float(spearmanr(a, b).statistic)


def _perf(values: list[float]) -> list[float]:
    """NaN (a diverged run) ranks below every finite value."""
    finite = [v for v in values if math.isfinite(v)]
    floor = (min(finite) if finite else 0.0) - 1.0
    return [v if math.isfinite(v) else floor for v in values]


def _entry_sigma(store: Store, net: str, name: str, entries: dict) -> float:
    """Pooled standard deviation of -val_loss over the seeds of the re-run entries."""
    groups: dict[tuple, list[float]] = {}
    for r in store.rows.values():
        if r["net"] == net and r.get("setting") == name and r["kind"] == "repeat":
            key = tuple(r["key"])
            if key in entries and math.isfinite(r["val_loss"]) and math.isfinite(entries[key]["val_loss"]):
                groups.setdefault(key, [-entries[key]["val_loss"]]).append(-r["val_loss"])
    variances = [statistics.variance(v) for v in groups.values() if len(v) >= 2]
    return math.sqrt(statistics.mean(variances)) if variances else math.nan


def summarise(store: Store) -> list[dict]:
    """One row per (net, setting) with complete data."""
    rows = []
    by = store.rows.values()
    for net in NETS:
        oracle_rows = {tuple(r["key"]): r for r in by if r["net"] == net and r["kind"] == "oracle"}
        base = next((r for r in by if r["id"] == f"{net}/base"), None)
        for name in SETTINGS:
            null = store.rows.get(f"{net}/{name}/null")
            entries = {tuple(r["key"]): r for r in by if r.get("setting") == name and r["net"] == net
                       and r["kind"] == "entry"}
            common = sorted(set(entries) & set(oracle_rows))
            if null is None or len(common) < 3:
                continue
            o_loss = _perf([-oracle_rows[k]["val_loss"] for k in common])
            o_acc = [oracle_rows[k]["val_acc"] for k in common]
            t_loss = _perf([-entries[k]["val_loss"] for k in common])
            t_acc = [entries[k]["val_acc"] for k in common]
            null_loss = [-n["val_loss"] for n in null["nulls"] if math.isfinite(n["val_loss"])]
            sigma = statistics.stdev(null_loss) if len(null_loss) >= 2 else math.nan
            base_perf = -null["base"]["val_loss"]
            distinct = sum(abs(p - base_perf) > 2 * sigma for p in t_loss)
            sigma_entry = _entry_sigma(store, net, name, entries)
            distinct_entry = sum(abs(p - base_perf) > 2 * sigma_entry for p in t_loss) \
                if math.isfinite(sigma_entry) else None
            sec = statistics.mean(entries[k]["seconds"] for k in common)
            epochs_per_entry = null["steps"] * null["batch_size"] / base["train_size"] if base else math.nan
            rows.append({
                "net": net, "setting": name, "entries": len(common),
                "rho_loss": spearman(t_loss, o_loss), "rho_acc": spearman(t_acc, o_acc),
                "rho_loss_vs_oracle_acc": spearman(t_loss, o_acc),
                "sigma": sigma, "distinct": distinct,
                "sigma_entry": sigma_entry, "distinct_entry": distinct_entry, "steps": null["steps"], "score_samples": null["score_samples"],
                "epochs_per_entry": epochs_per_entry,
                "table_epochs": epochs_per_entry * base["segments"] if base else math.nan,
                "seconds_per_entry": sec,
            })
    return rows


def write_report(store: Store, args: argparse.Namespace) -> None:
    rows = summarise(store)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# Importance table vs long fine-tunes (digits, CPU)", "",
             "<!-- notes -->", _notes(out), "<!-- /notes -->", "",
             f"Command: `python recipes/benchmarks/importance_check.py --entries {args.entries} --oracle-epochs "
             f"{args.oracle_epochs} --train-epochs {args.train_epochs} --plans {args.plans}` "
             "(run here in 300-s chunks with "
             "`--budget-s 300`, resuming from `results.jsonl`). Spearman is over the sampled entries: -val_loss "
             "(the recipe's monitor) or val_acc of the setting's table entry vs the same of the oracle.",
             f"Machine: {platform.machine()}, 2 shared CPU cores, 1 torch thread; torch {torch.__version__}.", ""]
    for net in NETS:
        base = store.rows.get(f"{net}/base")
        if base is None:
            continue
        n_oracle = sum(1 for r in store.rows.values() if r["net"] == net and r["kind"] == "oracle")
        lines += [f"## {net}", "",
                  f"Trained: val acc {base['val_acc']:.4f}, val_loss {base['val_loss']:.4f}; L = {base['num_layers']}, "
                  f"{base['segments']} table entries; {min(n_oracle, args.entries)} sampled entries with an oracle "
                  f"({args.oracle_epochs} epochs of fine-tuning after BatchNorm re-estimation, whole val set of "
                  f"{base['val_size']}).", "",
                  "| setting | entries | Spearman (-loss) | Spearman (acc) | sigma, original | > 2 sigma | "
                  "sigma, entries | > 2 sigma | steps/entry | scored on | epochs/entry | whole table, epochs | "
                  "s/entry |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in (r for r in rows if r["net"] == net):
            de = "-" if r["distinct_entry"] is None else f"{r['distinct_entry']}/{r['entries']}"
            lines.append(f"| {r['setting']} | {r['entries']} | {r['rho_loss']:.3f} | {r['rho_acc']:.3f} | "
                         f"{r['sigma']:.4f} | {r['distinct']}/{r['entries']} | {r['sigma_entry']:.4f} | {de} | "
                         f"{r['steps']} | {r['score_samples']} | "
                         f"{r['epochs_per_entry']:.2f} | {r['table_epochs']:.0f} | {r['seconds_per_entry']:.1f} |")
        lines.append("")
    prow = plan_rows(store)
    if prow:
        lines += ["## Plans: summed importance vs accuracy after fine-tuning", "",
                  "Random plans (uniform walks over legal segments, seed 1); each pruned, BatchNorm re-estimated and "
                  f"fine-tuned like the oracle ({args.oracle_epochs} epochs); summed importance = sum of ln I over the "
                  "plan's segments from the whole `finetune` table.", "",
                  "| network | plans | Spearman vs -val_loss | Spearman vs val_acc | val acc range |",
                  "|---|---:|---:|---:|---|"]
        for r in prow:
            lines.append(f"| {r['net']} | {r['plans']} | {r['rho_loss']:.3f} | {r['rho_acc']:.3f} | "
                         f"{r['acc_range'][0]:.3f}-{r['acc_range'][1]:.3f} |")
        lines.append("")
    lines += ["Settings:", ""]
    for name, s in SETTINGS.items():
        lines.append(f"- `{name}`: `{s}`")
    lines += ["", "![Spearman vs compute](importance_check.png)", ""]
    md = out / "importance_check.md"
    md.write_text("\n".join(lines))
    (out / "importance_check.json").write_text(json.dumps(rows, indent=2))
    _plot(rows, out)
    print(md.read_text())


def _notes(out: Path) -> str:
    md = out / "importance_check.md"
    if md.exists() and "<!-- notes -->" in md.read_text():
        text = md.read_text()
        return text.split("<!-- notes -->", 1)[1].split("<!-- /notes -->", 1)[0].strip()
    return "(notes to be written)"


def _plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for net, marker in zip(NETS, ("o", "s")):
        sub = [r for r in rows if r["net"] == net]
        ax.scatter([r["epochs_per_entry"] for r in sub], [r["rho_loss"] for r in sub], marker=marker, label=net)
        for r in sub:
            ax.annotate(r["setting"], (r["epochs_per_entry"], r["rho_loss"]), fontsize=7, xytext=(3, 3),
                        textcoords="offset points")
    ax.axhline(0.8, color="grey", ls="--", lw=0.8)
    ax.set_xlabel("training epochs per entry (steps x batch / training set)")
    ax.set_ylabel("Spearman(table, oracle), Perf = -val_loss")
    ax.set_title("Importance table vs long fine-tunes (digits)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "importance_check.png", dpi=120)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    store = Store(Path(args.work) / "results.jsonl")
    if not args.report_only:
        run(args)
        store = Store(Path(args.work) / "results.jsonl")
    write_report(store, args)


if __name__ == "__main__":
    main()
