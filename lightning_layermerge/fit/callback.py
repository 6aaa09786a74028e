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
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies.launchers import _MultiProcessingLauncher
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import nn

from ..planning.report import LayerMergeReport, count_parameters, settings_dict, side_by_side
from ..planning.solve import METHODS
from ..planning.tables.importance import weights_fingerprint
from ..planning.tables.latency import LatencySettings, LatencyTable, batched_example
from ..surgery.adapters import unwrap_compressed, wrap_compressed
from ..surgery.graph import Chain
from ..surgery.meta import SurgeryMeta, attach_input_spec, example_from_spec, input_spec
from ..surgery.plan import Plan
from ..surgery.prune import prune
from ..surgery.rebuild import fold_batchnorm
from .checks import check_budget, check_cache_dir, check_choice, check_monitor, check_plan, check_target, check_type
from .distill import Distillation, DistillationPatch, frozen_teacher
from .planner import Planner, make_runner, train_loader
from .state import STATE_VERSION, CompressionState
from .resume import (CHECKPOINT_KEY, STATE_KEY, TEACHER_KEY, LoadCheckpointPatch, fit_checkpoint_path,
                     fit_weights_only, is_compressed, read_checkpoint, rebuild_pruned, restore_pruned,
                     state_from_checkpoint)
from .importance_settings import ImportanceSettings, Monitor
from .paths import get_path, set_path
from .subruns import SubRunner
from .subsets import check_loader
from .target import example_input, merge_checked, resolve_target, trace_target

__all__ = ["LayerMergeCallback", "rebuild_pruned", "restore_pruned"]

#: Budgets under this fraction warn: few networks keep their accuracy at such a speed-up.
LOW_BUDGET = 0.2


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
        latency: How latency is measured (:class:`~lightning_layermerge.tables.latency.LatencySettings`);
            the final side-by-side measurement uses the same settings. The defaults are the
            robust ones: 1 thread timed by the thread's CPU clock (unaffected by other
            processes), entries priced in the context of the whole network, every timing
            re-measured while its spread exceeds 5 %, and a fallback to those settings with a
            warning if you ask for more threads on a busy machine. With a ``*-true``
            trainer precision (``"bf16-true"``, ``"16-true"``, ``"64-true"``) the default
            float32 timing follows the trainer's dtype, since those weights are what gets
            deployed; with mixed precision the weights stay float32 and timing stays in
            ``latency.dtype``. The report states dtype and precision.
        distill: Optional :class:`~lightning_layermerge.distill.Distillation` from the
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
    """

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
        if self.monitor is not None and "acc" in self.monitor.lower() and self.mode == "min":
            rank_zero_warn(f"LayerMergeCallback(monitor={self.monitor!r}, mode='min'): is a lower value really "
                           "better? Pass mode='max' for accuracies.")
        if self.budget < LOW_BUDGET:
            rank_zero_warn(f"LayerMergeCallback(budget={self.budget}): a network {1 / self.budget:.1f}x faster keeps "
                           "only a few layers and rarely recovers its accuracy; budgets of 0.3 or more are typical")
        # Results, filled during fit.
        self.chain: Chain | None = None
        self.plan: Plan | None = None
        self.latency_table: LatencyTable | None = None
        self.importance_table: dict[tuple[int, int, int], float] | None = None
        self.importance_shard: list[tuple[int, int, int]] = []
        self.report: LayerMergeReport | None = None
        self._reset_run()

    def _reset_run(self) -> None:
        self.report = None  # a new fit makes a new report
        self.calibration: list[dict[str, Any]] = []  # one record per calibration round
        self._active = False
        self._target_path: str | None = None
        self._original: nn.Module | None = None  # the user's own target object, untouched
        self._teacher: nn.Module | None = None
        self._runner: SubRunner | None = None
        self._monitor: Monitor | None = None
        self._state: CompressionState | None = None
        self._kd: DistillationPatch | None = None
        self._load_patch: LoadCheckpointPatch | None = None
        self._resumed_from: str | None = None
        self._evaluating: str | None = None  # target path restored for validate/test/predict
        self._timing: LatencySettings = self.latency_settings  # resolved against the trainer's precision

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
        _check_trainer(trainer, self)
        self._timing = timing_settings(self.latency_settings, trainer.precision)
        self._check_module(pl_module)
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
            plan = self._plan_from_state(chain, state, path)
            teacher = self._teacher_for_resume(resume, state, target, path)
        else:
            state = self._known_state()
            if state is not None:
                plan = self._plan_from_state(chain, state, path)
            else:
                plan, state = self._plan(trainer, pl_module, path, target, chain)
            teacher = frozen_teacher(target) if self.distill is not None else None
        self._apply(pl_module, path, target, chain, plan, state, teacher)

    def _check_module(self, pl_module: pl.LightningModule) -> None:
        """Errors about the module that are known before any work."""
        if self.distill is not None and not pl_module.automatic_optimization:
            raise ValueError("LayerMergeCallback(distill=...) needs automatic optimization: with manual "
                             "optimization the loss cannot be extended. Drop distill, or add a KD term to your "
                             "training_step yourself (from a frozen copy of the original network)")

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
            raise ValueError(_NOT_COMPRESSED)
        self._resumed_from = path
        return checkpoint

    def _teacher_for_resume(self, checkpoint: Mapping, state: CompressionState, target: nn.Module,
                            path: str) -> nn.Module | None:
        """The original network to distil from on resume: stored in the checkpoint, or the module's own
        target if its weights are the ones the plan was made from.

        Raises:
            ValueError: Distillation is on and the original weights cannot be recovered.
        """
        if self.distill is None:
            return None
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

    def _plan(self, trainer: pl.Trainer, pl_module: pl.LightningModule, path: str, target: nn.Module,
              chain: Chain) -> tuple[Plan, CompressionState]:
        """Tables -> solve -> calibrate (``planner.Planner``); keeps its results on the callback."""
        planner = Planner(budget=self.budget, method=self.method, monitor=self.monitor, mode=self.mode,
                          importance=self.importance_settings, latency=self._timing,
                          calibrate=self.calibrate, cache_dir=self._cache(trainer), verbose=self.verbose)
        try:
            plan, facts = planner.run(trainer, pl_module, path, target, chain)
            return plan, CompressionState.from_dict({**facts, "plan": plan.to_dict()})
        finally:
            self.latency_table, self.importance_table = planner.latency_table, planner.importance_table
            self.importance_shard, self.calibration = planner.importance_shard, planner.calibration
            self._runner, self._monitor = planner.runner, planner.monitor

    def _cache(self, trainer: pl.Trainer) -> str | None:
        if self.cache_dir is False:
            return None
        return str(self.cache_dir) if self.cache_dir else os.path.join(trainer.default_root_dir, ".layermerge_cache")

    def _known_state(self) -> CompressionState | None:
        """A plan that needs no profiling (``plan=``)."""
        source = self._given_plan
        if source is None:
            return None
        if isinstance(source, Mapping):  # a state dict, or a bare Plan.to_dict()
            return CompressionState.from_dict(source if "plan" in source else {"plan": dict(source)})
        state = state_from_checkpoint(source)
        if not state:
            raise ValueError(f"LayerMergeCallback(plan={source!r}): the checkpoint holds no LayerMerge plan; it was "
                             "not written during a LayerMergeCallback fit")
        return CompressionState.from_dict(state)

    def _plan_from_state(self, chain: Chain, state: CompressionState, path: str) -> Plan:
        if state.target is not None and state.target != path:
            raise ValueError(f"LayerMergeCallback(plan=...): the plan was made for target '{state.target}', not "
                             f"'{path}'; pass target={state.target!r}")
        return Plan.from_dict(chain, state.plan)

    def _apply(self, pl_module: pl.LightningModule, path: str, target: nn.Module, chain: Chain, plan: Plan,
               state: CompressionState, teacher: nn.Module | None) -> None:
        """Replace the target by the pruned network; remember what resume and the report need."""
        pruned = _like(prune(target, chain, plan), target)
        attach_input_spec(pruned, chain.example)
        self._teacher = teacher
        set_path(pl_module, path, pruned)
        self._original, self._target_path, self.chain, self.plan = target, path, chain, plan
        self._state = dataclasses.replace(
            state, version=STATE_VERSION, target=path, plan=plan.to_dict(), inputs=input_spec(chain.example),
            budget=self.budget if state.budget is None else state.budget, method=state.method or self.method,
            merged=False, original_weights=state.original_weights or weights_fingerprint(target))
        if self._monitor is None and state.monitor and self.monitor in (None, state.monitor):
            # A known plan (plan= or a checkpoint) carries the metric it was scored with.
            self._monitor = Monitor(state.monitor, state.mode or self.mode, state.training_loss)
        self._load_patch = LoadCheckpointPatch(pl_module, lambda checkpoint: self._rebuild_for(pl_module, checkpoint))
        self._active = True
        self._log_plan(pl_module)

    def _log_plan(self, pl_module: pl.LightningModule) -> None:
        st, plan = self._state, self.plan
        ratio = st.predicted_ms / st.table_original_ms if st.predicted_ms else None
        if self.verbose:
            pred = f", predicted latency {ratio:.3f}x of the original ({1 / ratio:.2f}x faster)" if ratio else ""
            rounds = "; ".join(f"predicted {c['predicted']:.3f} measured {c['measured']:.3f}" for c in self.calibration)
            origin = f" (from checkpoint {self._resumed_from})" if self._resumed_from else ""
            rank_zero_info(f"LayerMerge: {plan} on '{self._target_path}'{pred}{origin}"
                           + (f"\n  calibration (candidate vs original, side by side): {rounds}" if rounds else ""))
        metrics = {"layermerge/kept_convs": float(len(plan.kept_convs)),
                   "layermerge/kept_activations": float(len(plan.kept_activations))}
        if ratio:
            metrics.update({"layermerge/predicted_ratio": ratio, "layermerge/predicted_speedup": 1 / ratio})
        for logger in pl_module.loggers:
            logger.log_metrics(metrics, step=0)
            logger.log_hyperparams({"layermerge": {"target": self._target_path, "budget": self.budget,
                                                   "method": self.method, "segments": str(plan.keys)}})

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
            raise ValueError(_NOT_COMPRESSED)
        if state["plan"]["segments"] != self._state.plan["segments"]:
            self.plan = self._plan_from_state(self.chain, CompressionState.from_dict(state), self._target_path)
            pruned = _like(prune(self._original, self.chain, self.plan), self._original)
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
        just before Lightning's strict weight load (from the original target this callback kept,
        else from the module's own uncompressed target)."""
        self._evaluating = None

        def before(checkpoint: dict) -> None:
            state = state_from_checkpoint(checkpoint)
            if state is None:
                return
            current = get_path(pl_module, state["target"])
            # rebuild_pruned raises, naming the calls that work, if the target is compressed
            # already and this callback did not keep the original to rebuild from.
            if rebuild_pruned(pl_module, checkpoint, original=self._original) or is_compressed(current):
                self._evaluating = state["target"]

        self._load_patch = LoadCheckpointPatch(pl_module, before)

    def _evaluation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """The checkpoint is loaded: evaluate the merged (deployable) form of its network."""
        if self._load_patch is not None:
            self._load_patch.remove()
        path, self._evaluating = self._evaluating, None
        if path is None or trainer.state.fn == "fit":
            return
        net = unwrap_compressed(get_path(pl_module, path))
        record = SurgeryMeta.of(net)
        if record.merged:
            return
        training = net.training
        final, merged, _ = merge_checked(net, example_from_spec(record.inputs))
        final = _like(final.to(pl_module.device), net).train(training) if merged else net
        set_path(pl_module, path, final if self._original is None else wrap_compressed(self._original, final))
        rank_zero_info(f"LayerMerge: evaluating the checkpoint's compressed '{path}' "
                       f"({'merged' if merged else 'pruned, not merged'})")

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
        final = wrap_compressed(self._original, _like(final, pruned))
        set_path(pl_module, self._target_path, final)
        self._state.merged = merged  # checkpoints saved from now on hold the merged weights
        self.report = self._build_report(trainer, pl_module, final, merged, error)
        self._publish(trainer, self.report)
        # Done: drop the copies (teacher, sub-run module) so they do not hold memory. The user's
        # original target stays referenced: evaluating a checkpoint of this fit rebuilds from it.
        self._active = False
        self._teacher = self._runner = None

    def _build_report(self, trainer: pl.Trainer, pl_module: pl.LightningModule, final: nn.Module, merged: bool,
                      error: float) -> LayerMergeReport:
        chain, plan, st = self.chain, self.plan, self._state
        report = LayerMergeReport(
            budget=self.budget, method=self.method, target=self._target_path, num_layers=chain.num_layers,
            layer_names=[l.name for l in chain.layers], segments=plan.keys,
            kept_activations=sorted(plan.kept_activations), kept_convs=sorted(plan.kept_convs),
            irreducible=sorted(chain.irreducible), latency_settings={**settings_dict(self._report_timing()), "precision": str(trainer.precision)},
            table_original_ms=st.table_original_ms, predicted_ms=st.predicted_ms,
            params_before=count_parameters(self._original), params_after=count_parameters(final),
            monitor=st.monitor, mode=st.mode or self.mode, metric_before=st.metric_before,
            merged=merged, merge_max_error=error, calibration=list(st.calibration),
            importance=dict(st.importance or {}), table_build_s=st.table_build_s,
            table_max_spread=st.table_max_spread, load_note=st.load_note,
        )
        if trainer.is_global_zero:  # measured once, without contention between ranks
            self._measure(report, final)
            self._score_after(trainer, pl_module, report, final)
        return report

    def _report_timing(self) -> LatencySettings:
        """The settings the table was really measured with (a busy machine can move them to the
        robust ones), from this run's table or the resumed checkpoint; else the requested ones."""
        if self.latency_table is not None:
            return self.latency_table.settings
        saved = self._state.latency_settings if self._state is not None else None
        if saved:
            try:
                return LatencySettings(**saved)
            except (TypeError, ValueError):  # written by another version: time as requested
                pass
        return self._timing

    def _measure(self, report: LayerMergeReport, final: nn.Module) -> None:
        settings = self._report_timing()
        if self.verbose:
            rank_zero_info(f"LayerMerge: timing the compressed network against the original (BatchNorm folded), "
                           f"interleaved, {settings.warmup} + {settings.repeats} passes each ...")
        start = time.perf_counter()
        folded = fold_batchnorm(self._original, self.chain, share=True)
        inputs = batched_example(self.chain, settings.batch_size)
        timed = side_by_side({"original": folded, "compressed": final}, inputs, settings)
        report.measured_original_ms, report.measured_ms = timed.ms["original"], timed.ms["compressed"]
        spread = timed.spread["compressed"]
        report.measured_spread = spread if math.isfinite(spread) else None
        report.load_note = "; ".join(n for n in (report.load_note, timed.load_note) if n)
        report.latency_settings = {**settings_dict(timed.settings), "precision": report.latency_settings.get("precision")}
        if self.verbose:
            rank_zero_info(f"LayerMerge: timed in {time.perf_counter() - start:.1f} s")

    def _score_after(self, trainer: pl.Trainer, pl_module: pl.LightningModule, report: LayerMergeReport,
                     final: nn.Module) -> None:
        """Monitored metric after compression (and before, if not known), on the same held-out subset."""
        try:
            runner = self._runner or make_runner(trainer, pl_module, self._target_path, self.importance_settings)
            if self._monitor is None or report.metric_before is None:
                self._monitor, report.metric_before = runner.resolve_monitor(self._original, self.monitor, self.mode)
                report.monitor, report.mode = self._monitor.key, self._monitor.mode
            runner.monitor = self._monitor
            report.metric_after = runner.metrics(copy.deepcopy(final), training_loss=self._monitor.training_loss).get(
                self._monitor.key)
        except (TypeError, ValueError) as err:  # e.g. no map-style train loader: report without the metric
            rank_zero_warn(f"LayerMergeCallback: could not score the compressed network: {err}")

    def _publish(self, trainer: pl.Trainer, report: LayerMergeReport) -> None:
        for logger in trainer.loggers:
            logger.log_metrics(report.metrics(), step=trainer.global_step)
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)  # a collective under DDP: every rank calls it
        if not trainer.is_global_zero:
            return
        report.to_json(log_dir / "layermerge_report.json")
        report.plot(log_dir / "layermerge_report.png")
        if self.verbose:
            rank_zero_info(f"{report}\n  files: {log_dir / 'layermerge_report.png'}, {log_dir / 'layermerge_report.json'}")


_NOT_COMPRESSED = (
    "LayerMergeCallback: the checkpoint being resumed holds no LayerMerge plan (it is an uncompressed model). Load "
    "its weights into the module before fit (e.g. Module.load_from_checkpoint) and call fit without ckpt_path"
)


#: Trainer precisions that store the weights in another dtype (what gets deployed), and that dtype.
_TRUE_PRECISION_DTYPES = {"bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64", "64": "float64"}


def timing_settings(settings: LatencySettings, precision: Any) -> LatencySettings:
    """The latency settings for a trainer ``precision``.

    With a ``*-true`` precision the weights themselves are bf16/fp16/fp64, which is what gets
    deployed, so the default ``dtype="float32"`` becomes that dtype. Mixed precision keeps
    float32 weights and leaves the inference dtype a deployment choice: timed in
    ``settings.dtype`` (float32 unless you pass ``LatencySettings(dtype=...)``).
    """
    dtype = _TRUE_PRECISION_DTYPES.get(str(precision))
    if dtype is not None and settings.dtype == "float32":
        return dataclasses.replace(settings, dtype=dtype)
    return settings


def _like(net: nn.Module, reference: nn.Module) -> nn.Module:
    """``net`` in the memory format of ``reference``'s conv weights (``channels_last`` survives surgery)."""
    weights = [p for p in reference.parameters() if p.dim() == 4]
    if weights and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                       for p in weights):
        net = net.to(memory_format=torch.channels_last)
    return net


def _check_trainer(trainer: pl.Trainer, callback: LayerMergeCallback) -> None:
    if isinstance(getattr(trainer.strategy, "launcher", None), _MultiProcessingLauncher):
        raise ValueError(
            "LayerMergeCallback cannot run with a spawn-based strategy (e.g. strategy='ddp_spawn'): the worker "
            "processes rewrite the architecture, and the main process cannot load their weights into its "
            "uncompressed model. Use strategy='ddp' (run as a script) instead"
        )
    others = [cb for cb in trainer.callbacks if isinstance(cb, LayerMergeCallback) and cb is not callback]
    if others:
        raise ValueError("only one LayerMergeCallback per Trainer is supported; compress one target per fit")
