"""Why does fine-tuning the uncompressed Fashion-MNIST DDPM raise the FID proxy? (diagnosis for fashion.py)

    python recipes/ddpm/fashion_diag.py --work /tmp/w16/fashion     # a work dir of fashion.py (trained UNet, classifier)

Measures (1) the FID proxy's own noise: the same model scored twice with the same sampling seed,
with other sampling seeds, and 1,000 real training images scored like samples (the floor of a
1,000-sample FID against the 10,000 test images); (2) the same UNet fine-tuned for
``--finetune-steps`` without compression under several recipes (learning rate, EMA of the
fine-tuned weights), each scored with two sampling seeds. Prints one line per measurement and
writes ``<work>/diag.json``.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import lightning.pytorch as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fashion import EMA, FashionImages, FidProxy, ddim_samples, load_fashion, train_classifier, trained_module, trainer  # noqa: E402


class Snapshots(L.Callback):
    """Copies of the raw and the EMA weights after the given training steps."""

    def __init__(self, steps: list[int], into: dict) -> None:
        self.steps, self.into = set(steps), into

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        step = trainer.global_step
        if step in self.steps:
            self.into[f"base step {step}, raw weights"] = copy.deepcopy(pl_module.unet.state_dict())
            ema = next((c for c in trainer.callbacks if isinstance(c, EMA)), None)
            if ema is not None:
                self.into[f"base step {step}, EMA weights"] = copy.deepcopy(ema.shadow)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--finetune-steps", type=int, default=200)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--seeds", type=int, nargs="+", default=[1234, 1])
    p.add_argument("--variants", nargs="+", default=["lr2e-4", "lr2e-5", "lr2e-4+ema", "lr1e-3+ema"],
                   help="lr<LR>[+ema[<decay>]][@<steps>]: fine-tuning learning rate, EMA decay (0.995), steps")
    p.add_argument("--train-steps", type=int, default=1000, help="base training, if <work>/unet does not exist")
    p.add_argument("--ema", type=float, default=0.999, help="EMA decay of the base training, as fashion.py")
    p.add_argument("--snapshots", type=int, nargs="*", default=[],
                   help="while training the base here: score the raw and the EMA weights after these steps")
    args = p.parse_args()
    args.image_size, args.batch_size, args.ddim_steps, args.finetune_lr, args.finetune_ema = 16, 64, 25, 2e-4, 0
    torch.set_num_threads(1)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    work = Path(args.work)
    out = work / "diag.json"
    results = json.loads(out.read_text()) if out.is_file() else {}
    x, y = load_fashion(args.data, "train", 16)
    x_test, y_test = load_fashion(args.data, "t10k", 16)
    classifier, _ = train_classifier(x, y, x_test, y_test, 500, work / "classifier.pt")
    fid = FidProxy(classifier, x_test)
    dm = FashionImages(x, args.batch_size)

    def record(key: str, value: float) -> None:
        results[key] = value
        out.write_text(json.dumps(results, indent=2))
        print(f"{key}: {value:.3f}", flush=True)

    def score(unet: torch.nn.Module, seed: int) -> float:
        return fid(ddim_samples(unet.eval(), scheduler_config, args.samples, args.ddim_steps, 16, seed=seed))

    gen = torch.Generator().manual_seed(0)
    for i in range(3):
        key = f"real train images, subset {i}"
        if key not in results:
            record(key, fid(x[torch.randperm(len(x), generator=gen)[:args.samples]]))
    snapshots: dict[str, dict] = {}
    snap = Snapshots(args.snapshots, snapshots)
    base = trained_module(args, dm, work, [snap] if args.snapshots else None)
    scheduler_config = base.scheduler.config
    for key, state in snapshots.items():
        net = copy.deepcopy(base.unet)
        net.load_state_dict(state)
        record(key, score(net, args.seeds[0]))
    with torch.no_grad():
        sample, t = base.example_input_array
        train_out = base.unet.train()(sample, t).sample
        eval_out = base.unet.eval()(sample, t).sample
    record("train vs eval mode, max |diff| of the UNet output", float((train_out - eval_out).abs().max()))
    for seed in [*args.seeds, 2, args.seeds[0]]:
        key = f"original, seed {seed}" + (" (again)" if f"original, seed {seed}" in results else "")
        if key not in results:
            start = time.perf_counter()
            record(key, score(base.unet, seed))
            print(f"  ({time.perf_counter() - start:.0f} s)", flush=True)
    for variant in args.variants:
        if all(f"{variant}, seed {s}" in results for s in args.seeds):
            continue
        L.seed_everything(0, workers=True)
        module = trained_module(args, dm, work)
        spec, _, steps = variant.partition("@")
        lr, _, ema = spec.partition("+ema")
        module.lr = float(lr[2:])
        callbacks = [EMA(float(ema or 0.995))] if "+ema" in spec else []
        start = time.perf_counter()
        trainer(work, f"diag-{variant}", int(steps or args.finetune_steps), callbacks).fit(module, datamodule=dm)
        print(f"  {variant}: fine-tuned in {time.perf_counter() - start:.0f} s", flush=True)
        for seed in args.seeds:
            record(f"{variant}, seed {seed}", score(module.unet, seed))


if __name__ == "__main__":
    main()
