"""Announce the applied plan: one line on the console, metrics and hyper-parameters to the loggers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info

from ..surgery.plan import Plan
from .state import CompressionState

__all__ = ["log_plan"]


def log_plan(pl_module: pl.LightningModule, plan: Plan, state: CompressionState, *, target: str, budget: float,
             method: str, calibration: Sequence[dict[str, Any]], resumed_from: str | None, verbose: bool) -> None:
    """Print the plan (with ``verbose``) and log kept convs/activations and the predicted ratio.

    Args:
        pl_module: Its loggers receive the metrics (step 0) and the plan as hyper-parameters.
        plan / state: The plan applied and its state (predicted and table latency).
        target: Attribute path of the compressed submodule.
        budget / method: The callback's settings.
        calibration: The calibration rounds (predicted vs measured ratio), printed.
        resumed_from: The checkpoint the plan came from, if any.
        verbose: Print the line.
    """
    ratio = state.predicted_ms / state.table_original_ms if state.predicted_ms else None
    if verbose:
        pred = f", predicted latency {ratio:.3f}x of the original ({1 / ratio:.2f}x faster)" if ratio else ""
        rounds = "; ".join(f"predicted {c['predicted']:.3f} measured {c['measured']:.3f}" for c in calibration)
        origin = f" (from checkpoint {resumed_from})" if resumed_from else ""
        rank_zero_info(f"LayerMerge: {plan} on '{target}'{pred}{origin}"
                       + (f"\n  calibration (candidate vs original, side by side): {rounds}" if rounds else ""))
    metrics = {"layermerge/kept_convs": float(len(plan.kept_convs)),
               "layermerge/kept_activations": float(len(plan.kept_activations))}
    if ratio:
        metrics.update({"layermerge/predicted_ratio": ratio, "layermerge/predicted_speedup": 1 / ratio})
    for logger in pl_module.loggers:
        logger.log_metrics(metrics, step=0)
        logger.log_hyperparams({"layermerge": {"target": target, "budget": budget, "method": method,
                                               "segments": str(plan.keys)}})
