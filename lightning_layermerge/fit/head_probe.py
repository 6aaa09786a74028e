"""Importance entries without training the network: the classifier head refit on frozen features.

A short fine-tune of every table entry is what the paper does, but on a few thousand images
it costs far more than an epoch per table (30 steps per entry x 66-104 entries), and on the
digits nets nothing cheaper that still fine-tunes ranked the entries well. What the long
fine-tune measures is how much of the class information survives the pruned segment; a
linear probe measures the same thing with no optimizer step through the network:

1. BatchNorm statistics re-estimated on a few training batches (done by the caller);
2. the inputs of the target's last ``nn.Linear`` (the head whose output is the target's
   output) recorded over the fine-tuning subset, in eval mode, through the module's own
   ``training_step``;
3. the head's weight and bias refit by L-BFGS on the module's own training loss over those
   recorded features, with an L2 penalty on the weight, replaying the features in place of
   the network (so ``training_step`` computes its loss from the batch as usual);
4. the entry is then scored like any other (the module's validation metric), and enters the
   table as :func:`headroom`: the log of its Perf's distance above that of a "blind" head (the
   head refit with its weight at zero: the class prior), so a plan's summed values compare
   plans correctly although every probe's loss is capped by the prior's.

The L2 penalty matters: a nearly unpenalised refit separates the training features of almost
any segment and ranks entries poorly (Spearman 0.62-0.76 with 3-epoch fine-tunes on the digits
nets at a penalty of 1e-4); penalties of 0.1-3 rank alike (0.97 / 0.88-0.90 over 40 entries).
Measurements: ``importance_zero_training.md``, ``importance_probe_variants.md`` and
``importance_fashion.md`` in the repository's ``recipes/benchmarks/results/``.

The probe applies when the target ends in an ``nn.Linear`` whose output is the target's output,
``training_step`` calls the target once per batch and returns a loss; :func:`probe_head`
raises :class:`ProbeUnsupported` otherwise, and the caller fine-tunes instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning_utilities.core.apply_func import apply_to_collection
from torch import nn

from .paths import get_path, set_path

__all__ = ["ProbeUnsupported", "find_head", "headroom", "probe_head"]

#: L-BFGS iterations of the head refit (the loss is flat well before this on the measured nets).
ITERATIONS = 50


class ProbeUnsupported(RuntimeError):
    """The module's structure does not allow a head probe (the message says why)."""


def find_head(target: nn.Module, forward: Callable[[], Any]) -> nn.Linear:
    """The ``nn.Linear`` of ``target`` whose output is ``target``'s output, found by running ``forward``.

    Raises:
        ProbeUnsupported: ``target`` is not called exactly once, or its output does not come
            straight from one of its ``nn.Linear`` layers.
    """
    outputs: dict[nn.Module, Any] = {}
    calls: list[Any] = []
    hooks = [m.register_forward_hook(lambda mod, args, out: outputs.__setitem__(mod, out))
             for m in target.modules() if isinstance(m, nn.Linear)]
    hooks.append(target.register_forward_hook(lambda mod, args, out: calls.append(out)))
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in hooks:
            h.remove()
    if len(calls) != 1:
        raise ProbeUnsupported(f"training_step called the network {len(calls)} times per batch (the probe needs 1)")
    head = next((m for m, out in outputs.items() if out is calls[0]), None)
    if head is None:
        raise ProbeUnsupported("the network's output does not come straight from an nn.Linear (no classifier head)")
    return head


class _Replay(nn.Module):
    """Stands in for the target: returns ``head(features)`` of the next recorded batch, whatever its input."""

    def __init__(self, head: nn.Linear, features: list[torch.Tensor]) -> None:
        super().__init__()
        self.head, self.features, self.index = head, features, 0

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.head(self.features[self.index])
        self.index += 1
        return out


def _loss(out: Any) -> torch.Tensor:
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise ProbeUnsupported("training_step did not return a loss tensor")
    return loss


def probe_head(module: pl.LightningModule, target_path: str, batches: Iterable[Any], weight_decay: float, *,
               blind: bool = False) -> None:
    """Refit the head of ``module``'s target (in place) on ``batches`` with the rest of the target frozen.

    Args:
        module: A copy of the user's LightningModule holding the pruned target.
        target_path: Attribute path of the target inside ``module``.
        batches: Training batches, e.g. a DataLoader (each is moved to the module's device in turn;
            what is kept for the refit is the head's input and the batch with the network's
            input replaced by a zero-stride placeholder, so memory is the features', not the
            images').
        weight_decay: Weight of ``sum(head.weight ** 2)`` added to the mean training loss.
        blind: Set the head's weight to zero and fit only its bias: the best the head can do
            without any feature (the prior), the floor :func:`headroom` measures from.

    Raises:
        ProbeUnsupported: The structure does not allow a probe (see :func:`find_head`), or
            ``training_step`` failed on the replayed features.
    """
    # training_step's self.log calls have no loop to log into here (and raise if a finished
    # trainer is still attached): they are no-ops for the probe's duration.
    module.log = module.log_dict = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        _probe(module, target_path, batches, weight_decay, blind)
    finally:
        del module.log, module.log_dict


def _probe(module: pl.LightningModule, target_path: str, batches: Iterable[Any], weight_decay: float,
           blind: bool) -> None:
    target = get_path(module, target_path)
    step = type(module).training_step
    target.eval()  # features as the scored network computes them
    try:
        head, features, batches = _record(module, target, step, batches)
    except ProbeUnsupported:
        raise
    except Exception as err:  # e.g. a training_step that reads self.trainer: the fine-tune has one
        raise ProbeUnsupported(f"training_step failed outside a Trainer: {type(err).__name__}: {err}") from err
    params = [head.weight] + ([head.bias] if head.bias is not None else [])
    saved = [p.detach().clone() for p in params]
    if blind:
        with torch.no_grad():
            head.weight.zero_()
        params, saved, weight_decay = params[1:], saved[1:], 0.0
        if not params:  # no bias: the blind head outputs zeros
            return
    replay = _Replay(head, features)
    set_path(module, target_path, replay)
    grads = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        _refit(module, step, batches, replay, params, weight_decay)
    except ProbeUnsupported:
        _restore(params, saved)
        raise
    except Exception as err:  # a training_step that needs the trainer or the real network
        _restore(params, saved)
        raise ProbeUnsupported(f"training_step failed on replayed features: {type(err).__name__}: {err}") from err
    finally:
        set_path(module, target_path, target)
        for p, g in zip(params, grads):
            p.requires_grad_(g)


def _record(module: pl.LightningModule, target: nn.Module, step: Callable,
            batches: Iterable[Any]) -> tuple[nn.Linear, list[torch.Tensor], list[Any]]:
    """The head, its input on every batch (no gradient), and the batches to replay the loss on."""
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    head: nn.Linear | None = None
    features: list[torch.Tensor] = []
    kept: list[Any] = []
    for i, batch in enumerate(batches):
        batch = move_data_to_device(batch, device)
        if head is None:
            head = find_head(target, lambda: step(module, batch, i))
        inputs: set[int] = set()
        hooks = [head.register_forward_hook(lambda mod, args, out: features.append(args[0].detach())),
                 target.register_forward_pre_hook(
                     lambda mod, args, kwargs: inputs.update(id(t) for t in (*args, *kwargs.values())),
                     with_kwargs=True)]
        try:
            with torch.no_grad():
                step(module, batch, i)
        finally:
            for h in hooks:
                h.remove()
        kept.append(_without(batch, inputs))
    if head is None:
        raise ProbeUnsupported("the training subset yielded no batch")
    return head, features, kept


def _without(batch: Any, inputs: set[int]) -> Any:
    """``batch`` with the tensors the network was called on replaced by zero-stride zeros of the same shape.

    The replay ignores the network's input, so the refit need not keep the images; shape, dtype
    and device stay, for a ``training_step`` that reads them."""
    return apply_to_collection(batch, torch.Tensor, lambda t: torch.zeros((), dtype=t.dtype, device=t.device)
                               .expand(t.shape) if id(t) in inputs else t)


def _refit(module: pl.LightningModule, step: Callable, batches: list[Any], replay: _Replay,
           params: list[nn.Parameter], weight_decay: float) -> None:
    """L-BFGS on the head's parameters: mean training loss over the batches plus the L2 penalty."""
    opt = torch.optim.LBFGS(params, max_iter=ITERATIONS, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        replay.index = 0
        loss = sum(_loss(step(module, batch, i)) for i, batch in enumerate(batches)) / len(batches)
        if weight_decay:
            loss = loss + weight_decay * params[0].pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)


def headroom(perf: float, blind_perf: float) -> float:
    """``ln`` of how far ``perf`` lies above the blind head's Perf: a probe entry's value in the table.

    The probe's Perf is bounded by what a head without features reaches (the loss of the
    class prior), and the penalty keeps every probe close to that bound, so damaged entries
    crowd against it: differences of Perf would rank plans wrongly when summed (a plan with one
    segment that loses everything would look better than one with two that lose much). The
    log of the distance to the bound makes ``ln I = headroom(entry) - headroom(original)``
    the log of the share of the original's headroom an entry keeps, which is what the DP can
    add up. Entries at or below the bound get ``ln`` of a tiny positive number (very low).
    """
    return math.log(max(perf - blind_perf, 1e-12))


def _restore(params: list[nn.Parameter], saved: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for p, s in zip(params, saved):
            p.copy_(s)
