"""DDPM demo: train a small diffusers UNet on real digits, compress it with LayerMerge, sample both.

    python recipes/ddpm/demo.py                 # ~5-10 min on 2 CPU cores

1. Train ``DiffusionModule`` (``UNet2DModel``: 16x16, channels 16/32, one attention level) on
   ``sklearn.datasets.load_digits`` upsampled to 16x16, with diffusers' ``DDPMScheduler``.
2. A second ``trainer.fit`` of the same module with ``LayerMergeCallback(target="unet")``:
   latency table of the UNet's candidate merged layers, importance from short quiet
   sub-runs scored by the held-out denoising loss (same noise and timesteps for every entry),
   DP, pruning, fine-tuning with distillation (MSE to the frozen original's predicted noise),
   merging, and a side-by-side latency measurement against the original (BN-free UNet: its
   GroupNorms are not folded, they stay as they are in both).
3. Sample the same noise with the original and the merged UNet (plain DDPM ancestral loop,
   as ``DDPMPipeline``) and write both grids side by side to ``samples.png``.

Outputs land in ``runs/ddpm_demo/`` (``--out``): report JSON + PNG, ``samples.png``,
``summary.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.loggers import CSVLogger

from diffusion import DIGITS_UNET, DiffusionModule, DigitsImages, sample

from lightning_layermerge import Distillation, ImportanceSettings, LatencySettings, LayerMergeCallback


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=0.85, help="target latency as a fraction of the original")
    p.add_argument("--train-steps", type=int, default=800)
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--importance-steps", type=int, default=10)
    p.add_argument("--sample-steps", type=int, default=100, help="DDPM sampling steps (strided schedule)")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--out", default="runs/ddpm_demo")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def trainer(out: str, name: str, steps: int, callbacks: list | None = None) -> L.Trainer:
    return L.Trainer(max_steps=steps, max_epochs=-1, callbacks=callbacks or [], logger=CSVLogger(out, name=name),
                     enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
                     val_check_interval=None, check_val_every_n_epoch=5, limit_val_batches=2, log_every_n_steps=20)


def save_grids(original: torch.Tensor, merged: torch.Tensor, path: Path, titles: tuple[str, str]) -> None:
    """Two sample grids side by side in one PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from torchvision.utils import make_grid

    fig, axes = plt.subplots(1, 2, figsize=(10, 2.9))
    for ax, images, title in zip(axes, (original, merged), titles):
        grid = make_grid((images + 1) / 2, nrow=8, padding=1, pad_value=1.0)
        ax.imshow(grid.permute(1, 2, 0).cpu().numpy(), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title, fontsize=10)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    L.seed_everything(0, workers=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    dm = DigitsImages(image_size=16, batch_size=32)
    module = DiffusionModule(DIGITS_UNET, lr=1e-3, warmup_steps=100)

    # 1. Ordinary DDPM training.
    trainer(args.out, "train", args.train_steps).fit(module, datamodule=dm)
    print(f"trained {args.train_steps} steps ({time.perf_counter() - start:.0f} s)")
    shape = (args.samples, 1, 16, 16)
    steps = module.scheduler.config.num_train_timesteps
    before = sample(module.unet, steps, shape, steps=args.sample_steps)

    # 2. Compression inside a second fit of the same module.
    module.lr, module.warmup_steps = 2e-4, 0
    callback = LayerMergeCallback(
        budget=args.budget,
        target="unet",
        monitor="val_loss",
        importance=ImportanceSettings(method="finetune",
                                      fraction=0.1, steps=args.importance_steps, batch_size=32, relative=True),
        latency=LatencySettings(device="cpu", batch_size=16, threads=1, warmup=5, repeats=20, reference=True),
        distill=Distillation(alpha=1.0),  # MSE between the student's and the teacher's predicted noise
        cache_dir=str(out / "cache"),
    )
    trainer(args.out, "compress", args.finetune_steps, [callback]).fit(module, datamodule=dm)
    report = callback.report
    after = sample(module.unet, steps, shape, steps=args.sample_steps)

    # 3. Samples from the same noise, side by side.
    save_grids(before, after, out / "samples.png",
               ("original UNet", f"LayerMerge, measured {report.measured_ratio:.2f}x latency"))
    seconds = time.perf_counter() - start  # the callback has printed the report
    print(f"samples: {out / 'samples.png'}; total time {seconds:.0f} s")
    summary = {**report.to_dict(), "seconds": seconds, "args": vars(args)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary


if __name__ == "__main__":
    main()
