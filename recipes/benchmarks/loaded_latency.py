"""Latency of a merged network loaded with ``load_compressed`` vs the in-memory one.

Builds merged networks (a random plan, fixed seed) of torchvision ResNet-18 and
MobileNetV3-small and a small diffusers UNet, saves each with ``save_compressed``, loads it
back, and times both side by side: one thread, alternating runs, median of ``RUNS`` pairs. The
loaded network is rebuilt from the same graph with the same modules, so the ratio should be
1 up to timing noise, which the control (a deep copy of the in-memory network, timed the
same way) shows. Writes ``results/loaded_latency.md``.

Usage::

    python recipes/benchmarks/loaded_latency.py
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import copy  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from torch import nn  # noqa: E402

from lightning_layermerge import Plan, load_compressed, merge, prune, save_compressed, trace  # noqa: E402

RUNS = 61
WARMUP = 3
RESULTS = Path(__file__).parent / "results" / "loaded_latency.md"


def random_plan(chain, rng: random.Random) -> Plan:
    """``Plan.random``: a random walk over legal segments from position 0 to L."""
    return Plan.random(chain, rng)


def side_by_side(a: Callable[[], object], b: Callable[[], object]) -> tuple[float, float, float]:
    """Median milliseconds of ``a`` and ``b`` and the median of the per-pair ratios b / a.

    Runs alternate (a b, b a, ...), so a load change on a shared machine hits both alike; the
    ratio of each back-to-back pair cancels slow drifts.
    """
    ta: list[float] = []
    tb: list[float] = []
    with torch.inference_mode():
        for i in range(WARMUP + RUNS):
            order = ((a, ta), (b, tb)) if i % 2 == 0 else ((b, tb), (a, ta))
            for fn, out in order:
                start = time.perf_counter()
                fn()
                out.append((time.perf_counter() - start) * 1e3)
    ta, tb = ta[WARMUP:], tb[WARMUP:]
    return statistics.median(ta), statistics.median(tb), statistics.median(y / x for x, y in zip(ta, tb))


def networks() -> list[tuple[str, nn.Module, tuple]]:
    import torchvision
    from diffusers import UNet2DModel

    unet = UNet2DModel(sample_size=32, in_channels=3, out_channels=3, block_out_channels=(32, 64),
                       layers_per_block=1, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)
    return [
        ("torchvision resnet18, 8x3x64x64", torchvision.models.resnet18(num_classes=10), (torch.randn(8, 3, 64, 64),)),
        ("torchvision mobilenet_v3_small, 8x3x64x64", torchvision.models.mobilenet_v3_small(num_classes=10),
         (torch.randn(8, 3, 64, 64),)),
        ("diffusers UNet2DModel (32, 64), 4x3x32x32", unet,
         (torch.randn(4, 3, 32, 32), torch.tensor([10, 20, 30, 40]))),
    ]


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    rows = ["| network | in memory (ms) | loaded (ms) | loaded / in memory | control: copy / in memory |",
            "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as tmp:
        for name, model, args in networks():
            model.eval()
            chain = trace(model, args)
            merged = merge(prune(model, chain, random_plan(chain, random.Random(0))))
            loaded = load_compressed(save_compressed(merged, Path(tmp) / "net.safetensors"))
            ms_mem, ms_loaded, ratio = side_by_side(lambda: merged(*args), lambda: loaded(*args))
            twin = copy.deepcopy(merged)  # control: the same network twice shows the timing noise
            control = side_by_side(lambda: merged(*args), lambda: twin(*args))[2]
            rows.append(f"| {name} | {ms_mem:.2f} | {ms_loaded:.2f} | {ratio:.3f} | {control:.3f} |")
            print(rows[-1], flush=True)
    text = (f"One thread, runs alternating, {RUNS} pairs after {WARMUP} warm-up; times are medians, the ratio "
            f"is the median of the per-pair ratios (torch {torch.__version__}, {os.cpu_count()} CPUs, "
            f"load average {os.getloadavg()[0]:.1f}).\n\n" + "\n".join(rows) + "\n")
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
