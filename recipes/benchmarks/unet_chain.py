"""Print the LayerMerge chain of the DDPM CIFAR-10 UNet (diffusers ``google/ddpm-cifar10-32``).

The model is built from that checkpoint's configuration with random weights (nothing is
downloaded): the chain depends only on the architecture. Writes the table to
``results/ddpm_cifar10_chain.txt``.

    python recipes/benchmarks/unet_chain.py
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from lightning_layermerge import trace

# The DDPM UNet comes from the sibling recipe folder recipes/ddpm.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ddpm"))
from diffusion import DDPM_CIFAR10_UNET, build_unet  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    unet = build_unet(DDPM_CIFAR10_UNET).eval()
    sample, timestep = torch.randn(1, 3, 32, 32), torch.tensor([500])
    start = time.perf_counter()
    chain = trace(unet, (sample, timestep))
    took = time.perf_counter() - start
    lines = [
        "DDPM CIFAR-10 UNet (google/ddpm-cifar10-32 config, random weights), input (1, 3, 32, 32), t=500",
        f"parameters: {sum(p.numel() for p in unet.parameters()) / 1e6:.1f} M; trace took {took:.1f} s",
        f"L = {chain.num_layers} chain convs, {len(chain.segments)} legal segments (table entries), "
        f"{len(chain.forced)} forced boundaries (incl. 0 and L)",
        "",
        str(chain),
        "",
        "Merge candidates (segments of more than one conv):",
        *(f"  ({s.i}, {s.j}] k={s.k} keeps {list(s.convs)}" for s in chain.segments if s.j - s.i > 1),
    ]
    text = "\n".join(lines)
    print(text)
    out = Path(__file__).parent / "results" / "ddpm_cifar10_chain.txt"
    out.write_text(text + "\n")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    main()
