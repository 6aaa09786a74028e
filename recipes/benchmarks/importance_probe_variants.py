"""How the head probe's penalty and reading were chosen (issue 13; ``ImportanceSettings(method="probe")``).

On the digits nets and the 40 sampled entries of ``importance_zero_training.py`` (whose oracles
and random plans it reads from the shared store), every entry is pruned, its BatchNorm
statistics re-estimated on 8 training batches, and its classifier head refit on the frozen
features of all training images by L-BFGS on cross-entropy + ``wd * |W|^2``, for several
``wd``; the refit head is scored on the validation set. It reports, per ``wd``:

* Spearman of the entries' validation loss with the oracle's (the first 20 entries, the 20
  held out, all 40);
* Spearman of the plans' summed values with the plans' fine-tuned validation loss / accuracy,
  for two readings: ``diff`` (the loss minus the unmodified network's through the same probe,
  what a plain Perf difference adds up) and ``headroom`` (``-ln`` of the share of the
  unmodified network's distance to the blind head's loss that the entry keeps: the library's
  reading, ``head_probe.headroom``).

This is a feature-level re-implementation of the library's probe (same steps, on plain
tensors) so that many penalties cost one feature pass; the library's own numbers are in
``importance_zero_training.md``. Run (about 3 minutes on one CPU thread, after
``importance_zero_training.py`` has filled the store)::

    python recipes/benchmarks/importance_probe_variants.py --work runs/importance_check
"""

from __future__ import annotations

import argparse
import copy
import math
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn

import importance_check as ic

from lightning_layermerge import Plan, prune, trace
from lightning_layermerge.planning.bn_recalibration import recalibrate_batchnorm

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/importance_check", help="importance_zero_training.py's --work")
    p.add_argument("--entries", type=int, default=40)
    p.add_argument("--penalties", type=float, nargs="+", default=[1e-4, 0.01, 0.1, 0.3, 1.0, 3.0])
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    return a


def head(model: nn.Module) -> nn.Linear:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


@torch.no_grad()
def features(model: nn.Module, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs of the head (eval mode) and the labels over ``loader``."""
    got, labels = [], []
    hook = head(model).register_forward_hook(lambda mod, args, out: got.append(args[0]))
    model.eval()
    for x, y in loader:
        model(x)
        labels.append(y)
    hook.remove()
    return torch.cat(got), torch.cat(labels)


def refit(f: torch.Tensor, y: torch.Tensor, init: nn.Linear, wd: float, blind: bool = False) -> tuple:
    """L-BFGS on cross-entropy + ``wd * |W|^2`` from the current head (``blind``: W = 0, bias only)."""
    w = torch.zeros_like(init.weight) if blind else init.weight.detach().clone().requires_grad_()
    b = init.bias.detach().clone().requires_grad_()
    params = [b] if blind else [w, b]
    opt = torch.optim.LBFGS(params, max_iter=50, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(f @ w.T + b, y) + (0.0 if blind else wd * w.pow(2).sum())
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach(), b.detach()


def probe_losses(pruned: nn.Module, dm, penalties: list[float]) -> dict[float, float]:
    """Validation loss of the refit head per penalty (after BatchNorm re-estimation)."""
    L.seed_everything(0, workers=True)
    recalibrate_batchnorm(pruned, dm.train_dataloader(), 8)
    ftr, ytr = features(pruned, dm.train_dataloader())
    fva, yva = features(pruned, dm.val_dataloader())
    out = {}
    for wd in penalties:
        w, b = refit(ftr, ytr, head(pruned), wd)
        out[wd] = float(F.cross_entropy(fva @ w.T + b, yva))
    w, b = refit(ftr, ytr, head(pruned), 0.0, blind=True)
    out["blind"] = float(F.cross_entropy(fva @ w.T + b, yva))
    return out


def net_study(store: ic.Store, net: str, a: argparse.Namespace) -> dict:
    model = ic.trained(Path(a.work), net, 20)
    dm = ic.datamodule()
    chain = trace(model, dm.train_set[:2][0])
    first = ic.sample_entries(chain, 20)  # importance_check.py's sample; the rest are held out
    keys = first + [k for k in ic.sample_entries(chain, a.entries) if k not in first]
    plans = [r for r in store.rows.values() if r["net"] == net and r["kind"] == "plan"]
    wanted = set(keys) | {tuple(k) for p in plans for k in p["segments"]}
    losses = {k: probe_losses(prune(model, chain, Plan.replacing(chain, chain.segment(*k))), dm, a.penalties)
              for k in sorted(wanted)}
    null = probe_losses(copy.deepcopy(model), dm, a.penalties)
    oracle = {k: store.rows[f"{net}/oracle/{k}"]["val_loss"] for k in keys}
    rows = {}
    for wd in a.penalties:
        def rho(ks: list) -> float:
            return ic.spearman([-losses[k][wd] for k in ks], [-oracle[k] for k in ks])

        def reading(k: tuple, how: str) -> float:  # what one segment costs (higher: worse)
            if how == "diff":
                return losses[k][wd] - null[wd]
            return -math.log(max(null["blind"] - losses[k][wd], 1e-12) / (null["blind"] - null[wd]))

        row = {"first": rho(keys[:20]), "held_out": rho(keys[20:]), "all": rho(keys), "null": null[wd]}
        for how in ("diff", "headroom"):
            summed = [-sum(reading(tuple(k), how) for k in p["segments"]) for p in plans]
            row[how] = (ic.spearman(summed, [-p["val_loss"] for p in plans]),
                        ic.spearman(summed, [p["val_acc"] for p in plans]))
        rows[wd] = row
        print(net, wd, row, flush=True)
    return {"rows": rows, "blind": null["blind"], "plans": len(plans)}


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    store = ic.Store(Path(a.work) / "results.jsonl")
    results = {net: net_study(store, net, a) for net in ic.NETS}
    lines = ["# The head probe: penalty and reading (digits, CPU)", "",
             f"Command: `python recipes/benchmarks/importance_probe_variants.py --work {a.work}`. Each entry "
             "pruned, BatchNorm re-estimated on 8 training batches, classifier head refit on the frozen features "
             "of the 1,168 training images (L-BFGS, cross-entropy + wd |W|^2), scored on the 270 validation "
             "images. *Entries*: Spearman of that loss with the oracle's (3-epoch fine-tune), on the first 20 "
             "sampled entries, 20 held out, all 40. *Plans*: Spearman of the summed reading over each random "
             "plan's segments with the plan's fine-tuned -val_loss / val_acc (10 plans); `diff`: loss minus the "
             "unmodified network's probe loss; `headroom`: -ln of the share of the unmodified network's "
             "distance to the blind head's loss (weight 0, bias refit) that the entry keeps (the library's "
             "reading).", ""]
    for net, r in results.items():
        lines += [f"## {net}", "", f"Blind head's validation loss: {r['blind']:.3f}.", "",
                  "| wd | entries: first 20 | held out 20 | all 40 | unmodified probe loss | plans, diff (loss / acc) "
                  "| plans, headroom (loss / acc) |", "|---:|---:|---:|---:|---:|---:|---:|"]
        for wd, row in r["rows"].items():
            lines.append(f"| {wd:g} | {row['first']:.3f} | {row['held_out']:.3f} | {row['all']:.3f} | "
                         f"{row['null']:.3f} | {row['diff'][0]:.2f} / {row['diff'][1]:.2f} | "
                         f"{row['headroom'][0]:.2f} / {row['headroom'][1]:.2f} |")
        lines.append("")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "importance_probe_variants.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
