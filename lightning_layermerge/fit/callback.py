"""``LayerMergeCallback``: LayerMerge compression inside the user's own ``trainer.fit``.

One callback turns a trained network into a faster one at a latency budget, with the
user's data, loss, optimizer and loggers, without changing the LightningModule class::

    trainer = L.Trainer(max_epochs=10, callbacks=[LayerMergeCallback(budget=0.6, distill=Distillation())])
    trainer.fit(module, datamodule=dm)   # profile -> importance -> DP -> prune -> fine-tune -> merge
    module.model                          # the merged, faster network

Hooks (each does one thing; the work lives in the planning and surgery layers):

* ``setup("fit")``: resolve the target and an example input, build (or load from cache) the
  latency table, check the budget is reachable, resolve the Perf metric, build the
  importance table in quiet sub-runs (split across DDP ranks and gathered), solve, and
  replace the target by ``prune(...)``. This runs before optimizers and the DDP wrapper
  are set up, so both see the new parameters. Every user error is raised here, before
  any training and before the module is touched.
* ``on_fit_start``: attach distillation (teacher to the module's device).
* ``on_save_checkpoint`` / ``state_dict``: store the plan (and, when distilling, the
  teacher's weights), so a run resumed with ``fit(ckpt_path=...)`` — even with a freshly
  built module and callback — rebuilds the pruned architecture and the teacher without
  re-planning, and ``load_from_checkpoint`` users can rebuild with :func:`rebuild_pruned`
  / :func:`restore_pruned`.
* ``setup("validate" | "test" | "predict")``: when the trainer restores a checkpoint
  written during the compressed fit (``trainer.test(ckpt_path="best")``), rebuild its
  architecture just before the strict weight load, then evaluate the merged network.
* ``on_fit_end``: ``merge``, check merged == pruned on the example input, measure original
  (BatchNorm folded) and merged latency side by side, build :attr:`report`, log it to the
  trainer's loggers and draw it as a PNG in the log directory.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import nn

from ..planning.report import LayerMergeReport
from ..planning.solve import METHODS
from ..planning.tables.importance import weights_fingerprint
from ..planning.tables.latency import LatencySettings, LatencyTable
from ..surgery.adapters import unwrap_compressed, wrap_compressed
from ..surgery.graph import Chain
from ..surgery.meta import attach_input_spec, input_spec
from ..surgery.plan import Plan
from ..surgery.prune import prune
from .checks import (check_budget, check_cache_dir, check_choice, check_module, check_monitor, check_plan,
                     check_target, check_trainer, check_type, warn_unusual)
from .distill import Distillation, DistillationPatch, frozen_teacher
from .evaluation import merge_for_evaluation, rebuild_for_evaluation
from .final_report import build_report, measure_report, publish_report, report_timing, score_after
from .importance_settings import ImportanceSettings, Monitor
from .paths import get_path, set_path
from .plan_log import log_plan
from .planner import Planner, PlanningResult, make_runner, train_loader
from .precision import timing_settings
from .resume import (CHECKPOINT_KEY, NOT_COMPRESSED, STATE_KEY, TEACHER_KEY, LoadCheckpointPatch, fit_checkpoint_path,
                     fit_weights_only, is_compressed, plan_for_target, read_checkpoint, rebuild_pruned, restore_pruned,
                     state_from_checkpoint, state_of_plan_argument, teacher_for_resume)
from .state import STATE_VERSION, CompressionState
from .subsets import check_loader
from .target import example_input, like_memory_format, merge_checked, resolve_target, trace_target

__all__ = ["LayerMergeCallback", "rebuild_pruned", "restore_pruned"]



class LayerMergeCallback(Callback):
    """Compress a submodule of the LightningModule to a latency budget with LayerMerge.

    Args:
        budget: Target latency as a fraction of the original network's latency with
            BatchNorm folded, ``0 < budget <= 1`` (e.g. 0.6 = 1.67x faster).
        target: Attribute path of the submodule to compress (e.g. ``"model"`` or
            ``"net.backbone"``). ``None``: ``"model"`` if the module has a ``model``
            submodule holding a ``nn.Conv2d``, else the one direct child that holds every
            ``nn.Conv2d`` of the module.
        method: ``"layermerge"`` (activations and convs), ``"layeronly"`` (convs only) or
            ``"depth"`` (activations only), as in the paper.
        monitor: Metric used as Perf for the importance table and the report, in the
            ``EarlyStopping`` convention. ``None``: the validation loss if
            ``validation_step`` logs one (``val_loss``, ``val/loss``, ...), else the
            training loss on a held-out subset.
        mode: ``"min"`` or ``"max"``: whether a lower or a higher ``monitor`` is better.
        importance: How each importance entry is estimated (:class:`ImportanceSettings`).
        latency: How latency is measured (:class:`~lightning_layermerge.LatencySettings`);
            the final side-by-side measurement uses the same settings. The defaults are the
            robust ones: 1 thread timed by the thread's CPU clock (unaffected by other
            processes), entries priced in the context of the whole network, every timing
            re-measured while its spread exceeds 5 %, and a fallback to those settings with a
            warning if you ask for more threads on a busy machine. With a ``*-true``
            trainer precision (``"bf16-true"``, ``"16-true"``, ``"64-true"``) the default
            float32 timing follows the trainer's dtype, since those weights are what gets
            deployed; with mixed precision the weights stay float32 and timing stays in
            ``latency.dtype``. The report states dtype and precision.
        distill: Optional :class:`~lightning_layermerge.Distillation` from the
            original network during fine-tuning.
        cache_dir: Directory for the latency and importance table caches. ``None``:
            ``<trainer.default_root_dir>/.layermerge_cache``; ``False``: no cache. With a cache,
            a second budget or a resumed run costs no new table measurements.
        plan: Skip profiling and apply a known plan: a dict (``callback.state_dict()``, the
            ``"layermerge"`` entry of a checkpoint, or ``Plan.to_dict()``) or the path of a
            Lightning checkpoint written with this callback.
        calibrate: Before fine-tuning, time the chosen network (merged) side by side with the
            original and re-plan with a smaller or larger table budget while it misses the
            budget or measures more than 10 % under it (at most 5 re-plans). Guards against
            latency tables whose parts add up to a wrong total on a busy machine.
        verbose: Print the plan and the report; show progress bars while tables are built.

    Raises:
        ValueError / TypeError: On any invalid argument (checked here, before training).

    Attributes:
        planner_type: The class that builds the tables and chooses the plan
            (:class:`~lightning_layermerge.fit.planner.Planner`); a subclass can observe or
            replace a step (tests count sub-runs and calibrations this way).
    """

    planner_type: type[Planner] = Planner

    def __init__(
        self,
        budget: float,
        target: str | None = None,
        method: str = "layermerge",
        monitor: str | None = None,
        mode: str = "min",
        importance: ImportanceSettings | None = None,
        latency: LatencySettings | None = None,
        distill: Distillation | None = None,
        cache_dir: str | bool | None = None,
        plan: dict | str | None = None,
        calibrate: bool = True,
        verbose: bool = True,
    ) -> None:
        super().__init__()
        self.budget = check_budget(budget)
        self.target = check_target(target)
        self.method = check_choice("method", method, METHODS)
        self.monitor = check_monitor(monitor)
        self.mode = check_choice("mode", mode, ("min", "max"))
        self.importance_settings = check_type("importance", importance, ImportanceSettings) or ImportanceSettings()
        self.latency_settings = check_type("latency", latency, LatencySettings) or LatencySettings()
        self.distill = check_type("distill", distill, Distillation)
        self.cache_dir = check_cache_dir(cache_dir)
        self._given_plan = check_plan(plan)
        self.calibrate = bool(calibrate)
        self.verbose = bool(verbose)
        warn_unusual(self.budget, self.monitor, self.mode)
        # Results, filled during fit.
        self.chain: Chain | None = None
        self.plan: Plan | None = None
        self.report: LayerMergeReport | None = None
        self._planning = PlanningResult()  # the planner's own result object: tables, calibration, metric
        self._reset_run()

    def _reset_run(self) -> None:
        self.report = None  # a new fit makes a new report
        # A new fit starts a new calibration record and metric; the tables stay readable until re-planned.
        self._planning = dataclasses.replace(self._planning, calibration=[], monitor=None, base=None, runner=None,
                                             importance_noise=None)
        self._active = False
        self._target_path: str | None = None
        self._original: nn.Module | None = None  # the user's own target object, untouched
        self._teacher: nn.Module | None = None
        self._state: CompressionState | None = None
        self._kd: DistillationPatch | None = None
        self._load_patch: LoadCheckpointPatch | None = None
        self._resumed_from: str | None = None
        self._evaluating: str | None = None  # target path restored for validate/test/predict
        self._timing: LatencySettings = self.latency_settings  # resolved against the trainer's precision

    @property
    def latency_table(self) -> LatencyTable | None:
        """The latency table the plan was solved on (``None`` for a given or resumed plan)."""
        return self._planning.latency_table

    @property
    def importance_table(self) -> dict[tuple[int, int, int], float] | None:
        """The importance table the plan was solved on (``None`` for a given or resumed plan)."""
        return self._planning.importance_table

    @property
    def importance_shard(self) -> list[tuple[int, int, int]]:
        """Keys of the importance entries this rank computed (DDP splits them over ranks)."""
        return self._planning.importance_shard

    @property
    def calibration(self) -> list[dict[str, Any]]:
        """One record per calibration round of this fit (predicted and measured ratio)."""
        return self._planning.calibration

    @property
    def state_key(self) -> str:
        """Key of this callback's state in checkpoints (one LayerMergeCallback per Trainer)."""
        return STATE_KEY

    # ================================================================== setup: plan + rewrite

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Fit: profile, plan and rewrite the target before optimizers and DDP are set up.
        Validate/test/predict: prepare to load a checkpoint written during the compressed fit."""
        if stage != "fit":
            self._prepare_evaluation(pl_module)
            return
        original_module = self._original  # kept from a previous fit on this callback, if any
        self._reset_run()
        check_trainer(trainer, self)
        self._timing = timing_settings(self.latency_settings, trainer.precision)
        check_module(pl_module, self.distill)
        path = resolve_target(pl_module, self.target)
        target = get_path(pl_module, path)
        if is_compressed(unwrap_compressed(target)):  # also a LayerMergeUNet2DModel from an earlier fit
            self._original = original_module
            rank_zero_warn(f"LayerMergeCallback: '{path}' is already compressed; this fit fine-tunes it as it is.")
            return
        resume = self._resume_checkpoint(trainer)
        example = example_input(pl_module, target, lambda: next(iter(check_loader(train_loader(trainer)))))
        chain = trace_target(target, example, path)
        if resume is not None:  # fit(ckpt_path=...): the checkpoint's plan and teacher, nothing measured
            state = CompressionState.from_dict(state_from_checkpoint(resume))
            plan = plan_for_target(chain, state, path)
            teacher = self._teacher_for_resume(resume, state, target, path)
        else:
            state = None if self._given_plan is None else state_of_plan_argument(self._given_plan)
            if state is not None:
                plan = plan_for_target(chain, state, path)
            else:
                plan, state = self._plan(trainer, pl_module, path, target, chain)
            teacher = frozen_teacher(target) if self.distill is not None else None
        self._apply(pl_module, path, target, chain, plan, state, teacher)

    def _resume_checkpoint(self, trainer: pl.Trainer) -> Mapping | None:
        """The checkpoint ``fit(ckpt_path=...)`` resumes from, if it holds a LayerMerge plan.

        Raises:
            ValueError: It is an uncompressed checkpoint (its weights cannot continue a compressed fit).
        """
        path = fit_checkpoint_path(trainer)
        if path is None:
            return None
        checkpoint = read_checkpoint(path, trusted=fit_weights_only(trainer) is False)  # fit(weights_only=False)
        if state_from_checkpoint(checkpoint) is None:
            raise ValueError(NOT_COMPRESSED)
        self._resumed_from = path
        return checkpoint

    def _teacher_for_resume(self, checkpoint: Mapping, state: CompressionState, target: nn.Module,
                            path: str) -> nn.Module | None:
        return None if self.distill is None else teacher_for_resume(checkpoint, state, target, path)

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: str, target: nn.Module,
              chain: Chain) -> tuple[Plan, CompressionState]:
        """Tables -> solve -> calibrate (``planner.Planner``). The callback holds the planner's
        :class:`~.planner.PlanningResult`, which it fills as it goes (a failed run shows how far it got)."""
        planner = self.planner_type(budget=self.budget, method=self.method, monitor=self.monitor, mode=self.mode,
                                    importance=self.importance_settings, latency=self._timing,
                                    calibrate=self.calibrate, cache_dir=self._cache(trainer), verbose=self.verbose)
        self._planning = planner.result
        return planner.run(trainer, pl_module, path, target, chain)

    def _cache(self, trainer: pl.Trainer) -> str | None:
        if self.cache_dir is False:
            return None
        return str(self.cache_dir) if self.cache_dir else os.path.join(trainer.default_root_dir, ".layermerge_cache")

    def _apply(self, pl_module: pl.LightningModule, path: str, target: nn.Module, chain: Chain, plan: Plan,
               state: CompressionState, teacher: nn.Module | None) -> None:
        """Replace the target by the pruned network; remember what resume and the report need."""
        pruned = like_memory_format(prune(target, chain, plan), target)
        attach_input_spec(pruned, chain.example)
        self._teacher = teacher
        set_path(pl_module, path, pruned)
        self._original, self._target_path, self.chain, self.plan = target, path, chain, plan
        self._state = dataclasses.replace(
            state, version=STATE_VERSION, target=path, plan=plan.to_dict(), inputs=input_spec(chain.example),
            budget=self.budget if state.budget is None else state.budget, method=state.method or self.method,
            merged=False, original_weights=state.original_weights or weights_fingerprint(target))
        if self._planning.monitor is None and state.monitor and self.monitor in (None, state.monitor):
            # A known plan (plan= or a checkpoint) carries the metric it was scored with.
            self._planning.monitor = Monitor(state.monitor, state.mode or self.mode, state.training_loss)
        self._load_patch = LoadCheckpointPatch(pl_module, lambda checkpoint: self._rebuild_for(pl_module, checkpoint))
        self._active = True
        self._log_plan(pl_module)

    def _log_plan(self, pl_module: pl.LightningModule) -> None:
        log_plan(pl_module, self.plan, self._state, target=self._target_path, budget=self.budget, method=self.method,
                 calibration=self.calibration, resumed_from=self._resumed_from, verbose=self.verbose)

    # ================================================================== resume

    def _rebuild_for(self, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Just before the strict weight load: make the architecture (and teacher) the checkpoint's.

        ``setup`` already applied the checkpoint's plan when it could see ``ckpt_path``; this
        covers the rest (e.g. a Lightning version whose ``ckpt_path`` is not visible in setup).
        """
        state = state_from_checkpoint(checkpoint)
        if state is None:
            set_path(pl_module, self._target_path, self._original)  # leave the model as it was
            self._active = False
            raise ValueError(NOT_COMPRESSED)
        if state["plan"]["segments"] != self._state.plan["segments"]:
            self.plan = plan_for_target(self.chain, CompressionState.from_dict(state), self._target_path)
            pruned = like_memory_format(prune(self._original, self.chain, self.plan), self._original)
            attach_input_spec(pruned, self.chain.example)
            set_path(pl_module, self._target_path, pruned)
        if self.distill is not None and self._resumed_from is None:
            self._teacher = self._teacher_for_resume(checkpoint, CompressionState.from_dict(state), self._original,
                                                     self._target_path)
        self._state = self._state.updated(state)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """Store the plan at the top level too (for :func:`rebuild_pruned`), and the teacher when distilling."""
        if self._state is not None:
            checkpoint[CHECKPOINT_KEY] = copy.deepcopy(self._state.to_dict())
        if self._active and self._teacher is not None:
            checkpoint[TEACHER_KEY] = {k: v.detach().cpu() for k, v in self._teacher.state_dict().items()}

    def state_dict(self) -> dict[str, Any]:
        """The plan state (plan, target, example-input shapes, predicted latency, metric)."""
        return copy.deepcopy(self._state.to_dict()) if self._state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Merge a checkpoint's state into the current one (the architecture is already rebuilt)."""
        # The architecture was already rebuilt from the same state in _rebuild_for.
        if state_dict and self._state is not None:
            self._state = self._state.updated(state_dict)

    @property
    def teacher(self) -> nn.Module | None:
        """The frozen original network distilled from (``None`` without ``distill``)."""
        return self._teacher

    # ================================================================== evaluation from checkpoints

    def _prepare_evaluation(self, pl_module: pl.LightningModule) -> None:
        """``trainer.validate/test/predict(ckpt_path=...)``: rebuild the checkpoint's architecture
        just before Lightning's strict weight load (:func:`~.evaluation.rebuild_for_evaluation`)."""
        self._evaluating = None

        def before(checkpoint: dict) -> None:
            self._evaluating = rebuild_for_evaluation(pl_module, checkpoint, self._original)

        self._load_patch = LoadCheckpointPatch(pl_module, before)

    def _evaluation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The checkpoint is loaded: evaluate the merged (deployable) form of its network."""
        if self._load_patch is not None:
            self._load_patch.remove()
        path, self._evaluating = self._evaluating, None
        if path is not None and trainer.state.fn != "fit":
            merge_for_evaluation(pl_module, path, self._original)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`_evaluation_start` (does nothing during fit)."""
        if trainer.state.fn != "fit":
            self._evaluation_start(trainer, pl_module)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`_evaluation_start`."""
        self._evaluation_start(trainer, pl_module)

    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """See :meth:`_evaluation_start`."""
        self._evaluation_start(trainer, pl_module)

    # ================================================================== fine-tuning

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Checkpoint restore is over; start distillation."""
        if self._load_patch is not None:
            self._load_patch.remove()
        if self._active and self.distill is not None:
            student = get_path(pl_module, self._target_path)
            dtype = next(student.parameters()).dtype  # a "*-true" precision converted the student's weights
            self._teacher.to(device=pl_module.device, dtype=dtype if dtype.is_floating_point else None)
            self._kd = DistillationPatch(self.distill, self._teacher, pl_module, get_path(pl_module, self._target_path))
            self._kd.attach()

    def _detach(self) -> None:
        if self._load_patch is not None:
            self._load_patch.remove()
        if self._kd is not None:
            self._kd.detach()
            self._kd = None

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        """Remove the patched hooks; the (pruned) module is left for inspection."""
        self._detach()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Remove the patched hooks (idempotent)."""
        self._detach()

    # ================================================================== end: merge + report

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Merge, verify, measure, report."""
        self._detach()
        if not self._active:
            return
        pruned = get_path(pl_module, self._target_path)
        if trainer.world_size > 1:
            # BatchNorm statistics drift apart between DDP ranks after the last step (buffers are
            # only synced at the start of a forward); merge rank 0's, so all ranks end identical.
            pruned.load_state_dict(trainer.strategy.broadcast(pruned.state_dict(), src=0))
        final, merged, error = merge_checked(pruned, self.chain.example)
        # In the original's library type where an adapter offers one (a diffusers UNet2DModel comes back
        # as a LayerMergeUNet2DModel for pipelines); the state-dict keys stay the network's own.
        final = wrap_compressed(self._original, like_memory_format(final, pruned))
        set_path(pl_module, self._target_path, final)
        self._state.merged = merged  # checkpoints saved from now on hold the merged weights
        self.report = self._build_report(trainer, pl_module, final, merged, error)
        publish_report(trainer, self.report, verbose=self.verbose)
        # Done: drop the copies (teacher, sub-run module) so they do not hold memory. The user's
        # original target stays referenced: evaluating a checkpoint of this fit rebuilds from it.
        self._active = False
        self._teacher = self._planning.runner = None

    def _build_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: nn.Module, merged: bool,
                      error: float) -> LayerMergeReport:
        settings = report_timing(self.latency_table, self._state, self._timing)
        report = build_report(budget=self.budget, method=self.method, target=self._target_path, chain=self.chain,
                              plan=self.plan, state=self._state, mode=self.mode, original=self._original, final=final,
                              merged=merged, error=error, settings=settings, precision=str(trainer.precision))
        if trainer.is_global_zero:  # measured once, without contention between ranks
            measure_report(report, self._original, self.chain, final, settings, verbose=self.verbose)
            self._score_after(trainer, pl_module, report, final)
        return report

    def _score_after(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: LayerMergeReport,
                     final: nn.Module) -> None:
        """Monitored metric after compression (and before, if not known), on the same held-out subset."""
        planning = self._planning
        score_after(lambda: planning.runner or make_runner(trainer, pl_module, self._target_path,
                                                           self.importance_settings, self.planner_type.runner_type),
                    planning, report, self._original, final, monitor=self.monitor, mode=self.mode)
