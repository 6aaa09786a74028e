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


def calibrate_batchnorm(model: nn.Module, example: torch.Tensor, seed: int = 0) -> nn.Module:
    """Set BatchNorm statistics from forward passes on random data, as training would.

    With statistics that match the activations (as in a trained network), float32 noise is
    not amplified layer after layer the way arbitrary statistics amplify it.
    """
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    for mod in model.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.reset_running_stats()
            mod.momentum = None  # cumulative average
            if mod.weight is not None:
                with torch.no_grad():
                    mod.weight.copy_(torch.rand(mod.num_features, generator=gen) * 0.5 + 0.75)
                    mod.bias.copy_((torch.rand(mod.num_features, generator=gen) - 0.5) * 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(example.shape, generator=gen, dtype=example.dtype))
    return model.train(was_training)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |a|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / a.abs().max())
