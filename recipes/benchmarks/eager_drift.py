"""How far does one network's single-thread eager time move from second to second? (issue 12)

A latency table adds up entries timed one after another; if the machine's speed moves while they
are timed, no pricing model can make their sum match a later measurement. This recipe times the
BN-folded network (``latency_models.py``) for ``--seconds`` at 1 thread, exactly as the table does
(``LatencySettings()``'s timing environment: thread CPU clock, the allocator keeping freed
memory), in blocks of 10 passes, and prints the distribution of the block medians and a sample of
the series. On a steady machine p5-p95 lie within a few percent.

    python recipes/benchmarks/eager_drift.py --model digits-mbv2 --seconds 30

Nothing else may run. Measured on this project's 2-vCPU VMs: ``results/latency_causes.md`` section 16.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def block_medians(net: torch.nn.Module, inputs: tuple, seconds: float, passes: int = 10) -> list[float]:
    """Median ms of every block of ``passes`` forward passes, for ``seconds`` (thread CPU clock)."""
    blocks: list[float] = []
    end = time.time() + seconds
    with torch.no_grad():
        for _ in range(5):
            net(*inputs)
        while time.time() < end:
            times = []
            for _ in range(passes):
                start = time.thread_time()
                net(*inputs)
                times.append(time.thread_time() - start)
            blocks.append(statistics.median(times) * 1e3)
    return blocks


def steadiness(model_name: str = "digits-mbv2", seconds: float = 30.0) -> dict:
    """The BN-folded ``model_name`` timed for ``seconds`` at 1 thread in the table's timing environment:
    its block medians (ms) and their p5 / median / p95, and ``drift`` = (p95 - p5) / median."""
    from latency_models import build

    from lightning_layermerge import LatencySettings, fold_batchnorm, trace
    from lightning_layermerge.planning.tables.timing import timing_environment

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, example = build(model_name)
        net = fold_batchnorm(model, trace(model, example))
        inputs = example if isinstance(example, tuple) else (example,)
        with timing_environment(LatencySettings()):
            blocks = block_medians(net, inputs, seconds)
    finally:
        torch.set_num_threads(before)
    q = statistics.quantiles(blocks, n=20)
    median = statistics.median(blocks)
    return {"model": model_name, "seconds": seconds, "blocks": blocks, "min": min(blocks), "p5": q[0],
            "median": median, "p95": q[-1], "max": max(blocks), "drift": (q[-1] - q[0]) / median}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-mbv2")
    p.add_argument("--seconds", type=float, default=30.0)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    s = steadiness(args.model, args.seconds)
    blocks = s["blocks"]
    print(f"{args.model}: {len(blocks)} blocks of 10 passes in {args.seconds:.0f} s, ms: min {s['min']:.3f} "
          f"p5 {s['p5']:.3f} median {s['median']:.3f} p95 {s['p95']:.3f} max {s['max']:.3f}; "
          f"p5-p95 {s['drift']:.0%} of the median")
    step = max(1, len(blocks) // 40)
    print("every", step, "th block:", " ".join(f"{b:.2f}" for b in blocks[::step]))


if __name__ == "__main__":
    main()
