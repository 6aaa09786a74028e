"""Validation of ``LayerMergeCallback``'s constructor arguments and trainer: each error names the
argument, what was wrong and what to pass instead (raised before any training)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lightning.pytorch.utilities.rank_zero import rank_zero_warn

from ..planning.validate import is_real

__all__ = ["LOW_BUDGET", "check_budget", "check_cache_dir", "check_choice", "check_module", "check_monitor",
           "check_plan", "check_target", "check_trainer", "check_type", "warn_unusual"]


def check_budget(budget: Any) -> float:
    """``budget`` as a float in (0, 1]; ``TypeError``/``ValueError`` otherwise."""
    if not is_real(budget):
        raise TypeError(f"LayerMergeCallback(budget=...) must be a number in (0, 1], got {budget!r}")
    if not 0 < budget <= 1:
        raise ValueError(
            f"LayerMergeCallback(budget={budget}) must be in (0, 1]: the target latency as a fraction of the "
            "original network's (e.g. 0.6 for a 1.67x speed-up)"
        )
    return float(budget)


def check_target(target: Any) -> str | None:
    """``target``: ``None`` or a dotted attribute path."""
    if target is not None and (not isinstance(target, str) or not target or target.startswith(".")):
        raise ValueError(f"LayerMergeCallback(target=...) must be an attribute path such as 'model', got {target!r}")
    return target


def check_monitor(monitor: Any) -> str | None:
    """``monitor``: ``None`` or a non-empty metric name."""
    if monitor is not None and (not isinstance(monitor, str) or not monitor):
        raise ValueError(f"LayerMergeCallback(monitor=...) must be a metric name or None, got {monitor!r}")
    return monitor


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    """``value`` if it is one of ``choices``; the error lists them."""
    if value not in choices:
        raise ValueError(f"LayerMergeCallback({name}={value!r}) must be one of {', '.join(map(repr, choices))}")
    return value


def check_type(name: str, value: Any, cls: type) -> Any:
    """``value`` if it is ``None`` or an instance of ``cls``."""
    if value is not None and not isinstance(value, cls):
        raise TypeError(f"LayerMergeCallback({name}=...) must be a {cls.__name__} or None, got {type(value).__name__}")
    return value


def check_cache_dir(cache_dir: Any) -> str | bool | None:
    """``cache_dir``: a directory path, ``None`` (default location; ``True`` means the same) or ``False``."""
    if cache_dir is True:
        return None
    if cache_dir is not None and cache_dir is not False and not isinstance(cache_dir, (str, os.PathLike)):
        raise TypeError(f"LayerMergeCallback(cache_dir=...) must be a path, None or False, got {cache_dir!r}")
    if isinstance(cache_dir, (str, os.PathLike)) and Path(cache_dir).is_file():
        raise ValueError(f"LayerMergeCallback(cache_dir={str(cache_dir)!r}) is a file; pass a directory")
    return cache_dir


def check_plan(plan: Any) -> dict | str | None:
    """``plan``: ``None``, a plan/state dict, or the path of an existing checkpoint file."""
    if plan is None:
        return None
    if isinstance(plan, Mapping):
        inner = plan.get("plan", plan)
        if not isinstance(inner, Mapping) or "segments" not in inner or "fingerprint" not in inner:
            raise ValueError("LayerMergeCallback(plan=...) dict must come from callback.state_dict(), a checkpoint's "
                             "'layermerge' entry or Plan.to_dict()")
        return dict(plan)
    if isinstance(plan, (str, os.PathLike)):
        if not Path(plan).is_file():
            raise ValueError(f"LayerMergeCallback(plan={str(plan)!r}): no such checkpoint file")
        return str(plan)
    raise TypeError(f"LayerMergeCallback(plan=...) must be a dict, a checkpoint path or None, got {type(plan).__name__}")


def check_trainer(trainer: Any, callback: Any) -> None:
    """Refuse trainers ``callback`` cannot work in: a spawn-based strategy, or a second callback of its type.

    Raises:
        ValueError: Naming the strategy to use, or that one target is compressed per fit.
    """
    from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher  # only the callback needs Lightning

    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        raise ValueError(
            "LayerMergeCallback cannot run with a spawn-based strategy (e.g. strategy='ddp_spawn'): the worker "
            "processes rewrite the architecture, and the main process cannot load their weights into its "
            "uncompressed model. Use strategy='ddp' (run as a script) instead"
        )
    others = [cb for cb in trainer.callbacks if isinstance(cb, type(callback)) and cb is not callback]
    if others:
        raise ValueError("only one LayerMergeCallback per Trainer is supported; compress one target per fit")


#: Budgets under this fraction warn: few networks keep their accuracy at such a speed-up.
LOW_BUDGET = 0.2


def warn_unusual(budget: float, monitor: str | None, mode: str) -> None:
    """Warn about legal but probably unintended settings (an accuracy minimised, a tiny budget)."""
    if monitor is not None and "acc" in monitor.lower() and mode == "min":
        rank_zero_warn(f"LayerMergeCallback(monitor={monitor!r}, mode='min'): is a lower value really "
                       "better? Pass mode='max' for accuracies.")
    if budget < LOW_BUDGET:
        rank_zero_warn(f"LayerMergeCallback(budget={budget}): a network {1 / budget:.1f}x faster keeps "
                       "only a few layers and rarely recovers its accuracy; budgets of 0.3 or more are typical")


def check_module(pl_module: Any, distill: Any) -> None:
    """Errors about the LightningModule that are known before any work."""
    if distill is not None and not pl_module.automatic_optimization:
        raise ValueError("LayerMergeCallback(distill=...) needs automatic optimization: with manual "
                         "optimization the loss cannot be extended. Drop distill, or add a KD term to your "
                         "training_step yourself (from a frozen copy of the original network)")
