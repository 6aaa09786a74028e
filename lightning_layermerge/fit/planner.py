"""The setup-time planning pipeline of ``LayerMergeCallback`` (Lightning glue, DDP-aware).

Perf metric and a one-step check of the module's own training code -> latency table (rank
0, broadcast) -> budget check (with the DP's rounding) -> importance table (sharded over
ranks, gathered) -> solve -> calibration against a side-by-side measurement. Everything that
can fail because of user input fails before the importance table, and everything that does
not need the latency table fails before it. Every rank makes the same collective calls in the
same order, so DDP never hangs and every rank ends with the identical plan.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn
from tqdm.auto import tqdm

from ..surgery.graph import Chain
from ..surgery.merge import merge
from ..surgery.plan import Plan
from ..surgery.prune import prune
from ..planning.report import side_by_side
from ..planning.solve import Solution, solve
from .subruns import ImportanceSettings, Monitor, SubRunner, check_loader
from ..planning.tables.cache import TableCache, fingerprint
from ..planning.tables.importance import build_importance_table, combine_shards, weights_fingerprint
from ..planning.tables.noise import NoiseLevel, noise_level, pick_noise_entries, warn_if_noisy
from ..planning.tables.latency import LatencySettings, LatencyTable, batched_example, build_latency_table

__all__ = ["CALIBRATION_AIM", "CALIBRATION_SLACK", "MAX_REPLANS", "Planner", "make_runner", "train_loader"]

#: Re-plans allowed when the measured candidate misses the budget (``calibrate``).
MAX_REPLANS = 5
#: A calibrated plan may measure this far below the budget before a looser plan is tried.
CALIBRATION_SLACK = 0.1
#: Re-plans aim this far below the budget, to leave room for timing noise in later measurements.
CALIBRATION_AIM = 0.95
_PLAN_FILE_VERSION = 3
#: Discretisation units of the DP budget, coarse to fine. Rounding every segment up costs at
#: most one unit per segment, so a budget just above the reachable floor needs a finer grid;
#: the planner takes the first resolution at which the budget is feasible.
RESOLUTIONS = (1000, 4000, 16000, 64000)


class Planner:
    """Builds the tables and chooses the plan for one fit.

    Args:
        budget / method / monitor / mode: As in ``LayerMergeCallback``.
        importance / latency: The table settings.
        calibrate: Re-plan against side-by-side measurements (see :meth:`calibrate`).
        cache_dir: Table and plan cache directory (``None``: no cache).
        verbose: Progress bars (rank 0 only).

    Attributes (filled by :meth:`run`):
        latency_table, importance_table: The tables the plan was solved on.
        importance_shard: Keys of the importance entries this rank computed.
        calibration: One record per calibration round (predicted and measured ratio).
        monitor / base: The Perf metric and its value on the original network.
        importance_noise: Noise level, entry count, steps per entry and build time of the
            importance table (``tables.noise.NoiseLevel``).
        runner: The sub-run machinery (reused to score the final network).
    """

    def __init__(self, *, budget: float, method: str, monitor: str | None, mode: str,
                 importance: ImportanceSettings, latency: LatencySettings, calibrate: bool,
                 cache_dir: str | None, verbose: bool) -> None:
        self.budget, self.method, self.monitor_name, self.mode = budget, method, monitor, mode
        self.importance_settings, self.latency_settings = importance, latency
        self.calibrate_plans, self.cache_dir, self.verbose = calibrate, cache_dir, verbose
        self.latency_table: LatencyTable | None = None
        self.importance_table: dict[tuple[int, int, int], float] | None = None
        self.importance_shard: list[tuple[int, int, int]] = []
        self.calibration: list[dict[str, Any]] = []
        self.last_spread: float | None = None  # spread of the latest calibration measurement
        self.monitor: Monitor | None = None
        self.base: float | None = None
        self.runner: SubRunner | None = None
        self.resolution = RESOLUTIONS[0]
        self.importance_noise: NoiseLevel | None = None
        self._importance_key: dict[str, Any] = {}

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: str, target: nn.Module,
            chain: Chain) -> tuple[Plan, dict[str, Any]]:
        """The plan for ``target``, and what the checkpoint state and the report need to know."""
        # User errors first (metric, the module's own training code), then the tables.
        self.runner = make_runner(trainer, pl_module, path, self.importance_settings)
        self.monitor, self.base = self.runner.resolve_monitor(target, self.monitor_name, self.mode)
        self.runner.check_finetune(target)
        table = self.latency_table = self.build_latency_table(trainer, target, chain)
        budget_ms = self.budget_ms(table, chain)
        importance = self.importance_table = self.build_importance_table(trainer, target, chain)
        plan_file = self.plan_file(chain, table, importance)
        plan = self.cached_plan(trainer, chain, plan_file)
        if plan is None:
            plan = Plan.from_segments(chain, self.solve(table, importance, chain, budget_ms))
            if self.calibrate_plans:
                plan = self.calibrate(trainer, target, chain, plan, budget_ms)
            self.store_plan(trainer, plan_file, plan)
        plan = _same_on_all_ranks(trainer, plan)
        state = {"predicted_ms": table.predicted_ms(plan.keys), "table_original_ms": table.total_ms,
                 "metric_before": self.base, "monitor": self.monitor.key, "mode": self.monitor.mode,
                 "training_loss": self.monitor.training_loss, "calibration": self.calibration,
                 "importance": self.importance_noise.as_dict() if self.importance_noise else None,
                 # How the table was really measured (a busy machine may have changed the settings),
                 # so a resumed run times its final report the same way without the table.
                 "latency_settings": asdict(table.settings), "table_build_s": table.build_s,
                 "table_max_spread": _finite(table.max_spread), "load_note": table.load_note}
        return plan, state

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
        floor = min_chain_ms(table, chain, self.method)
        resolution = self._resolution_for(table, chain, budget_ms) if budget_ms >= floor else None
        if resolution is None:
            reachable = self._smallest_budget(table, chain, (table.outside_ms + floor) / table.total_ms)
            hint = " or use method='layermerge'" if self.method != "layermerge" else ""
            raise ValueError(
                f"LayerMergeCallback(budget={self.budget}) is below the smallest latency method "
                f"'{self.method}' can reach on this network: {reachable:.3f} of the original "
                f"({table.outside_ms + floor:.3f} of {table.total_ms:.3f} ms by the latency table). Raise budget to "
                f"at least {reachable:.3f}{hint}"
            )
        self.resolution = resolution
        return budget_ms

    def _resolution_for(self, table: LatencyTable, chain: Chain, budget_ms: float) -> int | None:
        """The coarsest resolution at which the DP finds any plan within ``budget_ms``."""
        fastest = _fastest(table)
        for resolution in RESOLUTIONS:
            try:
                solve_for(table, fastest, chain, budget_ms, self.method, resolution=resolution)
                return resolution
            except ValueError:
                continue
        return None

    def _smallest_budget(self, table: LatencyTable, chain: Chain, exact: float) -> float:
        """The smallest budget fraction (in steps of 0.001, from ``exact`` up) the DP can solve."""
        fraction = math.ceil(exact * 1000 - 1e-9) / 1000
        while fraction < 1 and self._resolution_for(table, chain, table.budget_for(fraction)) is None:
            fraction = round(fraction + 0.001, 3)
        return min(fraction, 1.0)

    def build_importance_table(self, trainer: pl.Trainer, target: nn.Module, chain: Chain) -> dict:
        """This rank's share of the entries, then gathered, so every rank holds the whole table."""
        runner, monitor = self.runner, self.monitor
        key = {"weights": weights_fingerprint(target), "module": type(runner.shell).__qualname__,
               "monitor": monitor.key, "mode": monitor.mode, "data": len(runner.loader.dataset),
               "score_samples": runner.score_samples, "score_on_val": runner.subsets.on_val,
               **vars(self.importance_settings)}
        self._importance_key = key
        score, base, scale = runner.score, monitor.perf(self.base), 1.0
        if self.importance_settings.relative:
            if base == 0 or not math.isfinite(base):
                raise ValueError(f"ImportanceSettings(relative=True) needs a finite, non-zero {monitor.key} for the "
                                 f"original network, got {self.base}; use relative=False")
            scale = abs(base)
            score, base = (lambda net: runner.score(net) / scale), base / scale
        started = time.perf_counter()
        shard = build_importance_table(target, chain, runner.finetune, score,
                                       shard=(trainer.global_rank, trainer.world_size), cache_dir=self.cache_dir,
                                       cache_key=key, base_score=base,
                                       progress=self.verbose and trainer.is_global_zero)
        self.importance_shard = sorted(shard)
        table = combine_shards(_all_gather(trainer, shard))
        if all(v == -math.inf for v in table.values()):
            err = runner.first_error
            raise RuntimeError(runner.failure_message(err) if err else "LayerMergeCallback: every importance run failed")
        self.importance_noise = self.measure_noise(trainer, target, chain, table, base, scale,
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
        level = noise_level(table, perfs, entry_perfs=entry_perfs, steps_per_entry=self.runner.steps,
                            score_samples=self.runner.score_samples, build_seconds=build_seconds)
        if trainer.is_global_zero:
            warn_if_noisy(level)
        return level

    def _noise_runs(self, target: nn.Module, chain: Chain, table: dict, base: float,
                    scale: float) -> tuple[list[float], dict]:
        """Perf of the unmodified network and of a few entries over the noise repeats, through
        the table cache (a repeated run re-trains nothing)."""
        repeats, runner = self.importance_settings.noise_repeats, self.runner
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
            return solve_for(table, importance, chain, budget_ms, self.method, resolution=self.resolution).segments
        except ValueError as err:
            raise ValueError(f"LayerMergeCallback(budget={self.budget}, method={self.method!r}): {err}") from err

    def calibrate(self, trainer: pl.Trainer, target: nn.Module, chain: Chain, plan: Plan,
                  budget_ms: float) -> Plan:
        """Search the table budget whose plan, merged and timed side by side with the original, fits.

        The table adds up segments timed one by one, possibly minutes apart on a shared
        machine, so its total can be off either way (load drift, cache effects, an inflated
        outside-the-chain part). Each round measures the merged candidate against the
        BN-folded original and moves the table budget: down when the candidate is over the
        budget, up when it is more than ``CALIBRATION_SLACK`` under it (a looser plan keeps
        more of the network), by the measured/targeted ratio until the two sides are
        bracketed, then by bisection. Of the candidates that fit, the one the DP rates most
        important wins.
        """
        table, importance = self.latency_table, self.importance_table
        folded = merge(prune(target, chain, Plan.keep_all(chain)))
        inputs = batched_example(chain, self.latency_settings.batch_size)
        floor, ceiling = min_chain_ms(table, chain, self.method), table.chain_ms * 2
        fits, over = 0.0, math.inf  # largest table budget known to fit / smallest known not to
        tried: dict[tuple, float] = {}
        bar = tqdm(total=1 + MAX_REPLANS, desc="calibration (timed candidates)", unit="plan",
                   disable=not (self.verbose and trainer.is_global_zero))
        for _ in range(1 + MAX_REPLANS):
            self.last_spread = None
            ratio = self.measured_ratio(trainer, folded, merge(prune(target, chain, plan)), inputs)
            bar.update()
            bar.set_postfix(measured=f"{ratio:.3f}", budget=self.budget)
            tried[tuple(plan.keys)] = ratio
            self.calibration.append({"segments": plan.keys, "measured": ratio, "spread": self.last_spread,
                                     "table_budget_ms": budget_ms,
                                     "predicted": table.predicted_ms(plan.keys) / table.total_ms})
            if ratio <= self.budget:
                fits = max(fits, budget_ms)
                if ratio >= (1 - CALIBRATION_SLACK) * self.budget:
                    break
            else:
                over = min(over, budget_ms)
            if fits and over < math.inf:
                budget_ms = (fits + over) / 2  # bracketed: bisect
            else:
                budget_ms = min(max(budget_ms * CALIBRATION_AIM * self.budget / ratio, floor), ceiling)
            found = self._untried_plan(chain, budget_ms, tried, grow=ratio <= self.budget,
                                       bracketed=bool(fits) and over < math.inf, bounds=(floor, ceiling))
            if found is None:
                break
            plan, budget_ms = found
        bar.close()
        within = [k for k, r in tried.items() if r <= self.budget]
        if not within:
            best = min(tried, key=tried.get)
            rank_zero_warn(f"LayerMergeCallback: the fastest plan found measures {tried[best]:.3f} of the original "
                           f"latency, above budget={self.budget}; the latency table overestimates what removal saves")
            return Plan.from_segments(chain, list(best))
        best = max(within, key=lambda k: (sum(importance[s] for s in k), -tried[k]))
        return Plan.from_segments(chain, list(best))

    def _untried_plan(self, chain: Chain, budget_ms: float, tried: dict, *, grow: bool, bracketed: bool,
                      bounds: tuple[float, float]) -> tuple[Plan, float] | None:
        """The DP's plan at ``budget_ms``; while unbracketed, the budget keeps moving (x1.15 per
        step, no measurement) until the DP picks a plan not timed yet. ``None``: nothing new."""
        table, importance = self.latency_table, self.importance_table
        for _ in range(32):
            try:
                keys = tuple(solve_for(table, importance, chain, budget_ms, self.method,
                                       resolution=self.resolution).segments)
            except ValueError:  # a re-plan budget below what the DP can reach: nothing new here
                return None
            if keys not in tried:
                return Plan.from_segments(chain, list(keys)), budget_ms
            moved = min(max(budget_ms * (1.15 if grow else 1 / 1.15), bounds[0]), bounds[1])
            if bracketed or moved == budget_ms:
                return None
            budget_ms = moved
        return None

    def measured_ratio(self, trainer: pl.Trainer, original: nn.Module, candidate: nn.Module,
                       inputs: tuple) -> float:
        """Candidate / original latency (median of pass-pair ratios), measured on rank 0 with the
        settings the table really used (same runtime, threads, clock) and broadcast; its spread
        goes to :attr:`last_spread`."""
        result = None
        if trainer.is_global_zero:
            timed = side_by_side({"original": original, "candidate": candidate}, inputs, self.latency_table.settings)
            spread = timed.spread["candidate"]
            result = (timed.ratio["candidate"], None if math.isnan(spread) else spread)
        if trainer.world_size > 1:
            result = trainer.strategy.broadcast(result, src=0)
        ratio, self.last_spread = result
        return ratio

    # ------------------------------------------------------------------ plan cache

    def plan_file(self, chain: Chain, table: LatencyTable, importance: dict) -> Path | None:
        """Cache file of the (calibrated) plan: a function of both tables, budget and method only,
        so a repeated or resumed run with cached tables re-uses it without timing anything."""
        if self.cache_dir is None:
            return None
        key = fingerprint([[*k, repr(v)] for k, v in sorted(table.entries.items())], repr(table.total_ms),
                          [[*k, repr(v)] for k, v in sorted(importance.items())], self.budget, self.method,
                          self.calibrate_plans, MAX_REPLANS, _PLAN_FILE_VERSION)
        return Path(self.cache_dir) / f"plan-{chain.fingerprint}-{key[:12]}.json"

    def cached_plan(self, trainer: pl.Trainer, chain: Chain, path: Path | None) -> Plan | None:
        """The cached plan (decided on rank 0 and broadcast, so all ranks take the same branch)."""
        found = None
        if path is not None and trainer.is_global_zero and path.is_file():
            try:
                found = json.loads(path.read_text())
            except (OSError, ValueError):
                found = None  # unreadable: plan again
        if trainer.world_size > 1:
            found = trainer.strategy.broadcast(found, src=0)
        if not found:
            return None
        self.calibration = found.get("calibration", [])
        return Plan.from_segments(chain, [tuple(k) for k in found["segments"]])

    def store_plan(self, trainer: pl.Trainer, path: Path | None, plan: Plan) -> None:
        """Write the plan and its calibration record atomically (rank 0)."""
        if path is None or not trainer.is_global_zero:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"segments": plan.keys, "calibration": self.calibration}))
        os.replace(tmp, path)  # atomic: an interrupted write never leaves half a file


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
                settings: ImportanceSettings) -> SubRunner:
    """Sub-runs on this process's device (one device per rank), at the trainer's precision."""
    device = trainer.strategy.root_device
    accelerator = {"cuda": "gpu", "mps": "mps"}.get(device.type, "cpu")
    devices = [device.index or 0] if device.type == "cuda" else 1
    return SubRunner(pl_module, path, check_loader(train_loader(trainer)), settings,
                     accelerator=accelerator, devices=devices, precision=trainer.precision,
                     val_loader=val_loader(trainer))


def min_chain_ms(table: LatencyTable, chain: Chain, method: str) -> float:
    """Smallest chain latency ``method`` can reach: solve with importance = -latency, no budget limit."""
    roomy = sum(table.entries.values()) + 1.0
    return solve_for(table, _fastest(table), chain, roomy, method).latency


def _fastest(table: LatencyTable) -> dict:
    """Importance = -latency: the DP then picks the fastest plan within a budget."""
    return {k: -v for k, v in table.entries.items()}


def solve_for(table: LatencyTable, importance: dict, chain: Chain, budget_ms: float, method: str, *,
              resolution: int = RESOLUTIONS[0]) -> Solution:
    """``solve`` on ``chain``'s tables; Depth gets the kernel its all-convs-kept segments really have."""
    if method != "depth":
        return solve(table.entries, importance, chain.num_layers, budget_ms, method, resolution=resolution)
    kept = chain.all_kept_kernels()
    # Pairs (i, j) whose segments must drop a conv (e.g. a strided conv followed by a k > 1
    # conv) have no all-kept segment: Depth cannot use them, and solve() rejects a mapping
    # that lacks pairs present in the table, so leave those pairs out of both tables.
    entries = {key: v for key, v in table.entries.items() if key[:2] in kept}
    importance = {key: v for key, v in importance.items() if key[:2] in kept}
    return solve(entries, importance, chain.num_layers, budget_ms, method, all_kept_kernel=kept,
                 resolution=resolution)


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
