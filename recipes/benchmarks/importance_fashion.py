"""Does the importance table rank entries like long fine-tunes on Fashion-MNIST? (issue 13)

The Fashion-MNIST counterpart of ``importance_check.py``, on the networks and cached tables of
``compare_fashion.py`` (run that first; this recipe trains nothing but the oracles):

* **oracle** per sampled entry (``--entries``, the same fixed-seed sample rule as
  ``importance_check.py``): prune, re-estimate BatchNorm on 8 batches, fine-tune
  ``--oracle-epochs`` over all 55,000 training images (SGD lr 0.02 one-cycle, batch 128),
  score -val_loss on the 5,000 validation images;
* **default**: the entry as the library's default table computes it (``ImportanceSettings()``,
  the head probe: BatchNorm re-estimation on 8 batches, then the classifier head refit on the
  frozen features of 3,840 training images; no optimizer step through the network), scored on
  2,200 validation images;
* **finetune**: the entry of the cached table ``compare_fashion.py``'s callback built with
  ``ImportanceSettings(method="finetune")`` (then the default: 30 steps of 128 per entry);
* **zero-training** scores, after the same BatchNorm re-estimation and no training: the pruned
  network's own validation loss (``ce``), and its outputs' distance to the original's
  (``kl{T}``: ``KL(softmax(original / T) || softmax(pruned / T))``; ``mse``: squared difference
  over the original outputs' variance), see ``importance_zero_training.py``.

Reports the Spearman correlation of each with the oracle, and the compute of the default
table in training epochs. Oracles are appended to ``--store`` and reused.

Run::

    python recipes/benchmarks/compare_fashion.py --quick --work runs/fashion     # networks + tables
    python recipes/benchmarks/importance_fashion.py --work runs/fashion
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

import compare_fashion as cf
import importance_check as ic
from importance_zero_training import outputs, pruned_scores

from lightning_layermerge import ImportanceSettings, Plan, prune, trace

RESULTS = Path(__file__).resolve().parent / "results"
TEMPERATURES = (1.0, 2.0, 4.0, 8.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", default="runs/fashion", help="compare_fashion.py's --work (networks, cached tables)")
    p.add_argument("--data-dir", default=cf.DEFAULT_DIR)
    p.add_argument("--entries", type=int, default=12)
    p.add_argument("--oracle-epochs", type=int, default=1)
    p.add_argument("--store", type=Path, default=None, help="oracle results (default <work>/importance_oracles.jsonl)")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    return a


def cached_table(net_dir: Path) -> tuple[dict, dict]:
    """The callback's cached importance table ``{key: I}`` and its cache key."""
    files = sorted((net_dir / "cache").glob("importance-*-shard0of1.json"))
    if not files:
        raise FileNotFoundError(f"no cached importance table under {net_dir / 'cache'}; run compare_fashion.py first")
    data = json.loads(files[0].read_text())
    return {tuple(e[:3]): e[3] for e in data["entries"] if e[0] >= 0}, data["key"]["user"]


def net_study(setup: cf.Setup, net: str, store: ic.Store, a: argparse.Namespace) -> dict:
    model = cf.original(setup, net)
    dm = setup.datamodule()
    dm.setup("fit")
    chain = trace(model, dm.train_set[:64][0])
    reference = outputs(model, dm.val_dataloader())
    labels = torch.cat([y for _, y in dm.val_dataloader()])
    table, key = cached_table(setup.net_dir(net))
    probe = ic.runner_for(model, ImportanceSettings(), dm)
    probe_s = 0.0
    rows = []
    for seg_key in ic.sample_entries(chain, a.entries):
        rid = f"{net}/oracle/{seg_key}"
        if rid not in store:
            t = time.perf_counter()
            plan = Plan.replacing(chain, chain.segment(*seg_key))
            store.add({"id": rid, "net": net, "kind": "oracle", "key": list(seg_key),
                       **ic.finetuned_plan(model, chain, plan, a.oracle_epochs, dm=dm),
                       "seconds": time.perf_counter() - t})
        seg = chain.segment(*seg_key)
        t = time.perf_counter()
        default = probe.score(probe.finetune(prune(model, chain, Plan.replacing(chain, seg)), seg))
        probe_s += time.perf_counter() - t
        pruned = prune(model, chain, Plan.replacing(chain, seg))
        rows.append({"key": seg_key, "oracle": store.rows[rid]["val_loss"], "default": default,
                     "finetune": table[seg_key], **pruned_scores(pruned, dm, reference, labels, TEMPERATURES)})
        print(net, rows[-1], flush=True)
    oracle = [-r["oracle"] for r in rows]
    tables = ("default", "finetune")  # Perf-like (higher is better); the other scores are distances
    rho = {n: ic.spearman([r[n] for r in rows], oracle) for n in tables}
    rho.update({n: ic.spearman([-r[n] for r in rows], oracle) for n in rows[0] if n not in ("key", "oracle", *tables)})
    steps = max(key.get("min_steps") or 0, 1) if key.get("steps") is None else key["steps"]
    batch = key.get("batch_size") or setup.batch_size
    train = key.get("data") or 55000
    return {"rho": rho, "entries": len(rows), "table_entries": len(table), "steps": steps, "batch": batch,
            "table_epochs": len(table) * steps * batch / train, "probe_s_per_entry": probe_s / len(rows),
            "rows": [{**r, "key": list(r["key"])} for r in rows]}


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    setup, _ = cf.parse_args(["--work", a.work, "--data-dir", a.data_dir])
    store = ic.Store(a.store or Path(a.work) / "importance_oracles.jsonl")
    results = {net: net_study(setup, net, store, a) for net in cf.NETS}
    names = list(next(iter(results.values()))["rho"])
    lines = ["# Importance table vs long fine-tunes (Fashion-MNIST, CPU)", "",
             f"Command: `python recipes/benchmarks/importance_fashion.py --work {a.work} --entries {a.entries} "
             f"--oracle-epochs {a.oracle_epochs}`. Spearman with the oracle (-val_loss on 5,000 validation images "
             f"after BatchNorm re-estimation and {a.oracle_epochs} epoch(s) over 55,000 training images). `default`: "
             "the library's default table (`ImportanceSettings()`: the head probe, no optimizer step through the "
             "network, 0 training epochs); `finetune`: the cached table of `compare_fashion.py` "
             "(`ImportanceSettings(method=\"finetune\")`, its epochs in the last columns); the other columns "
             "train nothing (BatchNorm re-estimation on 8 batches, then the distance named).", "",
             "| network | entries | " + " | ".join(names) + " | probe s/entry | finetune table: entries x steps x "
             "batch | epochs |",
             "|---|---:|" + "---:|" * len(names) + "---:|---|---:|"]
    for net, r in results.items():
        lines.append(f"| {net} | {r['entries']} | " + " | ".join(f"{r['rho'][n]:.3f}" for n in names) +
                     f" | {r['probe_s_per_entry']:.1f} | {r['table_entries']} x {r['steps']} x {r['batch']} | "
                     f"{r['table_epochs']:.1f} |")
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "importance_fashion.md").write_text("\n".join(lines) + "\n")
    (a.out / "importance_fashion.json").write_text(json.dumps(results, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
