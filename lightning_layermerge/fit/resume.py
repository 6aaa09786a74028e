"""Checkpoints of compressed fits: the plan state, resuming, and rebuilding the architecture.

A checkpoint written during a ``LayerMergeCallback`` fit holds the *pruned* network's
weights, which only load into the pruned architecture. The callback therefore stores its
state (plan, target path, example-input shapes, ...) twice: under
``checkpoint["callbacks"]["LayerMergeCallback"]`` (Lightning's callback state) and at the
top level under ``checkpoint["layermerge"]`` (for ``load_from_checkpoint`` users). With
distillation on it also stores the teacher (the original target's weights) under
``checkpoint["layermerge_teacher"]``, so a run resumed with a freshly built module distils
from the right network.

Lightning restores a callback's state only *after* the strict weight load, but calls the
module's ``on_load_checkpoint`` just *before* it (Lightning 2.x ``_CheckpointConnector``:
``restore_model`` runs the hook, then ``load_model_state_dict``; ``restore_callbacks`` comes
after). :class:`LoadCheckpointPatch` wraps that hook as an instance attribute for the
duration of the restore, so the callback can rebuild the checkpoint's architecture in time;
users of ``Module.load_from_checkpoint`` get the same by calling :func:`rebuild_pruned` in
their own ``on_load_checkpoint``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
from torch import fx, nn

from ..planning.tables.importance import weights_fingerprint
from ..surgery.adapters import unwrap_compressed
from ..surgery.graph import Chain
from ..surgery.merge import merge
from ..surgery.meta import SurgeryMeta, example_from_spec
from ..surgery.plan import Plan
from ..surgery.rebuild import rebuild_compressed
from ..surgery.serialization import read_checkpoint as read_checkpoint_file
from .state import CompressionState
from .distill import frozen_teacher
from .paths import get_path, set_path

__all__ = ["CHECKPOINT_KEY", "STATE_KEY", "TEACHER_KEY", "LoadCheckpointPatch", "fit_checkpoint_path",
           "fit_weights_only", "plan_for_target", "read_checkpoint", "rebuild_pruned", "restore_pruned",
           "state_from_checkpoint", "state_of_plan_argument", "teacher_for_resume"]

#: Top-level checkpoint key of the plan state.
CHECKPOINT_KEY = "layermerge"
#: Top-level checkpoint key of the teacher's (original target's) state dict, written when distilling.
TEACHER_KEY = "layermerge_teacher"
#: Why a fit cannot resume from an uncompressed checkpoint, and what to do instead.
NOT_COMPRESSED = (
    "LayerMergeCallback: the checkpoint being resumed holds no LayerMerge plan (it is an uncompressed model). Load "
    "its weights into the module before fit (e.g. Module.load_from_checkpoint) and call fit without ckpt_path"
)
#: ``LayerMergeCallback.state_key``: where Lightning keeps the callback state in checkpoints.
STATE_KEY = "LayerMergeCallback"

Checkpoint = str | os.PathLike | Mapping


def read_checkpoint(checkpoint: Checkpoint, *, trusted: bool = False) -> Mapping:
    """A checkpoint dict (``checkpoint`` itself if it is already loaded), on the CPU.

    A path is read with ``torch.load(weights_only=True)``: no code from the file runs. Only
    with ``trusted=True`` may it hold arbitrary objects (their unpickling runs code).

    Raises:
        ValueError: the file holds objects other than tensors and plain data (named in the
            message) and ``trusted`` is false.
    """
    if isinstance(checkpoint, Mapping):
        return checkpoint
    return read_checkpoint_file(checkpoint, trusted=trusted)


def state_from_checkpoint(checkpoint: Checkpoint, *, trusted: bool = False) -> dict | None:
    """The LayerMerge state of a checkpoint (path or loaded dict); ``None`` if it has none.

    A path is read with ``weights_only=True`` unless ``trusted`` (see :func:`read_checkpoint`).
    """
    checkpoint = read_checkpoint(checkpoint, trusted=trusted)
    state = checkpoint.get(CHECKPOINT_KEY) or checkpoint.get("callbacks", {}).get(STATE_KEY)
    return dict(state) if state else None


def fit_checkpoint_path(trainer: pl.Trainer) -> str | None:
    """The ``ckpt_path`` the running ``trainer.fit``/``validate``/``test``/``predict`` restores from.

    Lightning resolves ``ckpt_path`` ("last", "best", a path) before the ``setup`` hooks but
    only publishes it (``trainer.ckpt_path``) after them, when the checkpoint is restored.
    The callback needs it in ``setup`` to skip planning on resume, so it reads the resolved
    value from the trainer's ``_run`` frame. ``None`` if there is none or the frame is not
    found (another Lightning version): the restore hook still applies the checkpoint's plan.
    """
    if trainer.ckpt_path:
        return str(trainer.ckpt_path)
    path = _run_locals(trainer).get("ckpt_path")
    return str(path) if path else None


def fit_weights_only(trainer: pl.Trainer) -> bool | None:
    """The ``weights_only`` the running ``trainer.fit``/``test``/... was given (``None``: Lightning's
    default, or not found). ``False`` means the user trusts the checkpoint file."""
    return _run_locals(trainer).get("weights_only")


def _run_locals(trainer: pl.Trainer) -> dict[str, Any]:
    """The locals of ``trainer._run`` on the current call stack (empty if it is not there)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_run" and frame.f_locals.get("self") is trainer:
            return dict(frame.f_locals)
        frame = frame.f_back
    return {}


class LoadCheckpointPatch:
    """Runs ``before(checkpoint)`` ahead of a module's own ``on_load_checkpoint``, until removed.

    Args:
        module: The LightningModule.
        before: Called with the loaded checkpoint dict before the strict weight load.
    """

    def __init__(self, module: pl.LightningModule, before: Callable[[dict[str, Any]], None]) -> None:
        self.module = module
        self.had_instance_hook = "on_load_checkpoint" in vars(module)
        self.previous = module.on_load_checkpoint

        def on_load_checkpoint(checkpoint: dict[str, Any]) -> None:
            before(checkpoint)
            self.previous(checkpoint)

        module.on_load_checkpoint = on_load_checkpoint

    def remove(self) -> None:
        """Restore the module's own hook (idempotent)."""
        if self.module is None:
            return
        if self.had_instance_hook:
            self.module.on_load_checkpoint = self.previous
        else:
            vars(self.module).pop("on_load_checkpoint", None)
        self.module = None


def is_compressed(module: nn.Module) -> bool:
    """Whether ``module`` was made by ``prune`` (and possibly ``merge``), or wraps such a network."""
    return SurgeryMeta.present(unwrap_compressed(module))


def compressed_architecture(original: nn.Module, state: CompressionState) -> fx.GraphModule:
    """The network a checkpoint's weights belong to, built from the original architecture.

    Args:
        original: The uncompressed target (any weights; it is not modified).
        state: The checkpoint's LayerMerge state.

    Returns:
        ``prune(original, plan)``, merged as well if the state says the weights are merged.
    """
    return rebuild_compressed(original, state.plan, example_from_spec(state.inputs or []), merged=state.merged)


def rebuild_pruned(pl_module: pl.LightningModule, checkpoint: Checkpoint, original: nn.Module | None = None, *,
                   trusted: bool = False) -> bool:
    """Give ``pl_module`` the architecture of a LayerMerge checkpoint, without loading weights.

    Call it from your LightningModule's ``on_load_checkpoint`` to make
    ``MyModule.load_from_checkpoint(path)`` work on checkpoints written during a
    ``LayerMergeCallback`` fit (Lightning calls that hook just before its strict weight load)::

        def on_load_checkpoint(self, checkpoint):
            rebuild_pruned(self, checkpoint)

    It does nothing for checkpoints without a LayerMerge plan, or when the module's target
    already has the checkpoint's architecture (compressed with the same plan, merged or not
    alike). Parameter names do not decide it: a plan that keeps every conv and removes only
    activations has the original's parameter names, but not its function.

    Args:
        pl_module: The module; its target must still be the original (uncompressed)
            architecture unless ``original`` is given.
        checkpoint: A checkpoint path or loaded dict.
        original: The uncompressed target to prune from (default: the module's own).
        trusted: Read a checkpoint path with ``weights_only=False`` (see :func:`read_checkpoint`).

    Returns:
        Whether the architecture was replaced.

    Raises:
        ValueError: The module's target is already compressed differently and no
            ``original`` is given.
    """
    checkpoint = read_checkpoint(checkpoint, trusted=trusted)
    stored = state_from_checkpoint(checkpoint)
    if not stored:
        return False
    state = CompressionState.from_dict(stored)
    path = state.target
    current = get_path(pl_module, path)
    if _has_architecture(current, state):
        return False
    if original is None:
        if is_compressed(current):
            raise ValueError(
                f"the module's '{path}' is already compressed with another plan, so the checkpoint's architecture "
                "cannot be rebuilt from it. Build a fresh module (original architecture) and load the checkpoint "
                "into it: trainer.test(MyModule(...), ckpt_path=...) with LayerMergeCallback in the Trainer, "
                "MyModule.load_from_checkpoint(path) with rebuild_pruned in on_load_checkpoint, or "
                "restore_pruned(MyModule(...), path, merged=True)"
            )
        original = current
    set_path(pl_module, path, compressed_architecture(original, state))
    return True


def _has_architecture(target: nn.Module, state: CompressionState) -> bool:
    """Whether ``target`` is already the network the checkpoint's weights belong to."""
    target = unwrap_compressed(target)
    if not is_compressed(target):
        return False
    meta = SurgeryMeta.of(target)
    same_plan = [list(seg) for seg in meta.plan["segments"]] == [list(seg) for seg in state.plan["segments"]]
    return same_plan and meta.merged == bool(state.merged)


def restore_pruned(pl_module: pl.LightningModule, checkpoint: Checkpoint, *, strict: bool = True,
                   merged: bool = False, trusted: bool = False) -> pl.LightningModule:
    """Rebuild the architecture of a checkpoint written by a LayerMergeCallback fit and load it.

    ``Module.load_from_checkpoint`` builds the *original* architecture and fails on the
    pruned weights (unless the module calls :func:`rebuild_pruned` in ``on_load_checkpoint``);
    instead build the module as usual (any weights) and call this.

    Args:
        pl_module: A freshly constructed module (original architecture).
        checkpoint: A checkpoint path or an already loaded checkpoint dict.
        strict: Passed to ``load_state_dict``.
        merged: Also merge the loaded network (the deployable, faster form; eval mode).
        trusted: Read a checkpoint path with ``weights_only=False``, which runs code from the
            file; needed only for checkpoints holding custom objects (e.g. in
            ``hyper_parameters``). Default: ``weights_only=True``, no code from the file runs.

    Returns:
        ``pl_module``, with its target as in the checkpoint and the weights loaded: the
        fine-tuned, not yet merged network unless ``merged=True``.

    Raises:
        ValueError: The checkpoint was not written during a LayerMergeCallback fit, or holds
            objects other than tensors and plain data and ``trusted`` is false.
    """
    checkpoint = read_checkpoint(checkpoint, trusted=trusted)
    stored = state_from_checkpoint(checkpoint)
    if not stored:
        raise ValueError("the checkpoint holds no LayerMerge plan; it was not written during a LayerMergeCallback fit")
    state = CompressionState.from_dict(stored)
    rebuild_pruned(pl_module, checkpoint)
    pl_module.load_state_dict(checkpoint["state_dict"], strict=strict)
    if merged:
        target = get_path(pl_module, state.target)
        if not SurgeryMeta.of(target).merged:
            set_path(pl_module, state.target, merge(target.eval()))
    return pl_module


def state_of_plan_argument(source: Mapping | str | os.PathLike) -> CompressionState:
    """The state ``LayerMergeCallback(plan=...)`` names: a state dict, a bare ``Plan.to_dict()``, or a
    checkpoint path.

    Raises:
        ValueError: The checkpoint holds no LayerMerge plan.
    """
    if isinstance(source, Mapping):
        return CompressionState.from_dict(source if "plan" in source else {"plan": dict(source)})
    state = state_from_checkpoint(source)
    if not state:
        raise ValueError(f"LayerMergeCallback(plan={source!r}): the checkpoint holds no LayerMerge plan; it was "
                         "not written during a LayerMergeCallback fit")
    return CompressionState.from_dict(state)


def plan_for_target(chain: Chain, state: CompressionState, path: str) -> Plan:
    """The state's plan on ``chain``, checking it was made for the target at ``path``.

    Raises:
        ValueError: The plan was made for another target, or does not fit ``chain``.
    """
    if state.target is not None and state.target != path:
        raise ValueError(f"LayerMergeCallback(plan=...): the plan was made for target '{state.target}', not "
                         f"'{path}'; pass target={state.target!r}")
    return Plan.from_dict(chain, state.plan)


def teacher_for_resume(checkpoint: Mapping, state: CompressionState, target: nn.Module, path: str) -> nn.Module:
    """The original network to distil from on resume: stored in the checkpoint, or the module's own
    target if its weights are the ones the plan was made from.

    Raises:
        ValueError: The original weights cannot be recovered.
    """
    teacher = frozen_teacher(target)
    stored = checkpoint.get(TEACHER_KEY)
    if stored is not None:
        teacher.load_state_dict(stored)
        return teacher
    if state.original_weights == weights_fingerprint(target):
        return teacher
    raise ValueError(
        f"LayerMergeCallback(distill=...): the checkpoint being resumed holds no teacher weights (it was written "
        f"without distill=), and the module's '{path}' does not hold the original weights the plan was made "
        f"from, so there is no network to distil from. Load the original weights into module.{path} before "
        "fit, or resume without distill"
    )
