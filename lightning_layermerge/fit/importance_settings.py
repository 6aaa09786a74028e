"""How the importance table's sub-runs train and score (:class:`ImportanceSettings`), and the Perf
metric they score with (:class:`Monitor`).

Perf (higher is better) comes from a metric the module logs, in the
``EarlyStopping``/``ModelCheckpoint`` convention (``monitor`` + ``mode``): ``-value`` for
``mode="min"``, ``value`` for ``mode="max"``. Without a ``monitor``, the validation loss is
used if ``validation_step`` logs one (:data:`VAL_LOSS_KEYS`), else the training loss
(what ``training_step`` returns) on the held-out subset, logged as :data:`TRAIN_LOSS_KEY`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..planning.objective import OBJECTIVES
from ..planning.validate import check_count, check_finite, is_int, is_real

__all__ = ["METHODS", "MIN_SCORE_SAMPLES", "MIN_STEPS", "TRAIN_LOSS_KEY", "VAL_LOSS_KEYS", "ImportanceSettings",
           "Monitor"]

#: Metric logged by the training-loss fallback scorer.
TRAIN_LOSS_KEY = "layermerge/train_loss"

#: Metric names taken as "the validation loss" when no ``monitor`` is given (first match wins).
VAL_LOSS_KEYS = ("val_loss", "val/loss", "valid_loss", "validation_loss", "val_loss_epoch", "loss/val")


#: How an entry is brought back to working order before it is scored (``ImportanceSettings.method``).
METHODS = ("probe", "finetune")
#: BatchNorm re-estimation batches when ``bn_batches`` is ``None``, per method.
BN_BATCHES = {"probe": 8, "finetune": 0}

#: Default floor of optimizer steps per importance entry (see ``ImportanceSettings.min_steps``).
MIN_STEPS = 30
#: Default floor of scoring samples per importance entry (see ``ImportanceSettings.min_score_samples``).
MIN_SCORE_SAMPLES = 1000


@dataclass(frozen=True)
class ImportanceSettings:
    """How each importance entry is estimated.

    Two methods, both scored by the module's own validation metric:

    * ``"probe"`` (default): no optimizer step through the network. The pruned network's
      BatchNorm statistics are re-estimated on ``bn_batches`` training batches, then only its
      classifier head (the last ``nn.Linear``, whose output is the network's output) is refit
      on the frozen features of the fine-tuning subset by L-BFGS on the module's training
      loss with an L2 penalty (``probe_weight_decay``), and each entry is read as the log of
      its distance above a head without features (``head_probe.headroom``). Against long
      fine-tunes it ranks entries at Spearman 0.97 / 0.89 on two digits nets (1,168 training
      images; the 30-step fine-tune: 0.99 / 0.93) and 0.92 / 0.85 on two Fashion-MNIST nets
      (fine-tune: 0.88 / 0.97), with no training epoch (forward passes only). Where the
      network has no such head (e.g. a diffusion UNet), ``training_step`` calls the network
      more than once or fails on replayed features, the table falls back to ``"finetune"``
      and warns why.
    * ``"finetune"``: the paper's Appendix C protocol, scaled (below).

    The paper fine-tunes every candidate on a random 4 % of ImageNet's training set for one
    epoch (1 % of CIFAR-10 for 50 epochs) and scores it on a disjoint subset of the same
    size. That assumes a million images: on a few thousand, 4 % is one optimizer step scored
    on a few dozen images, and the table is noise. So ``fraction`` only sets the sizes when
    the data is large; two floors apply whatever it says:

    * ``min_steps``: each entry is fine-tuned for at least this many optimizer steps (on
      ``min_steps * batch_size`` distinct training samples where the training set has them,
      else cycling over it). Unless ``steps`` is given explicitly.
    * ``min_score_samples``: each entry is scored on at least this many samples (all of them
      if the scoring set is smaller). With ``score_on="val"`` (default) and a module that has
      a validation loader, entries are scored on the validation set, which is disjoint from
      the training data and costs no training samples; otherwise on a held-out part of the
      training set.

    Scoring noise of an accuracy on n samples is about ``sqrt(p (1 - p) / n)``; 1000 samples
    keep it near 0.5 point at 95 % accuracy, small enough to separate entries a point
    apart. See ``recipes/benchmarks/results/importance_check.md`` for the measurements behind
    the floors and the other defaults.

    Attributes:
        method: ``"probe"`` or ``"finetune"`` (above).
        probe_weight_decay: Weight of the head's squared weights in the probe's loss. Nearly
            without it (1e-4) the refit separates almost any pruned network's training
            features and ranks poorly (0.62-0.76); 0.1-3 ranked alike on the measured nets.
        fraction: Size of the fine-tuning subset as a fraction of the training set (and of
            the scoring subset when scoring on training data, disjoint from the first, so
            ``fraction <= 0.5``).
        steps: Optimizer steps per entry; ``None``: one epoch over the fine-tuning subset,
            at least ``min_steps``. ``0``: no fine-tuning (BatchNorm re-estimation only).
        lr: ``None``: the module's own ``configure_optimizers``. A float: SGD (momentum 0.9)
            at this learning rate with cosine decay over the steps (the paper's choice).
        batch_size: Batch size of the sub-runs; ``None``: the training dataloader's.
        seed: Seed of the subset draw and of each entry's run (entries are reproducible and
            identical on every DDP rank).
        relative: Divide Perf by ``|Perf(original)|`` before the ``exp``, so an entry's
            importance is ``exp(-(loss - loss0) / loss0)`` for a loss: the official DDPM table.
            Use it when the metric's scale is far from 1 (a denoising loss of 0.03 would
            otherwise make every entry ~1.0 and the DP favour plans with more segments).
            Fine-tune only: the probe's entries are already read relative to a floor.
        min_steps: Floor of optimizer steps per entry when ``steps`` is ``None``.
        min_score_samples: Floor of scoring samples per entry.
        score_on: ``"val"``: score on the module's validation set when it has one (else on
            held-out training data); ``"train"``: always on held-out training data.
        bn_batches: ``None``: 8 for ``"probe"``, 0 for ``"finetune"``. Before each entry's
            fine-tune or probe, re-estimate the BatchNorm statistics of the pruned network on
            this many training batches (forward only; 0: off). Pruning shifts every later
            layer's input distribution, and stale statistics start the pruned network near
            chance. Measured: no gain once an entry gets ``min_steps`` (30) steps, which
            re-estimate the statistics anyway; the probe needs it (it trains nothing else).
        kd_alpha: Weight of knowledge distillation from the original target inside each
            entry's fine-tune (``loss + kd_alpha * KD``, :func:`~lightning_layermerge.fit.distill.kd_loss`);
            0: off.
        kd_temperature: Temperature of that distillation.
        noise_repeats: Runs of the unmodified network through the entry protocol (another
            seed and scoring subset each) to measure the table's noise level (0: not measured;
            otherwise at least 2).
        noise_entries: Table entries (spread over the importance range) also re-run
            ``noise_repeats - 1`` times: a damaged network's short fine-tune is much noisier
            than the intact one's, and only this spread tracks how well the table ranks.
        objective: What the DP maximises over a plan's segments: ``"log"`` (default), the sum
            of ``ln I``, i.e. of the entries' Perf changes; ``"exp"``, the sum of ``I`` (the
            paper's Eq. 5, which favours plans with more segments). It only changes how the
            table is read, so both share one cached table
            (:mod:`~lightning_layermerge.planning.objective`).
        paired: Read every entry relative to the unmodified network run through the same
            protocol (the table's trivial entries: one layer, its conv kept) instead of the
            original's Perf before any fine-tune, and set those entries to exactly ``ln I = 0``.
            The short fine-tune alone costs a converged network about 0.005 of Perf per entry
            (Fashion-MNIST tables), which would otherwise be charged once per segment of a plan
            and push the DP toward fewer, longer segments. Like ``objective`` it only changes how
            the table is read (one cached table for both).
    """

    method: str = "probe"
    probe_weight_decay: float = 0.3
    fraction: float = 0.04
    steps: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    seed: int = 0
    relative: bool = False
    min_steps: int = MIN_STEPS
    min_score_samples: int = MIN_SCORE_SAMPLES
    score_on: str = "val"
    bn_batches: int | None = None
    kd_alpha: float = 0.0
    kd_temperature: float = 4.0
    noise_repeats: int = 3
    noise_entries: int = 2
    objective: str = "log"
    paired: bool = True

    def __post_init__(self) -> None:
        if not is_real(self.fraction) or not 0 < self.fraction <= 0.5:
            raise ValueError(
                f"ImportanceSettings.fraction must be in (0, 0.5] (a fine-tuning subset and a disjoint "
                f"scoring subset of the same size), got {self.fraction!r}"
            )
        for name, minimum in (("steps", 0), ("batch_size", 1)):
            check_count(f"ImportanceSettings.{name}", getattr(self, name), minimum, optional=True)
        for name, minimum in (("min_steps", 0), ("min_score_samples", 1), ("noise_repeats", 0), ("noise_entries", 0)):
            check_count(f"ImportanceSettings.{name}", getattr(self, name), minimum)
        check_count("ImportanceSettings.bn_batches", self.bn_batches, 0, optional=True)
        if self.method not in METHODS:
            raise ValueError(f"ImportanceSettings.method must be one of {list(METHODS)}, got {self.method!r}")
        # The probe trains nothing but the head: options of the fine-tune would be silently ignored.
        given = [f"{n}={getattr(self, n)!r}" for n in ("steps", "lr") if getattr(self, n) is not None]
        given += [f"kd_alpha={self.kd_alpha!r}"] if self.kd_alpha else []
        given += ["relative=True"] if self.relative is True else []
        if self.method == "probe" and given:
            raise ValueError(
                f"ImportanceSettings({', '.join(given)}) configures the fine-tune of each entry, but method='probe' "
                f"(the default) trains only the classifier head; pass method='finetune' with them")
        if self.noise_repeats == 1:
            raise ValueError("ImportanceSettings.noise_repeats must be 0 (off) or >= 2 (a standard deviation)")
        if self.lr is not None and (not is_real(self.lr) or self.lr <= 0):
            raise ValueError(f"ImportanceSettings.lr must be None or a positive number, got {self.lr!r}")
        for name, positive in (("kd_alpha", False), ("kd_temperature", True), ("probe_weight_decay", False)):
            check_finite(f"ImportanceSettings.{name}", getattr(self, name), positive=positive)
        if not is_int(self.seed):
            raise ValueError(f"ImportanceSettings.seed must be an int, got {self.seed!r}")
        for name in ("relative", "paired"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ImportanceSettings.{name} must be True or False, got {getattr(self, name)!r}")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"ImportanceSettings.objective must be one of {list(OBJECTIVES)}, got {self.objective!r}")
        if self.score_on not in ("val", "train"):
            raise ValueError(f"ImportanceSettings.score_on must be 'val' or 'train', got {self.score_on!r}")

    @property
    def bn_batch_count(self) -> int:
        """BatchNorm re-estimation batches per entry: ``bn_batches``, or ``method``'s default."""
        return self.bn_batches_for(self.method)

    def bn_batches_for(self, method: str) -> int:
        """BatchNorm re-estimation batches per entry with ``method``: ``bn_batches``, or that method's
        default (the runner asks for the method in use, which is ``"finetune"`` after a fallback)."""
        return BN_BATCHES[method] if self.bn_batches is None else self.bn_batches


@dataclass(frozen=True)
class Monitor:
    """The resolved Perf metric: its name, direction, and how it is produced."""

    key: str
    mode: str
    training_loss: bool  # produced by the training-loss fallback (not by validation_step)

    def perf(self, value: float) -> float:
        """Higher-is-better Perf from a metric value."""
        return -value if self.mode == "min" else value
