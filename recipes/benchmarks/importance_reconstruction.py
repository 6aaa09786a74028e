"""Can a closed-form refit replace the importance sub-runs? (issue 13, "at most one epoch per table")

The importance table needs about 30 optimizer steps per entry to rank entries like long
fine-tunes (``importance_check.py``); on a small training set that is far more than one epoch
for the whole table. This recipe tests a zero-training estimate on the same sampled entries
and oracles:

* ``refit``: prune and merge the network with only the entry's segment replaced, then refit the
  merged conv by ridge least squares so that, on ``--calib`` training images, it maps the
  segment's input to the original network's value at the segment's end (the segment is linear
  once its activations are gone, so this is the best the merged conv can do locally); score
  the whole network's val_loss;
* ``r2``: the refit's unexplained variance on held-out calibration images (lower is better);
* ``plain``: the merged network as pruned, no refit, no BatchNorm re-estimation;
* ``bn8_only``: the ``importance_check.py`` setting (BatchNorm re-estimation, no training),
  read from its results.

Spearman of each with the oracle (-val_loss after 3 epochs of fine-tuning). Needs the oracles
of ``importance_check.py`` in ``--work`` (run it first, e.g. with ``--settings bn8_only``).

Run::

    python recipes/benchmarks/importance_check.py --settings bn8_only --entries 20 --work runs/ic --out /tmp/ic
    python recipes/benchmarks/importance_reconstruction.py --work runs/ic
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import fx, nn

import importance_check as ic

from lightning_layermerge import Plan, merge, prune, trace
from lightning_layermerge.surgery.capture import capture

RESULTS = Path(__file__).resolve().parent / "results"


class _Recorder(fx.Interpreter):
    """Runs a captured graph and keeps the values of the named nodes."""

    def __init__(self, gm: fx.GraphModule, names: set[str]) -> None:
        super().__init__(gm)
        self.names, self.values = names, {}

    def run_node(self, n: fx.Node):
        out = super().run_node(n)
        if n.name in self.names:
            self.values[n.name] = out
        return out


@torch.no_grad()
def position_values(model: nn.Module, chain, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The original network's value at every chain position's cut, on ``x``."""
    cap = capture(model, chain.example, shapes=chain.capture.shapes)
    recorder = _Recorder(cap.gm.eval(), {p.cut for p in chain.positions})
    recorder.run(x)
    return recorder.values


@torch.no_grad()
def refit_conv(conv: nn.Conv2d, x: torch.Tensor, y: torch.Tensor, ridge: float) -> None:
    """Ridge least squares for ``conv``'s weight and bias: ``conv(x) ~ y`` (per group, float64)."""
    cols = F.unfold(x.double(), conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride)
    cin, cout, g = x.shape[1], y.shape[1], conv.groups
    taps = cols.shape[1] // cin
    target = y.double().flatten(2)
    weight = torch.zeros_like(conv.weight, dtype=torch.float64)
    bias = torch.zeros(cout, dtype=torch.float64)
    cin_g, cout_g = cin // g, cout // g
    for gi in range(g):
        a = cols[:, gi * cin_g * taps:(gi + 1) * cin_g * taps].permute(0, 2, 1).reshape(-1, cin_g * taps)
        a = torch.cat([a, torch.ones(len(a), 1, dtype=a.dtype)], 1)
        b = target[:, gi * cout_g:(gi + 1) * cout_g].permute(0, 2, 1).reshape(-1, cout_g)
        gram = a.T @ a
        gram += ridge * gram.diagonal()[:-1].mean() * torch.eye(len(gram), dtype=gram.dtype)
        sol = torch.linalg.solve(gram, a.T @ b)
        weight[gi * cout_g:(gi + 1) * cout_g] = sol[:-1].T.reshape(cout_g, cin_g, *conv.kernel_size)
        bias[gi * cout_g:(gi + 1) * cout_g] = sol[-1]
    conv.weight.copy_(weight.to(conv.weight.dtype))
    if conv.bias is None:
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
    else:
        conv.bias.copy_(bias.to(conv.weight.dtype))


def entry_scores(model: nn.Module, chain, key: tuple[int, int, int], xs: torch.Tensor,
                 values: dict[str, torch.Tensor], val_loader, ridge: float) -> dict[str, float]:
    """plain / refit val_loss and the held-out unexplained variance of one entry."""
    i, j, _ = key
    merged = merge(prune(model, chain, Plan.replacing(chain, chain.segment(*key))).eval())
    plain = ic.evaluate(merged, val_loader)["val_loss"]
    conv = dict(merged.named_modules()).get(f"merged_{i}_{j}")
    target = values[chain.positions[j].cut]
    if conv is None:  # an identity segment: nothing to refit
        return {"plain": plain, "refit": plain, "r2": 0.0}
    got: dict[str, torch.Tensor] = {}
    hook = conv.register_forward_hook(lambda _m, a, o: got.update(x=a[0], y=o))
    with torch.no_grad():
        merged(xs)
    hook.remove()
    if got["y"].shape != target.shape:  # the merged conv is not the whole segment (e.g. a bias term after it)
        return {"plain": plain, "refit": plain, "r2": float("nan")}
    half = len(xs) // 2
    refit_conv(conv, got["x"][:half], target[:half], ridge)
    with torch.no_grad():
        pred, true = conv(got["x"][half:]).double(), target[half:].double()
        r2 = float(((pred - true) ** 2).sum() / ((true - true.mean((0, 2, 3), keepdim=True)) ** 2).sum())
    refit_conv(conv, got["x"], target, ridge)
    return {"plain": plain, "refit": ic.evaluate(merged, val_loader)["val_loss"], "r2": r2}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/importance_check", help="importance_check.py's --work (its oracles)")
    p.add_argument("--entries", type=int, default=20)
    p.add_argument("--calib", type=int, default=512, help="training images the refit is solved on")
    p.add_argument("--ridge", type=float, default=1e-4)
    a = p.parse_args()
    torch.set_num_threads(1)
    work = Path(a.work)
    store = ic.Store(work / "results.jsonl")
    lines = ["# Zero-training importance by least-squares refit vs long fine-tunes (digits, CPU)", "",
             f"Command: `python recipes/benchmarks/importance_reconstruction.py --work {a.work} --entries {a.entries} "
             f"--calib {a.calib} --ridge {a.ridge}` (oracles and `bn8_only` from `importance_check.py` in the same "
             "work folder). Spearman with the oracle's -val_loss over the sampled entries.", "",
             "| network | entries | refit | r2 (held out) | plain | bn8_only | s/entry (refit) |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    details = {}
    for net in ic.NETS:
        model = ic.trained(work, net, 20)
        dm = ic.datamodule()
        chain = trace(model, dm.train_set[:2][0])
        xs = torch.cat([b[0] for b in dm.train_dataloader()])[:a.calib]
        values = position_values(model, chain, xs)
        rows = []
        for key in ic.sample_entries(chain, a.entries):
            oracle = store.rows.get(f"{net}/oracle/{key}")
            if oracle is None:
                continue
            t = time.perf_counter()
            row = {"key": key, "oracle": oracle["val_loss"],
                   **entry_scores(model, chain, key, xs, values, dm.val_dataloader(), a.ridge),
                   "seconds": time.perf_counter() - t}
            bn8 = store.rows.get(f"{net}/bn8_only/{key}")
            row["bn8_only"] = bn8["val_loss"] if bn8 else None
            rows.append(row)
            print(net, row, flush=True)
        oracle = [-r["oracle"] for r in rows]

        def rho(name: str) -> str:
            vals = [r[name] for r in rows]
            return "-" if any(v is None for v in vals) else f"{ic.spearman([-v for v in vals], oracle):.3f}"

        seconds = sum(r["seconds"] for r in rows) / max(len(rows), 1)
        lines.append(f"| {net} | {len(rows)} | {rho('refit')} | {rho('r2')} | {rho('plain')} | {rho('bn8_only')} | "
                     f"{seconds:.2f} |")
        details[net] = rows
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "importance_reconstruction.md").write_text("\n".join(lines) + "\n")
    (RESULTS / "importance_reconstruction.json").write_text(json.dumps(details, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
