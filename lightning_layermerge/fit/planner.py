"""The setup-time planning pipeline of ``LayerMergeCallback`` (Lightning glue, DDP-aware).

Perf metric and a one-step check of the module's own training code -> latency table (rank
0, broadcast) -> budget check (with the DP's rounding) -> importance table (sharded over
ranks, gathered) -> solve -> calibration against a side-by-side measurement. Everything that
can fail because of user input fails before the importance table, and everything that does
not need the latency table fails before it. Every rank makes the same collective calls in the
same order, so DDP never hangs and every rank ends with the identical plan.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ..planning.calibrate import calibrate
from ..planning.chain_solve import RESOLUTIONS, reachable_floor_ms, resolution_for, smallest_budget, solve_chain
from ..planning.objective import dp_values, protocol_offset, trivial_keys
from ..planning.plan_cache import plan_cache_path, read_cached_plan, write_cached_plan
from ..planning.side_by_side import side_by_side
from ..planning.tables.cache import TableCache, fingerprint
from ..planning.tables.importance import build_importance_table, combine_shards, weights_fingerprint
from ..planning.tables.latency import LatencySettings, LatencyTable, batched_example, build_latency_table
from ..planning.tables.noise import NoiseLevel, noise_level, pick_noise_entries, warn_if_noisy
from ..surgery.graph import Chain
from ..surgery.merge import merge
from ..surgery.plan import Plan
from ..surgery.prune import prune
from ..surgery.rebuild import fold_batchnorm
from .importance_settings import ImportanceSettings, Monitor
from .state import CompressionState
from .subruns import SubRunner
from .subsets import check_loader

__all__ = ["Planner", "PlanningResult", "make_runner", "train_loader"]


@dataclass
class PlanningResult:
    """What one :meth:`Planner.run` found, filled in as it goes (a failed run shows how far it got).

    ``LayerMergeCallback`` holds this object itself (no copies), so its ``latency_table``,
    ``importance_table``, ``importance_shard`` and ``calibration`` are these fields.

    Attributes:
        latency_table, importance_table: The tables the plan was solved on.
        importance_shard: Keys of the importance entries this rank computed.
        calibration: One record per calibration round (predicted and measured ratio).
        monitor / base: The Perf metric and its value on the original network.
        importance_noise: Noise level, entry count, steps per entry and build time of the
            importance table (``tables.noise.NoiseLevel``).
        runner: The sub-run machinery (reused to score the final network).
    """

    latency_table: LatencyTable | None = None
    importance_table: dict[tuple[int, int, int], float] | None = None
    importance_shard: list[tuple[int, int, int]] = field(default_factory=list)
    calibration: list[dict[str, Any]] = field(default_factory=list)
    monitor: Monitor | None = None
    base: float | None = None
    runner: SubRunner | None = None
    importance_noise: NoiseLevel | None = None


class Planner:
    """Builds the tables and chooses the plan for one fit.

    Args:
        budget / method / monitor / mode: As in ``LayerMergeCallback``.
        importance / latency: The table settings.
        calibrate: Re-plan against side-by-side measurements (see :meth:`calibrate`).
        cache_dir: Table and plan cache directory (``None``: no cache).
        verbose: Progress bars (rank 0 only).

    Attributes:
        result: What :meth:`run` found (:class:`PlanningResult`), filled in as it goes.
        resolution: The DP resolution that reaches the budget (set by :meth:`budget_ms`).
        runner_type: The sub-run class (a subclass can observe or replace the fine-tunes).
    """

    runner_type: type[SubRunner] = SubRunner

    def __init__(self, *, budget: float, method: str, monitor: str | None, mode: str,
                 importance: ImportanceSettings, latency: LatencySettings, calibrate: bool,
                 cache_dir: str | None, verbose: bool) -> None:
        self.budget, self.method, self.monitor_name, self.mode = budget, method, monitor, mode
        self.importance_settings, self.latency_settings = importance, latency
        self.calibrate_plans, self.cache_dir, self.verbose = calibrate, cache_dir, verbose
        self.result = PlanningResult()
        self.last_spread: float | None = None  # spread of the latest calibration measurement
        self.resolution = RESOLUTIONS[0]
        self._importance_key: dict[str, Any] = {}

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: str, target: nn.Module,
            chain: Chain) -> tuple[Plan, CompressionState]:
        """The plan for ``target``, and the compression state (what checkpoints and the report need)."""
        # User errors first (metric, the module's own training code), then the tables.
        result = self.result
        result.runner = make_runner(trainer, pl_module, path, self.importance_settings, self.runner_type)
        result.monitor, result.base = result.runner.resolve_monitor(target, self.monitor_name, self.mode)
        result.runner.check_finetune(target)
        table = result.latency_table = self.build_latency_table(trainer, target, chain)
        budget_ms = self.budget_ms(table, chain)
        importance = result.importance_table = self.build_importance_table(trainer, target, chain)
        trivial = trivial_keys(chain) if self.importance_settings.paired else ()
        values = dp_values(importance, self.importance_settings.objective, trivial=trivial)  # what the DP sums
        plan_file = self.plan_file(chain, table, values)
        plan = self.cached_plan(trainer, chain, plan_file)
        if plan is None:
            plan = Plan.from_segments(chain, self.solve(table, values, chain, budget_ms))
            if self.calibrate_plans:
                plan = self.calibrate(trainer, target, chain, plan, budget_ms, values)
            self.store_plan(trainer, plan_file, plan)
        plan = _same_on_all_ranks(trainer, plan)
        state = {"plan": plan.to_dict(), "predicted_ms": table.predicted_ms(plan.keys),
                 "table_original_ms": table.total_ms, "metric_before": result.base, "monitor": result.monitor.key,
                 "mode": result.monitor.mode, "training_loss": result.monitor.training_loss,
                 "calibration": result.calibration,
                 "importance": _importance_state(result.importance_noise, importance, trivial),
                 # How the table was really measured (a busy machine may have changed the settings),
                 # so a resumed run times its final report the same way without the table.
                 "latency_settings": asdict(table.settings), "table_build_s": table.build_s,
                 "table_max_spread": _finite(table.max_spread), "table_unreliable": len(table.unreliable),
                 "load_note": table.load_note}
        return plan, CompressionState.from_dict(state)

    # ------------------------------------------------------------------ tables

    def build_latency_table(self, trainer: pl.Trainer, target: nn.Module, chain: Chain) -> LatencyTable:
        """Measured on rank 0 only (one measurement, no CPU contention between ranks), then broadcast."""
        table = None
        if trainer.is_global_zero:
            table = build_latency_table(target, chain, self.latency_settings, cache_dir=self.cache_dir,
                                        progress=self.verbose)
        return trainer.strategy.broadcast(table, src=0) if trainer.world_size > 1 else table

    def budget_ms(self, table: LatencyTable, chain: Chain) -> float:
        """The table budget for the fraction, and the DP resolution that can reach it.

        Raises:
            ValueError: The budget is unreachable; the message names the smallest budget
                fraction that the DP can solve (rounding included), so following it works.
        """
        try:
            budget_ms = table.budget_for(self.budget)
        except ValueError as err:
            raise ValueError(f"LayerMergeCallback(budget={self.budget}): {err}") from None
        floor = reachable_floor_ms(table, chain, self.method)
        resolution = resolution_for(table, chain, budget_ms, self.method) if budget_ms >= floor else None
        if resolution is None:
            reachable = smallest_budget(table, chain, self.method)
            hint = " or use method='layermerge'" if self.method != "layermerge" else ""
            raise ValueError(
                f"LayerMergeCallback(budget={self.budget}) is below the smallest latency method "
                f"'{self.method}' can reach on this network: {reachable:.3f} of the original "
                f"({table.outside_ms + floor:.3f} of {table.total_ms:.3f} ms by the latency table). Raise budget to "
                f"at least {reachable:.3f}{hint}"
            )
        self.resolution = resolution
        return budget_ms

    def build_importance_table(self, trainer: pl.Trainer, target: nn.Module, chain: Chain) -> dict:
        """This rank's share of the entries, then gathered, so every rank holds the whole table."""
        runner, monitor, base_perf = self.result.runner, self.result.monitor, self.result.base
        key = {"weights": weights_fingerprint(target), "module": type(runner.shell).__qualname__,
               "monitor": monitor.key, "mode": monitor.mode, "data": len(runner.loader.dataset),
               "score_samples": runner.score_samples, "score_on_val": runner.subsets.on_val,
               "method_used": runner.method,
               **{k: v for k, v in vars(self.importance_settings).items()
                  if k not in ("objective", "paired")}}  # how the table is read, not what it holds
        self._importance_key = key
        score, base, scale = runner.score, monitor.perf(base_perf), 1.0
        if runner.method == "probe":  # entries are read on the probe's scale: the original through it too
            base = runner.null_perf(target, 0)
        if self.importance_settings.relative:
            if base == 0 or not math.isfinite(base):
                raise ValueError(f"ImportanceSettings(relative=True) needs a finite, non-zero {monitor.key} for the "
                                 f"original network, got {base_perf}; use relative=False")
            scale = abs(base)
            score, base = (lambda net: runner.score(net) / scale), base / scale
        started = time.perf_counter()
        shard = build_importance_table(target, chain, runner.finetune, score,
                                       shard=(trainer.global_rank, trainer.world_size), cache_dir=self.cache_dir,
                                       cache_key=key, base_score=base,
                                       progress=self.verbose and trainer.is_global_zero)
        self.result.importance_shard = sorted(shard)
        table = combine_shards(_all_gather(trainer, shard))
        if all(v == -math.inf for v in table.values()):
            err = runner.first_error
            raise RuntimeError(runner.failure_message(err) if err else "LayerMergeCallback: every importance run failed")
        self.result.importance_noise = self.measure_noise(trainer, target, chain, table, base, scale,
                                                   time.perf_counter() - started)
        return table

    def measure_noise(self, trainer: pl.Trainer, target: nn.Module, chain: Chain, table: dict, base: float,
                      scale: float, build_seconds: float) -> NoiseLevel:
        """The table's noise level (re-runs on rank 0, broadcast); warns if most entries are within
        it. ``base``/``scale``: Perf(original) and the divisor of a relative table;
        ``build_seconds``: this rank's table build time."""
        runs = self._noise_runs(target, chain, table, base, scale) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            runs = trainer.strategy.broadcast(runs, src=0)
        perfs, entry_perfs = runs
        runner = self.result.runner
        level = noise_level(table, perfs, entry_perfs=entry_perfs, steps_per_entry=runner.steps,
                            score_samples=runner.score_samples, build_seconds=build_seconds, method=runner.method)
        if trainer.is_global_zero:
            warn_if_noisy(level)
        return level

    def _noise_runs(self, target: nn.Module, chain: Chain, table: dict, base: float,
                    scale: float) -> tuple[list[float], dict]:
        """Perf of the unmodified network and of a few entries over the noise repeats, through
        the table cache (a repeated run re-trains nothing)."""
        repeats, runner = self.importance_settings.noise_repeats, self.result.runner
        cache = None
        if self.cache_dir is not None:
            key = {"table": "importance-noise", **self._importance_key}
            cache = TableCache(Path(self.cache_dir) / f"importance-noise-{fingerprint(key)[:12]}.json", key)

        def cached(entry: tuple[int, int, int], compute: Any) -> float:
            if cache is not None and entry in cache:
                return float(cache.get(entry))
            value = float(compute()) / scale
            if cache is not None:
                cache.put(entry, value)
            return value

        if repeats < 2:
            return [], {}
        perfs = [cached((-2, r, 0), lambda r=r: runner.null_perf(target, r)) for r in range(repeats)]
        entry_perfs = {}
        for index, key in enumerate(pick_noise_entries(table, self.importance_settings.noise_entries)):
            entry_perfs[key] = [base + math.log(table[key])] + [
                cached((-3, index, r), lambda r=r, key=key: runner.entry_perf(target, chain, key, r))
                for r in range(1, repeats)]
        return perfs, entry_perfs

    # ------------------------------------------------------------------ solving

    def solve(self, table: LatencyTable, importance: dict, chain: Chain, budget_ms: float) -> list:
        """``solve`` with the callback's arguments named in its errors."""
        try:
            return solve_chain(table, importance, chain, budget_ms, self.method, resolution=self.resolution).segments
        except ValueError as err:
            raise ValueError(f"LayerMergeCallback(budget={self.budget}, method={self.method!r}): {err}") from err

    def calibrate(self, trainer: pl.Trainer, target: nn.Module, chain: Chain, plan: Plan,
                  budget_ms: float, values: dict) -> Plan:
        """:func:`~lightning_layermerge.planning.calibrate.calibrate` on the DP values (``dp_values``
        of the importance table) with each candidate merged and timed side by side with the
        BN-folded original on rank 0 (:meth:`measured_ratio`)."""
        folded = fold_batchnorm(target, chain)
        inputs = batched_example(chain, self.latency_settings.batch_size)

        def measure(candidate: Plan) -> tuple[float, float | None]:
            ratio = self.measured_ratio(trainer, folded, merge(prune(target, chain, candidate)), inputs)
            return ratio, self.last_spread

        result = calibrate(self.result.latency_table, values, chain, plan, budget_ms,
                           budget=self.budget, method=self.method, measure=measure, resolution=self.resolution,
                           progress=self.verbose and trainer.is_global_zero)
        self.result.calibration.extend(result.rounds)
        if not result.fits:
            rank_zero_warn(f"LayerMergeCallback: the fastest plan found measures {result.measured:.3f} of the "
                           f"original latency, above budget={self.budget}; the latency table overestimates what "
                           "removal saves")
        return result.plan

    def measured_ratio(self, trainer: pl.Trainer, original: nn.Module, candidate: nn.Module,
                       inputs: tuple) -> float:
        """Candidate / original latency (median of pass-pair ratios), measured on rank 0 with the
        settings the table really used (same runtime, threads, clock) and broadcast; its spread
        goes to :attr:`last_spread`."""
        result = None
        if trainer.is_global_zero:
            timed = side_by_side({"original": original, "candidate": candidate}, inputs,
                                 self.result.latency_table.settings)
            spread = timed.spread["candidate"]
            result = (timed.ratio["candidate"], None if math.isnan(spread) else spread)
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        ratio, self.last_spread = result
        return ratio

    # ------------------------------------------------------------------ plan cache

    def plan_file(self, chain: Chain, table: LatencyTable, importance: dict) -> Path | None:
        """Cache file of the (calibrated) plan (:func:`~lightning_layermerge.planning.plan_cache.plan_cache_path`)."""
        return plan_cache_path(self.cache_dir, chain, table, importance, self.budget, self.method,
                               self.calibrate_plans)

    def cached_plan(self, trainer: pl.Trainer, chain: Chain, path: Path | None) -> Plan | None:
        """The cached plan (read on rank 0 and broadcast, so all ranks take the same branch)."""
        found = read_cached_plan(path) if trainer.is_global_zero else None
        if trainer.world_size > 1:
            found = trainer.strategy.broadcast(found, src=0)
        if not found:
            return None
        self.result.calibration = found.get("calibration", [])
        return Plan.from_segments(chain, [tuple(k) for k in found["segments"]])

    def store_plan(self, trainer: pl.Trainer, path: Path | None, plan: Plan) -> None:
        """Write the plan and its calibration record (rank 0)."""
        if trainer.is_global_zero:
            write_cached_plan(path, plan, self.result.calibration)


# ---------------------------------------------------------------------- helpers


def train_loader(trainer: pl.Trainer) -> Any:
    """The training dataloader, as the fit loop will see it."""
    # The public ``trainer.train_dataloader`` is only built after on_fit_start; in setup the
    # fit loop's data source (module, datamodule or the loaders given to fit) is the way in.
    return trainer.fit_loop._data_source.dataloader()


def val_loader(trainer: pl.Trainer) -> Any:
    """The first validation dataloader, as the fit loop will see it (``None`` if there is none)."""
    try:
        loaders = trainer.fit_loop.epoch_loop.val_loop._data_source.dataloader()
    except Exception:  # noqa: BLE001 - no val_dataloader hook, or it fails before setup: score on train data
        return None
    if isinstance(loaders, (list, tuple)):
        loaders = loaders[0] if loaders else None
    elif isinstance(loaders, dict):
        loaders = next(iter(loaders.values()), None)
    return loaders


def make_runner(trainer: pl.Trainer, pl_module: pl.LightningModule, path: str,
                settings: ImportanceSettings, runner_type: type[SubRunner] = SubRunner) -> SubRunner:
    """Sub-runs on this process's device (one device per rank), at the trainer's precision."""
    device = trainer.strategy.root_device
    accelerator = {"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu")
    devices = [device.index or 0] if device.type == "cuda" else 1
    return runner_type(pl_module, path, check_loader(train_loader(trainer)), settings,
                     accelerator=accelerator, devices=devices, precision=trainer.precision,
                     val_loader=val_loader(trainer))


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _all_gather(trainer: pl.Trainer, obj: Any) -> list:
    if trainer.world_size == 1 or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return [obj]
    out: list = [None] * trainer.world_size
    torch.distributed.all_gather_object(out, obj)
    return out


def _same_on_all_ranks(trainer: pl.Trainer, plan: Plan) -> Plan:
    """Every rank solved the same gathered tables; make sure the plans agree (else ranks would diverge)."""
    if trainer.world_size > 1:
        reference = trainer.strategy.broadcast(plan.keys, src=0)
        if reference != plan.keys:
            raise RuntimeError(f"LayerMergeCallback: rank {trainer.global_rank} solved {plan.keys} but rank 0 "
                               f"solved {reference}; the tables differ between ranks")
    return plan


def _importance_state(noise: NoiseLevel | None, importance: dict, trivial: Any) -> dict | None:
    """The noise level's record, plus the offset the entries were read relative to
    (``ImportanceSettings(paired=True)``; ``None``: read as they are)."""
    if noise is None:
        return None
    return {**noise.as_dict(), "paired_offset": protocol_offset(importance, trivial) if trivial else None}
