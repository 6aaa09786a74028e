"""Can an importance table be built with no training at all? (issue 13, "at most one epoch per table")

On a small training set a fine-tuned table (``ImportanceSettings(method="finetune")``, 30
optimizer steps per entry) costs far more than one epoch of training in total: 66 entries x 30
steps x 64 images is 108 epochs of the 1,168 digits training images. One epoch for the whole
table leaves under one step per entry, so only a zero-training estimate can meet it. This
recipe compares the library's two tables, ``default`` (the head probe: BatchNorm re-estimation,
then only the classifier head refit on frozen features; no optimizer step through the network)
and ``finetune``, with scores that train nothing at all, after BatchNorm re-estimation on 8
training batches (the ``bn8_only`` setting of ``importance_check.py``): the distance of the
pruned network's outputs to the original's on the validation set:

* ``ce``: the pruned network's own validation loss (that is ``bn8_only``);
* ``kl{T}``: ``KL(softmax(original / T) || softmax(pruned / T))`` (the distillation loss at
  temperature T, without the T^2 factor; T = 4 is the library's distillation default);
* ``mse``: the squared output difference over the original outputs' variance (the
  distillation loss for non-classification outputs);

and compares them, and the two tables (the callback's sub-runs), with the oracle of
``importance_check.py`` (the entry fine-tuned 3 epochs on all training images). To guard
against choosing an estimator on the entries it is judged on, it reports the first
``importance_check.py`` sample (20 entries) and 20 more entries separately (held out), and
ranks ``--plans`` random whole plans (the same seeded walks as ``importance_check.py``) by
each estimator's sum over their segments and, for the zero-training ones, by the score of the
whole plan at once.

Every oracle, table entry and plan is appended to ``<work>/results.jsonl`` (the store of
``importance_check.py``, same rows), so a rerun resumes; zero-training scores take a second
and are recomputed. Writes ``importance_zero_training.md`` / ``.json`` to ``--out``.

Run (about 15 minutes on one CPU thread from scratch)::

    python recipes/benchmarks/importance_zero_training.py --work runs/importance_check
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

import importance_check as ic

from lightning_layermerge import Plan, prune, trace
from lightning_layermerge.planning.bn_recalibration import recalibrate_batchnorm

RESULTS = Path(__file__).resolve().parent / "results"

#: The library's tables compared (``importance_check.SETTINGS``): ``default`` is the head probe,
#: ``finetune`` the 30-step fine-tune of each entry.
TABLES = ("default", "finetune")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/importance_check", help="importance_check.py's --work (shared store)")
    p.add_argument("--entries", type=int, default=40, help="sampled entries; the first 20 are importance_check's")
    p.add_argument("--temperatures", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    p.add_argument("--plans", type=int, default=10)
    p.add_argument("--oracle-epochs", type=int, default=3)
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    return a


@torch.no_grad()
def outputs(model: nn.Module, loader: Any) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x) for x, _ in loader])


def zero_training_scores(model: nn.Module, chain: Any, plan: Plan, reference: torch.Tensor,
                         temperatures: list[float]) -> dict[str, float]:
    """Distances (lower is better) of ``plan``'s pruned network to the original, no training (digits)."""
    dm = ic.datamodule()
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    return pruned_scores(prune(model, chain, plan), dm, reference, labels, temperatures)


def pruned_scores(pruned: nn.Module, dm: Any, reference: torch.Tensor, labels: torch.Tensor,
                  temperatures: Sequence[float]) -> dict[str, float]:
    """BatchNorm re-estimation of ``pruned`` on 8 of ``dm``'s training batches, then its validation loss
    (``ce``) and its outputs' distances to the original's ``reference`` outputs (``mse``, ``kl{T}``)."""
    L.seed_everything(0, workers=True)
    recalibrate_batchnorm(pruned, dm.train_dataloader(), 8)
    out = outputs(pruned, dm.val_dataloader())
    scores = {"ce": float(F.cross_entropy(out, labels)),
              "mse": float(((out - reference) ** 2).mean() / reference.var())}
    for t in temperatures:
        scores[f"kl{t:g}"] = float(F.kl_div(F.log_softmax(out / t, 1), F.log_softmax(reference / t, 1),
                                            log_target=True, reduction="batchmean"))
    return scores


def net_study(store: ic.Store, net: str, a: argparse.Namespace) -> dict:
    work = Path(a.work)
    model = ic.trained(work, net, 20)
    dm = ic.datamodule()
    chain = trace(model, dm.train_set[:2][0])
    reference = outputs(model, dm.val_dataloader())
    runners = {name: ic.runner_for(model, ic.SETTINGS[name]) for name in TABLES}
    first = ic.sample_entries(chain, 20)
    held = [k for k in ic.sample_entries(chain, a.entries) if k not in first]
    rows: dict[tuple, dict] = {}
    perfs: dict[tuple, float] = {}  # (key, table) -> the entry's Perf as the callback reads it

    def entry(key: tuple) -> dict:
        if key not in rows:
            seg = chain.segment(*key)
            for name, runner in runners.items():
                rid = f"{net}/{name}/{key}"
                if rid not in store or "perf" not in store.rows[rid]:  # rows stored before "perf" was
                    store.add(ic.default_entry(runner, net, model, chain, seg, name))
                perfs[key, name] = store.rows[rid]["perf"]
            rows[key] = {**{name: store.rows[f"{net}/{name}/{key}"]["val_loss"] for name in TABLES},
                         **zero_training_scores(model, chain, Plan.replacing(chain, seg), reference, a.temperatures)}
        return rows[key]

    for key in first + held:
        rid = f"{net}/oracle/{key}"
        if rid not in store:
            store.add({"id": rid, "net": net, "kind": "oracle", "key": list(key),
                       **ic.oracle(model, chain, key, a.oracle_epochs)})
        entry(key)["oracle"] = store.rows[rid]["val_loss"]
        print(net, key, {k: round(v, 4) for k, v in rows[key].items()}, flush=True)
    names = [n for n in rows[first[0]] if n != "oracle"]

    def rho(keys: list[tuple], name: str) -> float:
        return ic.spearman([-rows[k][name] for k in keys], [-rows[k]["oracle"] for k in keys])

    result = {"entries": {part: {n: rho(keys, n) for n in names}
                          for part, keys in (("first", first), ("held_out", held), ("all", first + held))},
              "counts": {"first": len(first), "held_out": len(held)}}
    base_loss = ic.evaluate(model, dm.val_dataloader())["val_loss"]
    offset = {"ce": base_loss}
    nulls = {n: runners[n].null_perf(model, 0) for n in TABLES}  # the table's paired reading
    rng = random.Random(1)  # importance_check.py's plans
    plans = []
    for index in range(a.plans):
        plan = Plan.random(chain, rng)
        rid = f"{net}/plan/{index}"
        if rid not in store:
            store.add({"id": rid, "net": net, "kind": "plan", "segments": [list(k) for k in plan.keys],
                       **ic.finetuned_plan(model, chain, plan, a.oracle_epochs)})
        keys = [tuple(k) for k in store.rows[rid]["segments"]]
        # What the DP adds up: ln I = Perf(entry) - Perf(original) per segment. The distances
        # are 0 for the original; the loss is offset by the original's loss. The tables as the
        # callback reads them (paired): Perf of the unmodified network through the same protocol
        # subtracted; negated, so that lower is better as for the distances.
        summed = {n: sum(entry(k)[n] - offset.get(n, 0.0) for k in keys) for n in names if n not in TABLES}
        summed.update({n: -sum(perfs[k, n] - nulls[n] for k in keys) for n in TABLES})
        whole = zero_training_scores(model, chain, plan, reference, a.temperatures)
        plans.append({"val_loss": store.rows[rid]["val_loss"], "val_acc": store.rows[rid]["val_acc"],
                      "sum": summed, "whole": whole})
        print(net, "plan", index, store.rows[rid]["val_loss"], flush=True)
    result["plans"] = {
        f"{kind} {n}": {"loss": ic.spearman([-p[kind][n] for p in plans], [-p["val_loss"] for p in plans]),
                        "acc": ic.spearman([-p[kind][n] for p in plans], [p["val_acc"] for p in plans])}
        for kind in ("sum", "whole") for n in names if n in plans[0][kind]}
    result["rows"] = {str(k): v for k, v in rows.items()}
    result["seconds"] = {n: sum(store.rows[f"{net}/{n}/{k}"]["seconds"] for k in rows) / len(rows) for n in TABLES}
    return result


def report(results: dict, a: argparse.Namespace) -> str:
    seconds = "; ".join(f"{net} " + ", ".join(f"{n} {r['seconds'][n]:.2f}" for n in TABLES)
                        for net, r in results.items())
    lines = ["# Zero-training importance estimates vs long fine-tunes (digits, CPU)", "",
             f"Command: `python recipes/benchmarks/importance_zero_training.py --work {a.work} --entries {a.entries} "
             f"--plans {a.plans}`. Spearman with the oracle (-val_loss after {a.oracle_epochs} epochs of fine-tuning), "
             "over importance_check.py's 20 sampled entries (*first*), 20 more (*held out*) and all; for plans, of "
             "the estimate summed over the plan's segments (*sum*, what the DP adds up) or of the whole plan "
             "scored at once (*whole*) with the plan's fine-tuned -val_loss / val_acc. `default` is the "
             "library's default table (the head probe: BatchNorm re-estimation on 8 batches, then the classifier "
             "head refit on frozen features; no optimizer step through the network), `finetune` the "
             "fine-tuned table (30 steps per entry, 1.64 epochs of this training set per entry); every other "
             "row trains nothing. Seconds per entry (one CPU thread): " + seconds + ".", ""]
    for net, r in results.items():
        lines += [f"## {net}", "", "| estimate | first 20 | held out 20 | all 40 | plans: sum (loss / acc) | "
                  "plans: whole (loss / acc) |", "|---|---:|---:|---:|---:|---:|"]
        for n, ent in r["entries"]["first"].items():
            s = r["plans"].get(f"sum {n}", {})
            w = r["plans"].get(f"whole {n}", {})
            cells = [f"{r['entries'][p][n]:.3f}" for p in ("first", "held_out", "all")]
            lines.append(f"| {n} | " + " | ".join(cells) + f" | {s.get('loss', float('nan')):.2f} / "
                         f"{s.get('acc', float('nan')):.2f} | " +
                         (f"{w['loss']:.2f} / {w['acc']:.2f}" if w else "-") + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    store = ic.Store(Path(a.work) / "results.jsonl")
    results = {net: net_study(store, net, a) for net in ic.NETS}
    a.out.mkdir(parents=True, exist_ok=True)
    text = report(results, a)
    (a.out / "importance_zero_training.md").write_text(text + "\n")
    (a.out / "importance_zero_training.json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
