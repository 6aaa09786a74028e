"""CPU latency of the DDPM CIFAR-10 UNet merged at latency budgets, side by side with the original.

    python recipes/benchmarks/ddpm_latency.py [--budgets 0.7 0.5] [--batch 8] [--repeats 30]

The UNet is built from the ``google/ddpm-cifar10-32`` configuration with random weights (no
download). The latency table is measured here (CPU, one thread); with random weights there
is no meaningful importance, so a segment's importance is 1 + the number of convs it keeps:
the DP keeps as many non-linearities and convs as the budget allows. A budget below the
smallest reachable latency is reported as such, and the plan at that floor is measured.
For each budget the plan is pruned and merged and then timed against the original,
interleaved forward by forward, median of ``--repeats``. Writes ``results/ddpm_latency.md``.
What a trained model's importance table would choose differs; the latency side of the claim
is what this measures.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from lightning_layermerge import LatencySettings, Plan, build_latency_table, fold_batchnorm, merge, prune
from lightning_layermerge import solve, trace
from lightning_layermerge.planning.chain_solve import reachable_floor_ms
from lightning_layermerge.planning import measure_side_by_side

# The DDPM UNet comes from the sibling recipe folder recipes/ddpm.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ddpm"))
from diffusion import DDPM_CIFAR10_UNET, build_unet  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[0.7, 0.5])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=30)
    p.add_argument("--cache", default="runs/ddpm_latency_cache")
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = build_unet(DDPM_CIFAR10_UNET).eval()
    example = (torch.randn(args.batch, 3, 32, 32), torch.randint(0, 1000, (args.batch,)))
    start = time.perf_counter()
    chain = trace(unet, example)
    settings = LatencySettings(device="cpu", batch_size=args.batch, threads=1, warmup=3, repeats=10, reference=True)
    table = build_latency_table(unet, chain, settings, cache_dir=args.cache)
    importance = {s.key: 1.0 + len(s.convs) for s in chain.segments}
    floor = reachable_floor_ms(table, chain, "layermerge")
    floor_fraction = (table.outside_ms + floor) / table.total_ms
    rows = []
    original = fold_batchnorm(unet, chain)
    timing = LatencySettings(device="cpu", threads=1, warmup=3, repeats=args.repeats)
    for asked in args.budgets:
        budget, label = asked, f"{asked}"
        if asked < floor_fraction:
            budget = floor_fraction * 1.02  # a little room: the DP rounds entry latencies up
            label = f"{asked} (unreachable: the floor is {floor_fraction:.3f}; measured at 1.02 x the floor)"
        sol = solve(table.entries, importance, chain.num_layers, table.budget_for(budget))
        plan = Plan.from_segments(chain, sol.segments)
        merged = merge(prune(unet, chain, plan))
        ms = measure_side_by_side({"original": original, "merged": merged}, example, timing)
        with torch.no_grad():
            same = merged(*example).sample.shape == unet(*example).sample.shape
        rows.append(f"| {label} | {len(plan.keys)} segments, {len(plan.kept_convs)}/{chain.num_layers} convs | "
                    f"{table.predicted_ms(plan.keys) / table.total_ms:.3f} | {ms['original']:.1f} | {ms['merged']:.1f} | "
                    f"**{ms['merged'] / ms['original']:.3f}** ({ms['original'] / ms['merged']:.2f}x){'' if same else ' !'} |")
        print(rows[-1], flush=True)
    lines = [
        "# DDPM CIFAR-10 UNet on CPU: merged vs original, side by side",
        "",
        f"Command: `python recipes/benchmarks/ddpm_latency.py --batch {args.batch} --repeats {args.repeats}`. "
        f"UNet of `google/ddpm-cifar10-32` (config only, random weights, "
        f"{sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M parameters), input ({args.batch}, 3, 32, 32), "
        f"1 thread; L = {chain.num_layers}, {len(chain.segments)} table entries; table total "
        f"{table.total_ms:.1f} ms of which {table.outside_ms:.1f} ms ({table.outside_ms / table.total_ms:.0%}) "
        "lie outside the chain (attention, GroupNorm, time embedding, up/down-sampling). Importance = 1 + kept convs "
        "per segment (random weights). Timings interleaved, median of repeats; the ratio is merged / original.",
        "",
        "| budget | plan | predicted ratio | original (ms) | merged (ms) | measured ratio |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
        f"Total time {time.perf_counter() - start:.0f} s.",
    ]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ddpm_latency.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
