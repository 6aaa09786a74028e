"""Quiet sub-trainer runs for the importance table (Lightning glue, used by the callback).

The importance of a segment (the paper's Eq. 4) is measured by fine-tuning a copy of the
user's LightningModule whose target submodule has only that segment replaced, for a few
steps on a random subset of the training data, and scoring it on a second, disjoint subset.
Each run uses a separate, silent ``Trainer`` (no logger, checkpointing, progress bar or
outer callbacks) on a deep copy of the module, inside ``isolate_rng``, so the user's module,
trainer and random state are untouched.

Perf is the metric of :class:`~lightning_layermerge.fit.importance_settings.Monitor`.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import traceback
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.apply_func import move_data_to_device
from lightning.pytorch.utilities.model_helpers import is_overridden
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from lightning.pytorch.utilities.seed import isolate_rng
from torch import nn
from torch.utils.data import DataLoader, Subset

from ..planning.bn_recalibration import default_forward, recalibrate_batchnorm
from .distill import Distillation, DistillationPatch, frozen_teacher
from .head_probe import ProbeUnsupported, headroom, probe_head
from ..surgery.graph import Chain, Segment
from ..surgery.plan import Plan
from ..surgery.prune import prune
from ..planning.tables.noise import measure_null_perfs

from .importance_settings import (MIN_SCORE_SAMPLES, MIN_STEPS, TRAIN_LOSS_KEY, VAL_LOSS_KEYS, ImportanceSettings,
                                  Monitor)
from .paths import get_path, set_path
from .subsets import Subsets, check_loader, draw_subsets, indexable

# The settings, subsets and attribute paths were defined here before they got modules of their
# own; they stay importable from this module, where existing code looks for them.
__all__ = [
    "MIN_SCORE_SAMPLES", "MIN_STEPS", "TRAIN_LOSS_KEY", "VAL_LOSS_KEYS", "ImportanceSettings", "Monitor", "SubRunner",
    "Subsets", "check_loader", "draw_subsets", "get_path", "quiet", "set_path",
]


# ---------------------------------------------------------------------- quiet runs


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence Lightning's info logs and all warnings for the duration of a sub-run."""
    names = ("lightning.pytorch", "lightning.fabric", "pytorch_lightning", "lightning_fabric")
    loggers = [logging.getLogger(n) for n in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _entry_seed(seed: int, seg: Segment | None) -> int:
    key = (-1, -1, -1) if seg is None else seg.key
    return (seed * 1_000_003 + key[0] * 10_007 + key[1] * 101 + key[2]) % (2**31)


def _training_loss_step(module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
    """``validation_step`` stand-in: the class's ``training_step`` loss, logged."""
    if not module.automatic_optimization:
        raise TypeError(
            "the module uses manual optimization and has no validation loss to score with (its training_step steps "
            "the optimizers); log a metric in validation_step (e.g. self.log('val_loss', ...)) and pass monitor="
        )
    out = type(module).training_step(module, batch, batch_idx)
    loss = out.get("loss") if isinstance(out, Mapping) else out
    if not isinstance(loss, torch.Tensor):
        raise TypeError(
            "the module has no validation loss to score with, and training_step did not return a loss tensor; "
            "log a metric in validation_step and pass monitor="
        )
    module.log(TRAIN_LOSS_KEY, loss.detach(), on_step=False, on_epoch=True)


def _user_frame(err: BaseException) -> str:
    """`` (at file:line in function)`` for the innermost frame of ``err`` outside torch, Lightning and
    this package; empty if there is none."""
    import lightning

    skip = {Path(m.__file__).parent for m in (torch, lightning)}
    skip.add(Path(__file__).parent)
    for frame in reversed(traceback.extract_tb(err.__traceback__)):
        path = Path(frame.filename)
        if not any(root in path.parents for root in skip):
            return f" (at {frame.filename}:{frame.lineno} in {frame.name})"
    return ""


def _training_forward(module: pl.LightningModule, batch: Any) -> None:
    """One forward through the module's own ``training_step`` (BatchNorm re-estimation; no gradient).

    The batch is moved to the module's device first. ``training_step`` is used rather than
    ``forward`` because it is what feeds the target during training (``forward`` may not be
    defined, or may take other inputs). With manual optimization (a ``training_step`` that
    steps its optimizers) ``module(batch[0])`` is used instead.
    """
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    batch = move_data_to_device(batch, device)
    if not module.automatic_optimization:  # its training_step steps optimizers itself: plain forward
        default_forward(module, batch)
        return
    type(module).training_step(module, batch, 0)


def _sgd_cosine(module: pl.LightningModule, lr: float, steps: int) -> dict:
    """The paper's fine-tuning optimizer: SGD with momentum and a per-step cosine schedule."""
    opt = torch.optim.SGD(module.parameters(), lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class SubRunner:
    """Fine-tunes and scores candidate targets in quiet sub-trainers.

    Args:
        module: The user's LightningModule (copied once here; never modified).
        target_path: Attribute path of the target submodule.
        loader: The training DataLoader (subsets are drawn from its dataset).
        settings: The importance settings.
        accelerator / devices / precision: What each sub-trainer runs on (the outer
            trainer's device, one device per process).
        val_loader: The module's validation DataLoader, if any (scoring uses it when
            ``settings.score_on == "val"`` and it is a DataLoader over a map-style dataset).
    """

    def __init__(self, module: pl.LightningModule, target_path: str, loader: DataLoader,
                 settings: ImportanceSettings, *, accelerator: str = "cpu", devices: Any = 1,
                 precision: Any = "32-true", val_loader: Any = None) -> None:
        self.target_path = target_path
        self.settings = settings
        self.loader = loader
        self.trainer_kwargs = {"accelerator": accelerator, "devices": devices, "precision": precision}
        self.batch_size = settings.batch_size or loader.batch_size or 32
        self.val_loader = val_loader if settings.score_on == "val" and indexable(val_loader) else None
        val_size = len(self.val_loader.dataset) if self.val_loader is not None else None
        self.subsets = draw_subsets(len(loader.dataset), val_size, settings, self.batch_size)
        self.train_idx, self.score_idx = self.subsets.train, self.subsets.score
        self.shell = self._shell(module)
        self.teacher = frozen_teacher(get_path(module, target_path)) if settings.kd_alpha > 0 else None
        self.monitor: Monitor | None = None
        self.first_error: BaseException | None = None
        #: The method in use: ``settings.method``, or ``"finetune"`` once the probe proved inapplicable.
        self.method = settings.method
        #: Perf of the blind head (the probe's floor, set by ``check_finetune``; see ``head_probe.headroom``).
        self.blind_perf: float | None = None

    def _shell(self, module: pl.LightningModule) -> pl.LightningModule:
        """A copy of ``module`` without its target (so the target is not copied needlessly)."""
        target = get_path(module, self.target_path)
        set_path(module, self.target_path, nn.Identity())
        try:
            return copy.deepcopy(module)
        finally:
            set_path(module, self.target_path, target)

    def with_target(self, target: nn.Module) -> pl.LightningModule:
        """A fresh copy of the user's module whose target is ``target`` (not copied)."""
        module = copy.deepcopy(self.shell)
        set_path(module, self.target_path, target)
        return module

    # ------------------------------------------------------------------ loaders

    def _subset_loader(self, indices: list[int], *, shuffle: bool, seed: int, val: bool = False) -> DataLoader:
        base = self.val_loader if val else self.loader
        # drop_last avoids a 1-sample batch, which BatchNorm cannot train on.
        return DataLoader(Subset(base.dataset, indices), batch_size=self.batch_size, shuffle=shuffle,
                          drop_last=shuffle and len(indices) >= self.batch_size, collate_fn=base.collate_fn,
                          num_workers=base.num_workers, pin_memory=base.pin_memory,
                          generator=torch.Generator().manual_seed(seed) if shuffle else None)

    @property
    def steps(self) -> int:
        """Optimizer steps per entry through the network: 0 for the probe; else ``settings.steps``, else one
        epoch over the subset, at least ``min_steps``."""
        if self.method == "probe":
            return 0
        if self.settings.steps is not None:
            return self.settings.steps
        n = len(self.train_idx)
        return max(1, self.settings.min_steps, n // self.batch_size if n >= self.batch_size else 1)

    @property
    def bn_batches(self) -> int:
        """BatchNorm re-estimation batches per entry: ``settings.bn_batches``, or the method in use's default."""
        return self.settings.bn_batches_for(self.method)

    @property
    def score_samples(self) -> int:
        """Samples each entry is scored on."""
        return len(self.score_idx)

    def _trainer(self, **kwargs: Any) -> pl.Trainer:
        return pl.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                          enable_model_summary=False, num_sanity_val_steps=0, callbacks=[],
                          **self.trainer_kwargs, **kwargs)

    # ------------------------------------------------------------------ the two callables

    def finetune(self, target: nn.Module, seg: Segment | None = None, repeat: int = 0) -> nn.Module:
        """Fine-tune (or probe) ``target`` in place inside a copy of the module; returns it.

        Matches ``tables.importance.FineTune``. BatchNorm statistics are re-estimated first
        (``bn_batches``), then the head probe runs (:mod:`.head_probe`), or
        ``settings.steps`` optimizer steps (with distillation from the original target if
        ``settings.kd_alpha > 0``). ``repeat``
        changes the seed (noise-level repeats of the unmodified network). The first
        exception is remembered (the importance builder turns failures into ``-inf``
        entries with a warning).
        """
        try:
            return self._finetune(target, self.steps, _entry_seed(self.settings.seed + 1_000 * repeat, seg))
        except Exception as err:
            self.first_error = self.first_error or err
            raise

    def _finetune(self, target: nn.Module, steps: int, seed: int) -> nn.Module:
        """BatchNorm re-estimation (``bn_batches``), then the head probe or ``steps``
        optimizer steps on the fine-tuning subset, inside a fresh copy of the module; returns the target."""
        module = self.with_target(target)
        if self.settings.lr is not None:
            module.configure_optimizers = lambda: _sgd_cosine(module, self.settings.lr, steps)
        loader = self._subset_loader(self.train_idx, shuffle=True, seed=seed)
        with quiet(), isolate_rng():
            torch.manual_seed(seed)
            if self.bn_batches:
                recalibrate_batchnorm(module, loader, self.bn_batches, forward=_training_forward)
            if self.method == "probe":
                probe_head(module, self.target_path, loader, self.settings.probe_weight_decay)
            elif steps > 0:
                self._fit(module, loader, steps)
        return get_path(module, self.target_path)

    def check_finetune(self, target: nn.Module) -> None:
        """The head probe, or one optimizer step of the module's own training setup, on a copy of ``target``.

        Run before the importance table, so an error in the module's ``configure_optimizers``
        or ``training_step`` under a sub-run stops the fit at once, with the cause and the
        fix, instead of failing every entry. If the probe does not apply to this module
        (:class:`~lightning_layermerge.fit.head_probe.ProbeUnsupported`), it warns with the
        reason and switches to fine-tuning (``method == "finetune"``) before checking that.

        Raises:
            ValueError: The sub-run failed; the message names the first error and where in
                the user's code it was raised.
        """
        if self.method == "probe":
            if self.monitor is None:  # the blind head is scored with it
                raise RuntimeError("call resolve_monitor() before check_finetune()")
            try:
                self._finetune(copy.deepcopy(target), 0, _entry_seed(self.settings.seed, None))
                self.blind_perf = self._blind_perf(target)
                return
            except Exception as err:  # the fine-tune's own check below reports real errors
                self.method = "finetune"
                reason = err if isinstance(err, ProbeUnsupported) else (
                    f"training_step failed outside a Trainer: {type(err).__name__}: {err}{_user_frame(err)}")
                rank_zero_warn(
                    f"LayerMergeCallback: ImportanceSettings(method='probe') does not apply to "
                    f"{type(self.shell).__name__}: {reason}. Each importance entry is fine-tuned instead "
                    f"({self.steps} steps); pass ImportanceSettings(method='finetune') to choose that and silence "
                    "this warning")
        try:
            self._finetune(copy.deepcopy(target), 1, _entry_seed(self.settings.seed, None))
        except Exception as err:
            raise ValueError(self.failure_message(err)) from err

    def _blind_perf(self, target: nn.Module) -> float:
        """Perf of ``target`` with its head's weight at zero and its bias refit: the probe's floor."""
        module = self.with_target(copy.deepcopy(target))
        loader = self._subset_loader(self.train_idx, shuffle=True, seed=self.settings.seed)
        with quiet(), isolate_rng():
            probe_head(module, self.target_path, loader, 0.0, blind=True)
        return self._raw_score(get_path(module, self.target_path), 0)

    def failure_message(self, err: BaseException) -> str:
        """What failed in a sub-run, where in the user's code, and what to pass instead."""
        where = _user_frame(err)
        if self.method == "probe":
            return (f"LayerMergeCallback: the importance head probe failed in the module's own code: "
                    f"{type(err).__name__}: {err}{where}. Each importance entry re-estimates BatchNorm statistics and "
                    f"refits the classifier head through a copy of the module's training_step (no Trainer, "
                    f"{len(self.train_idx)} training samples, batch size {self.batch_size}); make training_step run "
                    "on such a copy, or pass ImportanceSettings(method='finetune') to fine-tune each entry in a "
                    "Trainer instead")
        fix = ("the failure is in training_step (the optimizer is already ImportanceSettings(method='finetune', "
               "lr=...)'s SGD); make it run on a subset batch" if self.settings.lr is not None else
               "if configure_optimizers needs something a short run cannot give, pass "
               "LayerMergeCallback(importance=ImportanceSettings(method='finetune', lr=...)) to fine-tune each entry "
               "with SGD + cosine decay at that learning rate instead (e.g. lr=0.01)")
        return (f"LayerMergeCallback: a short importance fine-tuning run failed in the module's own code: "
                f"{type(err).__name__}: {err}{where}. Each importance entry fine-tunes a copy of the module in a "
                f"separate Trainer (max_steps={self.steps}, max_epochs="
                f"{math.ceil(self.steps / max(1, len(self.train_idx) // self.batch_size))}, "
                f"{len(self.train_idx)} training samples, batch size {self.batch_size}, no datamodule); {fix}")

    def recalibrate(self, target: nn.Module, batches: int | None = None) -> int:
        """Re-estimate the BatchNorm statistics of ``target`` (in place) through the module's
        ``training_step`` on training batches; e.g. for the pruned network before the user's
        fine-tuning. ``batches``: default ``settings.bn_batches``, else 8. Returns the
        number of batches used (0: no BatchNorm)."""
        module = self.with_target(target)
        loader = self._subset_loader(self.train_idx, shuffle=True, seed=self.settings.seed)
        with quiet(), isolate_rng(), torch.no_grad():
            torch.manual_seed(self.settings.seed)
            return recalibrate_batchnorm(module, loader, batches or self.bn_batches or 8,
                                         forward=_training_forward)

    def _fit(self, module: pl.LightningModule, loader: DataLoader, steps: int) -> None:
        """``steps`` optimizer steps, with distillation if configured, in a Trainer that looks like a
        real fit of that length: ``max_epochs`` is the whole number of subset epochs the steps span,
        so ``configure_optimizers`` code reading ``trainer.max_epochs``,
        ``estimated_stepping_batches`` or ``num_training_batches`` (e.g. ``OneCycleLR``) gets
        positive, consistent values."""
        patch = None
        if self.teacher is not None:
            kd = Distillation(alpha=self.settings.kd_alpha, temperature=self.settings.kd_temperature)
            patch = DistillationPatch(kd, self.teacher, module, get_path(module, self.target_path), log_name=None)
            patch.attach()
        # Lightning 2.6 keeps each module's mode at the start of fit: a pruned copy of a network
        # in eval() would fine-tune with frozen BatchNorm statistics (and diverge).
        module.train()
        try:
            trainer = self._trainer(max_steps=steps, max_epochs=math.ceil(steps / max(len(loader), 1)),
                                    limit_val_batches=0)
            trainer.fit(module, train_dataloaders=loader)
        finally:
            if patch is not None:
                patch.detach()

    def metrics(self, target: nn.Module, *, training_loss: bool, repeat: int = 0) -> dict[str, float]:
        """Scalar metrics logged while validating a copy of the module with ``target`` on the scoring subset.

        ``repeat > 0`` scores on another draw of the scoring subset (the same one when the
        whole scoring set is used) with other random numbers (a DDPM's timesteps and noise).
        """
        module = self.with_target(target)
        if training_loss:
            module.validation_step = lambda batch, batch_idx, *a, **k: _training_loss_step(module, batch, batch_idx)
        indices = self.subsets.score_draw(repeat, self.settings.seed)
        loader = self._subset_loader(indices, shuffle=False, seed=0, val=self.subsets.on_val)
        with quiet(), isolate_rng():
            # Every entry is scored with the same random numbers (e.g. a DDPM's timesteps and
            # noise), so their differences are not noise; a noise repeat draws others.
            torch.manual_seed(self.settings.seed + 7919 * repeat)
            trainer = self._trainer()
            trainer.validate(module, dataloaders=loader, verbose=False)
        return {k: float(v) for k, v in trainer.callback_metrics.items()
                if isinstance(v, (int, float)) or (isinstance(v, torch.Tensor) and v.numel() == 1)}

    def score(self, target: nn.Module, repeat: int = 0) -> float:
        """Perf of ``target`` (higher is better; NaN if the metric is missing). Matches ``Score``.

        For the probe, the log of its distance above the blind head's Perf
        (:func:`~lightning_layermerge.fit.head_probe.headroom`)."""
        perf = self._raw_score(target, repeat)
        if self.method != "probe" or math.isnan(perf):
            return perf
        if self.blind_perf is None:
            raise RuntimeError("call check_finetune() before scoring probe entries (it measures the blind head)")
        return headroom(perf, self.blind_perf)

    def _raw_score(self, target: nn.Module, repeat: int) -> float:
        """The monitored metric of ``target`` as Perf (higher is better; NaN if missing)."""
        if self.monitor is None:
            raise RuntimeError("call resolve_monitor() before score()")
        value = self.metrics(target, training_loss=self.monitor.training_loss, repeat=repeat).get(self.monitor.key)
        return float("nan") if value is None else self.monitor.perf(value)

    def null_perfs(self, original: nn.Module) -> list[float]:
        """Perf of the unmodified target through the entry protocol, ``settings.noise_repeats`` times."""
        if self.settings.noise_repeats < 2:
            return []
        return measure_null_perfs(original, lambda net, r: self.finetune(net, None, repeat=r),
                                  lambda net, r: self.score(net, repeat=r), self.settings.noise_repeats)

    def null_perf(self, original: nn.Module, repeat: int) -> float:
        """Perf of the unmodified target through the entry protocol with the seeds of ``repeat``."""
        return self.score(self.finetune(copy.deepcopy(original), None, repeat=repeat), repeat=repeat)

    def entry_perf(self, original: nn.Module, chain: Chain, key: tuple[int, int, int], repeat: int) -> float:
        """Perf of table entry ``key`` re-run with the seeds of ``repeat`` (NaN if the run fails)."""
        seg = chain.segment(*key)
        try:
            pruned = prune(original, chain, Plan.replacing(chain, seg))
            return self.score(self.finetune(pruned, seg, repeat=repeat), repeat=repeat)
        except Exception:  # noqa: BLE001 - a failed re-run only leaves a gap in the noise estimate
            return float("nan")

    # ------------------------------------------------------------------ monitor

    def resolve_monitor(self, original: nn.Module, monitor: str | None, mode: str) -> tuple[Monitor, float]:
        """Pick the Perf metric by scoring a copy of ``original``; returns it and the original's value.

        Raises:
            ValueError: ``monitor`` is given but never logged (the message lists what is).
        """
        seen: dict[str, float] = {}
        if is_overridden("validation_step", self.shell):
            seen = self.metrics(copy.deepcopy(original), training_loss=False)
            key = monitor if monitor is not None else next((k for k in VAL_LOSS_KEYS if k in seen), None)
            if key is not None and key in seen:
                self.monitor = Monitor(key, mode if monitor is not None else "min", False)
                return self.monitor, seen[key]
        fallback = self.metrics(copy.deepcopy(original), training_loss=True)
        key = monitor if monitor is not None else TRAIN_LOSS_KEY
        if key not in fallback:
            logged = sorted(set(seen) | set(fallback))
            raise ValueError(
                f"LayerMergeCallback(monitor={monitor!r}): this metric is never logged by validation_step or "
                f"training_step of {type(self.shell).__name__}; logged metrics are {logged}. Pass one of them "
                "(or monitor=None to use the validation loss, else the training loss)"
            )
        self.monitor = Monitor(key, mode if monitor is not None else "min", True)
        return self.monitor, fallback[key]
