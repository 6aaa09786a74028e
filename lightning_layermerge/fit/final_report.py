"""The report at the end of a compressed fit: built from the plan state, the merged network timed
side by side with the BN-folded original, then published to the trainer's loggers and as files.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from ..planning.report import LayerMergeReport, count_parameters, settings_dict
from ..planning.side_by_side import side_by_side
from ..planning.tables.latency import LatencySettings, LatencyTable, batched_example
from ..surgery.graph import Chain
from ..surgery.plan import Plan
from ..surgery.rebuild import fold_batchnorm
from .state import CompressionState

__all__ = ["build_report", "measure_report", "publish_report", "report_timing", "score_after"]


def build_report(*, budget: float, method: str, target: str, chain: Chain, plan: Plan, state: CompressionState,
                 mode: str, original: nn.Module, final: nn.Module, merged: bool, error: float,
                 settings: LatencySettings, precision: str) -> LayerMergeReport:
    """The report of one compressed fit, before anything is measured on the final network.

    Args:
        budget / method / mode: The callback's settings.
        target: Attribute path of the compressed submodule.
        chain / plan: The traced chain and the plan applied.
        state: The plan state (table facts, metric before, calibration).
        original / final: The user's original target and the compressed network.
        merged / error: Whether merging succeeded, and the merged-vs-pruned error.
        settings: The latency settings the table was measured with (:func:`report_timing`).
        precision: The trainer's precision.
    """
    return LayerMergeReport(
        budget=budget, method=method, target=target, num_layers=chain.num_layers,
        layer_names=[l.name for l in chain.layers], segments=plan.keys,
        kept_activations=sorted(plan.kept_activations), kept_convs=sorted(plan.kept_convs),
        irreducible=sorted(chain.irreducible), latency_settings={**settings_dict(settings), "precision": precision},
        table_original_ms=state.table_original_ms, predicted_ms=state.predicted_ms,
        params_before=count_parameters(original), params_after=count_parameters(final),
        monitor=state.monitor, mode=state.mode or mode, metric_before=state.metric_before,
        merged=merged, merge_max_error=error, calibration=list(state.calibration),
        importance=dict(state.importance or {}), table_build_s=state.table_build_s,
        table_max_spread=state.table_max_spread, table_unreliable=state.table_unreliable,
        load_note=state.load_note,
    )


def report_timing(table: LatencyTable | None, state: CompressionState | None,
                  requested: LatencySettings) -> LatencySettings:
    """The settings the table was really measured with (a busy machine can move them to the
    robust ones), from this run's table or the resumed checkpoint's state; else ``requested``."""
    if table is not None:
        return table.settings
    saved = state.latency_settings if state is not None else None
    if saved:
        try:
            return LatencySettings(**saved)
        except (TypeError, ValueError):  # written by another version: time as requested
            pass
    return requested


def measure_report(report: LayerMergeReport, original: nn.Module, chain: Chain, final: nn.Module,
                   settings: LatencySettings, *, verbose: bool) -> None:
    """Time ``final`` against the BN-folded ``original`` side by side and record it in ``report``."""
    if verbose:
        rank_zero_info(f"LayerMerge: timing the compressed network against the original (BatchNorm folded), "
                       f"interleaved, {settings.warmup} + {settings.repeats} passes each ...")
    start = time.perf_counter()
    folded = fold_batchnorm(original, chain, share=True)
    inputs = batched_example(chain, settings.batch_size)
    timed = side_by_side({"original": folded, "compressed": final}, inputs, settings)
    report.measured_original_ms, report.measured_ms = timed.ms["original"], timed.ms["compressed"]
    spread = timed.spread["compressed"]
    report.measured_spread = spread if math.isfinite(spread) else None
    report.load_note = "; ".join(n for n in (report.load_note, timed.load_note) if n)
    report.latency_settings = {**settings_dict(timed.settings), "precision": report.latency_settings.get("precision")}
    if verbose:
        rank_zero_info(f"LayerMerge: timed in {time.perf_counter() - start:.1f} s")


def publish_report(trainer: pl.Trainer, report: LayerMergeReport, *, verbose: bool) -> None:
    """Log the report's metrics to every logger; write it as JSON and PNG in the log directory (rank 0)."""
    for logger in trainer.loggers:
        logger.log_metrics(report.metrics(), step=trainer.global_step)
    log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank calls it
    if not trainer.is_global_zero:
        return
    report.to_json(log_dir / "layermerge_report.json")
    report.plot(log_dir / "layermerge_report.png")
    if verbose:
        rank_zero_info(f"{report}\n  files: {log_dir / 'layermerge_report.png'}, {log_dir / 'layermerge_report.json'}")


def score_after(make_runner: Callable[[], Any], planning: Any, report: LayerMergeReport, original: nn.Module,
                final: nn.Module, *, monitor: str | None, mode: str) -> None:
    """The monitored metric after compression (and before, if not known), on the same held-out subset.

    Args:
        make_runner: Returns the sub-run helper that scores networks (the planning one, or a new one).
        planning: The callback's planning result; its ``monitor`` is resolved here when unknown.
        report: Receives ``metric_before`` / ``metric_after`` (and the monitor's key and mode).
        original / final: The user's original target and the compressed network.
        monitor / mode: The callback's settings.

    A network that cannot be scored (e.g. no map-style train loader) leaves the report without
    the metric, with a warning.
    """
    try:
        runner = make_runner()
        if planning.monitor is None or report.metric_before is None:
            planning.monitor, report.metric_before = runner.resolve_monitor(original, monitor, mode)
            report.monitor, report.mode = planning.monitor.key, planning.monitor.mode
        runner.monitor = planning.monitor
        metrics = runner.metrics(copy.deepcopy(final), training_loss=planning.monitor.training_loss)
        report.metric_after = metrics.get(planning.monitor.key)
    except (TypeError, ValueError) as err:
        rank_zero_warn(f"LayerMergeCallback: could not score the compressed network: {err}")
