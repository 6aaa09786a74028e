"""Checks that a surgery kept a network's function (torch only), shared by the tests and the benchmark recipes.

:func:`randomize_batchnorm` and :func:`calibrate_batchnorm` give BatchNorms non-trivial statistics
(so folding them is really exercised); :func:`rel_err` compares two outputs; :func:`float_sensitivity`
says how closely a floating-point format can reproduce a network at all.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


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


def float_sensitivity(net: nn.Module, x: torch.Tensor, ulp: float = 2.0**-52, samples: int = 3, seed: int = 0) -> float:
    """How far ``net``'s output moves when every parameter (and BatchNorm statistic) moves by
    at most one unit in the last place of a floating-point format.

    The largest relative change (as :func:`rel_err`) over ``samples`` random perturbations
    ``p * (1 + u * ulp)``, u uniform in [-1, 1]; ``ulp`` is 2**-52 for float64, 2**-23 for
    float32. Rounding anywhere in the network (in a forward pass or in composing merged
    kernels) acts like such a perturbation, so an ill-conditioned network cannot be
    reproduced in that format more closely than this by any other computation of the same
    function. ``net`` is evaluated in its own dtype (use float64 to measure a float32 ulp).
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        exact = net(x)
        worst = 0.0
        for _ in range(samples):
            noisy = copy.deepcopy(net)
            floats = [b for b in noisy.buffers() if b.is_floating_point()]
            for p in [*noisy.parameters(), *floats]:
                p.mul_(1 + ulp * (2 * torch.rand(p.shape, generator=gen, dtype=p.dtype) - 1))
            worst = max(worst, rel_err(exact, noisy(x)))
            del noisy
    return worst
