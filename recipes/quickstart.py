"""Quickstart: train a small ResNet on real digits, then compress it to 60 % latency with KD.

    python recipes/quickstart.py            # ~40 s on 2 CPU cores

1. Train ``DigitsClassifier`` (ResNet-style, 9 chain convs) on ``sklearn.datasets.load_digits``
   (images upsampled to 16x16) and measure its test accuracy.
2. A second ``trainer.fit`` with ``LayerMergeCallback(budget=0.6, distill=Distillation(...))``:
   latency table (CPU, batch 64 at 16x16, float32, the library's defaults: 1 thread, thread CPU
   clock, allocator keeping freed memory, entries priced in context), importance table of 66
   entries by the default head probe (BatchNorm re-estimation and a refit of the classifier head
   on frozen features, no training step through the network, scored by ``val_loss`` on the
   validation set), DP, a side-by-side check of the chosen network,
   pruning, 10 epochs of fine-tuning with distillation, merging, and a side-by-side latency
   measurement of the original (BatchNorm folded) and the merged network.
3. Print the report and the merged network's test accuracy.

The report (JSON + PNG), the uncompressed weights (``uncompressed.pt``, used by ``cli/``) and
the merged network (``merged.safetensors``, read back with ``load_compressed``) land in
``runs/quickstart/`` (``--out`` to change).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger

from digits import DigitsClassifier, DigitsDataModule

from lightning_layermerge import Distillation, ImportanceSettings, LatencySettings, LayerMergeCallback
from lightning_layermerge import save_compressed


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.6, help="target latency as a fraction of the original")
    p.add_argument("--train-epochs", type=int, default=15)
    p.add_argument("--finetune-epochs", type=int, default=10)
    p.add_argument("--out", default="runs/quickstart")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (1: on a shared 2-core machine, 2 threads can be 10x slower from contention)")
    return p.parse_args()


def test_accuracy(trainer: L.Trainer, module: L.LightningModule, dm: L.LightningDataModule) -> float:
    return trainer.test(module, datamodule=dm, verbose=False)[0]["test_acc"]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    L.seed_everything(0, workers=True)
    start = time.perf_counter()
    dm = DigitsDataModule(image_size=16, batch_size=64)
    module = DigitsClassifier(width=16, blocks=(2, 2), lr=0.1)

    # 1. The user's ordinary training.
    trainer = L.Trainer(max_epochs=args.train_epochs, logger=CSVLogger(args.out, name="train"),
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False)
    trainer.fit(module, datamodule=dm)
    acc_before = test_accuracy(trainer, module, dm)
    print(f"\nuncompressed test accuracy: {acc_before:.4f}  ({time.perf_counter() - start:.0f} s)\n")
    torch.save(module.state_dict(), Path(args.out) / "uncompressed.pt")  # reused by recipes/cli

    # 2. Compression inside a second fit: same module, same data, same loss.
    module.lr = 0.02  # fine-tuning learning rate
    callback = LayerMergeCallback(
        budget=args.budget,
        target="model",
        monitor="val_loss",
        importance=ImportanceSettings(),  # the head probe: no training per entry, scored on the val set
        latency=LatencySettings(batch_size=64),  # defaults: 1 thread, thread CPU clock, in-context prices
        distill=Distillation(alpha=1.0, temperature=4.0),
        cache_dir=str(Path(args.out) / "cache"),
    )
    trainer = L.Trainer(max_epochs=args.finetune_epochs, callbacks=[callback],
                        logger=CSVLogger(args.out, name="compress"), enable_checkpointing=False,
                        enable_model_summary=False, enable_progress_bar=False)  # table-build bars still show
    trainer.fit(module, datamodule=dm)
    acc_after = test_accuracy(trainer, module, dm)
    report = callback.report
    drop = 100 * (acc_before - acc_after)
    print(f"\ntest accuracy: uncompressed {acc_before:.4f} -> merged {acc_after:.4f} ({-drop:+.2f} points)")
    print(f"measured latency: {report.measured_ratio:.3f} x original (limit {args.budget} x 1.05 = "
          f"{args.budget * 1.05:.3f}): {'ok' if report.measured_ratio <= args.budget * 1.05 else 'MISSED'}")
    print(f"accuracy drop {drop:.2f} points (limit 1.5): {'ok' if drop <= 1.5 else 'MISSED'}")
    print(f"total time {time.perf_counter() - start:.0f} s")
    save_compressed(module.model, Path(args.out) / "merged.safetensors")  # load_compressed(...) reads it back
    summary = {**report.to_dict(), "test_acc_before": acc_before, "test_acc_after": acc_after,
               "seconds": time.perf_counter() - start}
    Path(args.out, "quickstart_summary.json").write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
