"""Evaluating a checkpoint of a compressed fit (``trainer.validate/test/predict(ckpt_path=...)``).

The checkpoint holds the pruned (or merged) network's weights. Just before Lightning's strict
weight load the module gets the checkpoint's architecture; once the weights are in, the pruned
network is replaced by its merged, deployable form, which is what gets evaluated.
"""

from __future__ import annotations

from collections.abc import Mapping

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import nn

from ..surgery.adapters import unwrap_compressed, wrap_compressed
from ..surgery.meta import SurgeryMeta, example_from_spec
from .paths import get_path, set_path
from .resume import is_compressed, rebuild_pruned, state_from_checkpoint
from .target import like_memory_format, merge_checked

__all__ = ["merge_for_evaluation", "rebuild_for_evaluation"]


def rebuild_for_evaluation(pl_module: pl.LightningModule, checkpoint: Mapping,
                           original: nn.Module | None) -> str | None:
    """Give ``pl_module`` the checkpoint's architecture (from ``original`` if kept, else from the
    module's own uncompressed target).

    Returns:
        The path of the compressed target to merge once the weights are loaded; ``None`` if the
        checkpoint holds no LayerMerge plan.

    Raises:
        ValueError: The target is compressed already and there is no original to rebuild from
            (:func:`rebuild_pruned`'s message names the calls that work).
    """
    state = state_from_checkpoint(checkpoint)
    if state is None:
        return None
    current = get_path(pl_module, state["target"])
    if rebuild_pruned(pl_module, checkpoint, original=original) or is_compressed(current):
        return state["target"]
    return None


def merge_for_evaluation(pl_module: pl.LightningModule, path: str, original: nn.Module | None) -> None:
    """Replace the loaded, pruned network at ``path`` by its merged form (kept pruned, with a
    warning, if merging does not reproduce it); a merged network is left as it is."""
    net = unwrap_compressed(get_path(pl_module, path))
    record = SurgeryMeta.of(net)
    if record.merged:
        return
    training = net.training
    final, merged, _ = merge_checked(net, example_from_spec(record.inputs))
    final = like_memory_format(final.to(pl_module.device), net).train(training) if merged else net
    set_path(pl_module, path, final if original is None else wrap_compressed(original, final))
    rank_zero_info(f"LayerMerge: evaluating the checkpoint's compressed '{path}' "
                   f"({'merged' if merged else 'pruned, not merged'})")
