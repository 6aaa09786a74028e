"""BatchNorm statistics re-estimation (torch only, no Lightning).

Pruning a segment changes the distribution every later BatchNorm sees, but its running
mean and variance still describe the original network, so a pruned network evaluated in
``eval()`` mode normalises with wrong statistics and often starts near chance accuracy.
Re-estimating the running statistics on a few training batches (forward passes only, no
gradient, no weight change) is cheap and recovers much of that loss. It is applied before
each importance entry's short fine-tune (``ImportanceSettings.bn_batches``) and can be used
before the user's own fine-tuning::

    from lightning_layermerge.planning.bn_recalibration import recalibrate_batchnorm
    recalibrate_batchnorm(pruned, train_loader, batches=20)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from .validate import check_count

__all__ = ["batchnorm_layers", "default_forward", "recalibrate_batchnorm"]

#: Runs one batch through the network (the return value is ignored).
Forward = Callable[[nn.Module, Any], Any]


def batchnorm_layers(module: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``module`` that track running statistics, in registration order."""
    return [m for m in module.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


def default_forward(module: nn.Module, batch: Any) -> Any:
    """``module(x)`` with ``x`` the batch, or its first element for a ``(input, target, ...)`` batch."""
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    if not isinstance(x, torch.Tensor):
        raise TypeError(
            f"recalibrate_batchnorm cannot find the input tensor in a batch of type {type(x).__name__}; "
            "pass forward=lambda module, batch: module(...)"
        )
    device = next((p.device for p in module.parameters()), x.device)
    return module(x.to(device))


@torch.no_grad()
def recalibrate_batchnorm(module: nn.Module, loader: Iterable[Any], batches: int,
                          forward: Forward = default_forward) -> int:
    """Re-estimate the running statistics of every BatchNorm of ``module`` on ``batches`` batches.

    The statistics are reset and replaced by the exact average over the batches seen
    (``momentum=None``, PyTorch's cumulative moving average), so the result does not depend
    on the layers' ``momentum``. Only BatchNorm layers are put in training mode; every other
    module keeps its mode (dropout stays off if the network was in ``eval()``), and all
    modes and momenta are restored afterwards. Weights are not changed. If a batch fails
    (or there is none) the previous statistics are restored before the error propagates.

    Args:
        module: The network (modified in place: its BatchNorm buffers).
        loader: An iterable of batches, e.g. the training DataLoader.
        batches: How many batches to use (>= 1); fewer if the loader is shorter.
        forward: ``forward(module, batch)`` runs one batch; default: ``module(batch[0])``.

    Returns:
        The number of batches used (0 if ``module`` has no BatchNorm: then nothing is run).

    Raises:
        ValueError: ``batches`` is not a positive int, or the loader yields no batch.
    """
    check_count("recalibrate_batchnorm(batches=...)", batches, 1)
    norms = batchnorm_layers(module)
    if not norms:
        return 0
    modes = {m: m.training for m in module.modules()}
    momenta = [bn.momentum for bn in norms]
    saved = [{k: v.clone() for k, v in bn.state_dict().items()} for bn in norms]
    used = 0
    try:
        for bn in norms:
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average over the batches seen
            bn.train()
        for batch in loader:
            forward(module, batch)
            used += 1
            if used >= batches:
                break
    except BaseException:
        _restore(norms, saved)
        raise
    finally:
        for bn, momentum in zip(norms, momenta):
            bn.momentum = momentum
        for m, mode in modes.items():
            m.training = mode
    if used == 0:
        _restore(norms, saved)
        raise ValueError("recalibrate_batchnorm: the loader yielded no batch")
    return used


def _restore(norms: list[_BatchNorm], saved: list[dict[str, torch.Tensor]]) -> None:
    """Put back the statistics a failed re-estimation had reset."""
    for bn, state in zip(norms, saved):
        bn.load_state_dict(state)
