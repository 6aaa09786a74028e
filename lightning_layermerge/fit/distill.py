"""Knowledge distillation from the uncompressed network while the compressed one fine-tunes.

:class:`Distillation` is the user's setting (pass it to ``LayerMergeCallback(distill=...)``);
:class:`DistillationPatch` is the mechanics, applied by the callback for the duration of a fit:

* the *teacher* is a frozen deep copy of the original target submodule. It lives on the
  callback, not inside the LightningModule, so it stays out of checkpoints, the optimizer
  and the DDP wrapper;
* a forward hook on the target submodule (not on the LightningModule: under DDP that fires
  twice) records what the student received and returned during a training step;
* ``training_step`` is wrapped as an *instance attribute* that returns
  ``loss + alpha * KD(student_out, teacher(student_in))``. Lightning (and its DDP wrapper)
  look ``training_step`` up on the instance, so the user's class stays unchanged, and
  hooks such as ``on_before_backward`` could not have changed the loss anyway.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from ..planning.validate import check_finite

__all__ = ["Distillation", "DistillationPatch", "kd_loss"]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class Distillation:
    """Distillation from the original network during the compressed network's fine-tuning.

    The training loss becomes ``loss + alpha * KD``, where KD compares the compressed
    target's output with the output of a frozen copy of the original target on the same
    input.

    Args:
        alpha: Weight of the distillation term (>= 0).
        temperature: Softening temperature T (> 0) for classification outputs.
        loss_fn: Optional ``loss_fn(student_output, teacher_output) -> scalar tensor``; replaces
            the default :func:`kd_loss` (``T^2 * KL`` on softened logits for 2-D outputs, MSE
            for other tensors).

    Raises:
        ValueError: ``alpha`` is negative or not finite, or ``temperature`` is not positive.
        TypeError: ``loss_fn`` is not callable.
    """

    alpha: float = 1.0
    temperature: float = 4.0
    loss_fn: LossFn | None = None

    def __post_init__(self) -> None:
        check_finite("Distillation(alpha=...)", self.alpha, positive=False)
        check_finite("Distillation(temperature=...)", self.temperature, positive=True)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise TypeError(f"Distillation(loss_fn=...) must be callable, got {type(self.loss_fn).__name__}")

    def loss(self, student: Any, teacher: Any) -> torch.Tensor:
        """The distillation term (before ``alpha``) for one forward of the target."""
        if self.loss_fn is not None:
            return self.loss_fn(student, teacher)
        return kd_loss(student, teacher, self.temperature)


def kd_loss(student: Any, teacher: Any, temperature: float = 4.0) -> torch.Tensor:
    """Default distillation loss between two outputs of the same structure.

    A 2-D floating tensor is taken as classification logits ``(N, classes)``:
    ``T^2 * KL(softmax(teacher / T) || softmax(student / T))`` (batch mean, as in Hinton et al.;
    ``T^2`` keeps gradient magnitudes independent of T). Any other floating tensor gets the
    mean squared error. Tuples, lists, dicts and registered output dataclasses are compared
    leaf by leaf and averaged.

    Raises:
        ValueError: The outputs have different structures or hold no floating tensor.
    """
    s_leaves, s_spec = pytree.tree_flatten(student)
    t_leaves, t_spec = pytree.tree_flatten(teacher)
    if s_spec != t_spec:
        raise ValueError("student and teacher outputs have different structures; pass Distillation(loss_fn=...)")
    terms = [_leaf_loss(s, t, temperature) for s, t in zip(s_leaves, t_leaves)
             if isinstance(s, torch.Tensor) and s.is_floating_point()]
    if not terms:
        raise ValueError(
            "the target's output holds no floating-point tensor to distil; pass Distillation(loss_fn=...)"
        )
    return torch.stack(terms).mean()


def _leaf_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    teacher = teacher.detach().to(student.dtype)
    if student.dim() == 2:
        log_p = F.log_softmax(student / temperature, dim=1)
        log_q = F.log_softmax(teacher / temperature, dim=1)
        return F.kl_div(log_p, log_q, reduction="batchmean", log_target=True) * temperature**2
    return F.mse_loss(student, teacher)


def frozen_teacher(target: nn.Module) -> nn.Module:
    """A frozen copy of ``target`` in eval mode (never trained, no gradients)."""
    teacher = copy.deepcopy(target).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher


class DistillationPatch:
    """Adds ``alpha * KD`` to a LightningModule's training loss without changing its class.

    Args:
        config: The user's :class:`Distillation`.
        teacher: Frozen original target (see :func:`frozen_teacher`); moved to the
            student's device on first use.
        module: The LightningModule whose ``training_step`` is wrapped.
        target: The compressed submodule of ``module`` (the student).
        log_name: Name under which the KD term is logged with ``module.log`` (None: not logged).
    """

    def __init__(self, config: Distillation, teacher: nn.Module, module: nn.Module, target: nn.Module,
                 log_name: str | None = "layermerge/kd_loss") -> None:
        self.config = config
        self.teacher = teacher
        self.module = module
        self.target = target
        self.log_name = log_name
        self._calls: list[tuple[tuple, dict, Any]] = []
        self._recording = False
        self._handle: Any = None
        self._had_instance_step = False
        self._previous_step: Any = None

    @property
    def attached(self) -> bool:
        """Whether the hook and the wrapped ``training_step`` are in place."""
        return self._handle is not None

    def attach(self) -> None:
        """Register the forward hook and wrap ``training_step`` (idempotent)."""
        if self.attached:
            return
        self._handle = self.target.register_forward_hook(self._record, with_kwargs=True)
        self._had_instance_step = "training_step" in vars(self.module)
        self._previous_step = self.module.training_step  # bound method (or an earlier instance wrapper)
        self.module.training_step = self._training_step

    def detach(self) -> None:
        """Remove the hook and restore the original ``training_step`` (idempotent)."""
        if not self.attached:
            return
        self._handle.remove()
        self._handle = None
        if self._had_instance_step:
            self.module.training_step = self._previous_step
        else:
            vars(self.module).pop("training_step", None)
        self._calls.clear()

    def _record(self, _module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        if self._recording:
            self._calls.append((args, kwargs, output))

    def _training_step(self, *args: Any, **kwargs: Any) -> Any:
        self._calls.clear()
        self._recording = True
        try:
            out = self._previous_step(*args, **kwargs)
        finally:
            self._recording = False
        loss = out.get("loss") if isinstance(out, Mapping) else out
        if not isinstance(loss, torch.Tensor) or not self._calls:
            # The user skipped this batch (returned None) or never called the target.
            self._calls.clear()
            return out
        kd = self._kd_term()
        total = loss + self.config.alpha * kd
        if self.log_name is not None:
            self.module.log(self.log_name, kd.detach(), on_step=True, on_epoch=True)
        if isinstance(out, Mapping):
            return {**out, "loss": total}
        return total

    def _kd_term(self) -> torch.Tensor:
        terms = []
        with torch.no_grad():
            teacher_outs = [self._teacher_forward(args, kwargs, student) for args, kwargs, student in self._calls]
        for (_args, _kwargs, student), teacher_out in zip(self._calls, teacher_outs):
            terms.append(self.config.loss(student, teacher_out))
        self._calls.clear()
        return torch.stack([t.reshape(()) for t in terms]).mean()

    def _teacher_forward(self, args: tuple, kwargs: dict, student: Any) -> Any:
        device = _first_tensor_device(student)
        if device is not None and _module_device(self.teacher) != device:
            self.teacher.to(device)  # follow the student (e.g. to the GPU after strategy setup)
        args = pytree.tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, args)
        kwargs = pytree.tree_map(lambda a: a.detach() if isinstance(a, torch.Tensor) else a, kwargs)
        return self.teacher(*args, **kwargs)


def _first_tensor_device(value: Any) -> torch.device | None:
    for leaf in pytree.tree_leaves(value):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return None


def _module_device(module: nn.Module) -> torch.device | None:
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return None
