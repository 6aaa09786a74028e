"""Shared test helpers: random plans and realistic random BatchNorm statistics."""

from __future__ import annotations

import random

import torch
from torch import nn

from lightning_layermerge import Chain, Plan


def random_plan(chain: Chain, rng: random.Random) -> Plan:
    """A uniformly random walk over legal segments from position 0 to L."""
    by_start: dict[int, list] = {}
    for seg in chain.segments:
        by_start.setdefault(seg.i, []).append(seg)
    at, keys = 0, []
    while at < chain.num_layers:
        seg = rng.choice(by_start[at])
        keys.append(seg.key)
        at = seg.j
    return Plan.from_segments(chain, keys)


def randomize_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial statistics so folding it is really tested."""
    gen = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            with torch.no_grad():
                n = mod.num_features
                mod.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                if mod.weight is not None:
                    mod.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                    mod.bias.copy_(torch.rand(n, generator=gen) - 0.5)
    return model


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max())
