"""Checkpoints of compressed fits: the plan state, resuming, and ``restore_pruned``.

A checkpoint written during a ``LayerMergeCallback`` fit holds the *pruned* network's
weights, which only load into the pruned architecture. The callback therefore stores its
state (plan, target path, example-input shapes, ...) twice: under
``checkpoint["callbacks"]["LayerMergeCallback"]`` (Lightning's callback state) and at the
top level under ``checkpoint["layermerge"]`` (for ``load_from_checkpoint`` users).

Lightning restores a callback's state only *after* the strict weight load, but calls the
module's ``on_load_checkpoint`` just *before* it (Lightning 2.x ``_CheckpointConnector``:
``restore_model`` runs the hook, then ``load_model_state_dict``; ``restore_callbacks`` comes
after). :class:`LoadCheckpointPatch` wraps that hook as an instance attribute for the
duration of the restore, so the callback can rebuild the checkpoint's architecture in time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch

from .graph import trace
from .plan import Plan
from .prune import prune
from .serialization import attach_input_spec, example_from_spec
from .subruns import get_path, set_path

__all__ = ["CHECKPOINT_KEY", "STATE_KEY", "LoadCheckpointPatch", "restore_pruned", "state_from_checkpoint"]

#: Top-level checkpoint key of the plan state.
CHECKPOINT_KEY = "layermerge"
#: ``LayerMergeCallback.state_key``: where Lightning keeps the callback state in checkpoints.
STATE_KEY = "LayerMergeCallback"


def state_from_checkpoint(checkpoint: str | os.PathLike | Mapping) -> dict | None:
    """The LayerMerge state of a checkpoint (path or loaded dict); ``None`` if it has none."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = checkpoint.get(CHECKPOINT_KEY) or checkpoint.get("callbacks", {}).get(STATE_KEY)
    return dict(state) if state else None


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


def restore_pruned(pl_module: pl.LightningModule, checkpoint: str | os.PathLike | Mapping, *,
                   strict: bool = True) -> pl.LightningModule:
    """Rebuild the pruned architecture of a checkpoint written by a LayerMergeCallback fit and load it.

    ``Module.load_from_checkpoint`` builds the *original* architecture and fails on the
    pruned weights; instead build the module as usual (any weights) and call this.

    Args:
        pl_module: A freshly constructed module (original architecture).
        checkpoint: A checkpoint path or an already loaded checkpoint dict.
        strict: Passed to ``load_state_dict``.

    Returns:
        ``pl_module``, with its target pruned as in the checkpoint and the weights loaded
        (the fine-tuned, not yet merged network; call ``merge`` on the target for inference).

    Raises:
        ValueError: The checkpoint was not written during a LayerMergeCallback fit.
    """
    if not isinstance(checkpoint, Mapping):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=False)
    state = state_from_checkpoint(checkpoint)
    if not state:
        raise ValueError("the checkpoint holds no LayerMerge plan; it was not written during a LayerMergeCallback fit")
    path = state["target"]
    original = get_path(pl_module, path)
    example = example_from_spec(state["inputs"])
    chain = trace(original, example)
    pruned = prune(original, chain, Plan.from_dict(chain, state["plan"]))
    attach_input_spec(pruned, example)
    set_path(pl_module, path, pruned)
    pl_module.load_state_dict(checkpoint["state_dict"], strict=strict)
    return pl_module
