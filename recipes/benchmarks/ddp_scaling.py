"""Importance-table build time with 1 and 2 DDP processes (CPU, gloo) on the same model.

    python recipes/benchmarks/ddp_scaling.py            # writes results/ddp_scaling.md

The entries of the importance table are independent short fine-tunes; the callback splits
them across DDP ranks and gathers them. This measures the wall time of that build (no
cache) for the quickstart network on digits with ``devices=1`` and ``devices=2``, each in a
fresh ``torchrun``-free Lightning DDP launch (one torch thread per process), alternating the
two settings ``--repeats`` times, and reports the median ratio. On a 2-core machine the ideal
ratio is 0.5; process start-up, the gather and the other processes on the machine add to it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def worker(devices: int, out: Path) -> None:
    """One DDP fit whose setup builds the importance table; rank 0 writes the build time."""
    import lightning.pytorch as L
    import torch

    sys.path.insert(0, str(HERE.parent))
    from digits import DigitsClassifier, DigitsDataModule

    from lightning_layermerge import ImportanceSettings, LatencySettings, LayerMergeCallback
    from lightning_layermerge.fit.planner import Planner

    torch.set_num_threads(1)
    L.seed_everything(0)
    seconds: dict[str, float] = {}
    build = Planner.build_importance_table

    def timed(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return build(self, *args, **kwargs)
        finally:
            seconds["importance"] = time.perf_counter() - start

    Planner.build_importance_table = timed
    callback = LayerMergeCallback(
        budget=0.6, cache_dir=False, verbose=False, calibrate=False,
        importance=ImportanceSettings(method="finetune", fraction=0.15, steps=20, batch_size=32, lr=0.02),
        latency=LatencySettings(batch_size=16, threads=1, warmup=2, repeats=5))
    trainer = L.Trainer(strategy="ddp" if devices > 1 else "auto", accelerator="cpu", devices=devices, max_steps=1,
                        logger=False, callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out))
    trainer.fit(DigitsClassifier(width=16, blocks=(2, 2)), datamodule=DigitsDataModule(image_size=16, batch_size=64))
    if trainer.is_global_zero:
        entries = len(callback.importance_table)
        out.joinpath(f"time-{devices}.json").write_text(json.dumps({"seconds": seconds["importance"],
                                                                      "entries": entries}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="runs/ddp_scaling")
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.worker is not None:
        worker(args.worker, out)
        return
    times: dict[int, list[float]] = {1: [], 2: []}
    entries = 0
    for r in range(args.repeats):
        for devices in (1, 2):
            subprocess.run([sys.executable, __file__, "--worker", str(devices), "--out", str(out)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            result = json.loads((out / f"time-{devices}.json").read_text())
            times[devices].append(result["seconds"])
            entries = result["entries"]
            print(f"repeat {r + 1}: devices={devices}: {result['seconds']:.1f} s", flush=True)
    ratios = [b / a for a, b in zip(times[1], times[2])]
    lines = [
        "# Importance-table build: 1 vs 2 DDP processes (CPU, gloo)",
        "",
        f"Command: `python recipes/benchmarks/ddp_scaling.py --repeats {args.repeats}`. Quickstart network "
        f"(digits ResNet, {entries} entries, 20 SGD steps each), one torch thread per process, no cache.",
        "",
        "| repeat | 1 process (s) | 2 processes (s) | ratio |",
        "|---|---|---|---|",
        *[f"| {i + 1} | {a:.1f} | {b:.1f} | {b / a:.2f} |" for i, (a, b) in enumerate(zip(times[1], times[2]))],
        "",
        f"Median ratio (2 processes / 1 process): **{statistics.median(ratios):.2f}** (ideal on 2 cores: 0.50).",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddp_scaling.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
