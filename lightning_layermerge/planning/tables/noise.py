"""How much of an importance table is signal: the measured noise level (torch only, no Lightning).

Every entry is ``exp(Perf(entry) - Perf(original))``, where ``Perf(entry)`` comes from a short,
seeded fine-tune scored on a finite sample. Re-running networks through the same protocol
with other seeds (another fine-tuning seed and scoring draw each time) measures the noise:

* the *unmodified* network (``sigma_original``): the noise of ``Perf(original)``;
* a few *modified* networks, i.e. table entries (``sigma_entries``, pooled over them). A
  damaged network's short fine-tune is far less repeatable than the intact one's: on the
  digits nets of ``recipes/benchmarks/importance_check.py`` ``sigma_entries`` was 10 to 1000
  times ``sigma_original``, and only it tracked how well the table ranked entries.

``sigma`` is the larger of the two. Entries whose ``|ln I| = |Perf(entry) - Perf(original)|``
is below ``2 sigma`` cannot be told apart from the original network, nor reliably from each
other, and the solver's choice among them is a coin toss. :func:`noise_level` counts them;
:func:`warn_if_noisy` warns when they are the majority, naming the settings that reduce the
noise.
"""

from __future__ import annotations

import copy
import math
import statistics
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from ..validate import check_count

__all__ = [
    "ImportanceNoiseWarning", "NoiseLevel", "measure_null_perfs", "noise_level", "pick_noise_entries", "pooled_sigma",
    "warn_if_noisy",
]

#: Entries count as distinguishable from the original when ``|ln I| > SIGMAS * sigma``.
SIGMAS = 2.0
#: Warn when fewer than this share of the (finite, non-trivial) entries are distinguishable.
WARN_BELOW = 0.5


class ImportanceNoiseWarning(UserWarning):
    """Most importance entries are within the measured noise of the unmodified network."""


@dataclass(frozen=True)
class NoiseLevel:
    """The noise of an importance table and what it was built with.

    Attributes:
        sigma: ``max(sigma_original, sigma_entries)``, in the table's Perf units (of ``ln I``).
        perfs: Perf of the unmodified network, once per repeat (fine-tuning seed + scoring subset).
        entries: Finite entries of the table.
        distinguishable: Entries with ``|ln I| > 2 sigma``.
        sigma_original: Sample standard deviation of ``perfs``; 0 with fewer than 2 repeats.
        sigma_entries: Pooled sample standard deviation of Perf of the re-run entries
            (``None``: none re-run).
        entry_perfs: Perf of each re-run entry (``"(i, j, k)"``), once per repeat.
        steps_per_entry: Optimizer steps of each entry's fine-tune (``None``: unknown).
        score_samples: Samples each entry is scored on (``None``: unknown).
        build_seconds: Wall time of the table build on this process (``None``: unknown).
        method: How each entry was brought back before scoring: ``"probe"`` (head refit, no
            training step) or ``"finetune"`` (``None``: unknown).
    """

    sigma: float
    perfs: tuple[float, ...]
    entries: int
    distinguishable: int
    steps_per_entry: int | None = None
    score_samples: int | None = None
    build_seconds: float | None = None
    method: str | None = None
    sigma_original: float = 0.0
    sigma_entries: float | None = None
    entry_perfs: dict[str, list[float]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def share_distinguishable(self) -> float:
        """``distinguishable / entries`` (1.0 for an empty table)."""
        return self.distinguishable / self.entries if self.entries else 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (for the report and the checkpoint state)."""
        out = asdict(self)
        out["perfs"] = list(self.perfs)
        out["entry_perfs"] = {k: list(v) for k, v in self.entry_perfs.items()}
        out["share_distinguishable"] = self.share_distinguishable
        return out


def measure_null_perfs(model: nn.Module, finetune: Callable[[nn.Module, int], nn.Module | None],
                       score: Callable[[nn.Module, int], float], repeats: int) -> list[float]:
    """Perf of the unmodified network run through the entry protocol ``repeats`` times.

    Args:
        model: The original network (not modified: each repeat trains a deep copy).
        finetune: ``finetune(net, repeat)`` fine-tunes ``net`` like an entry would be, with
            the repeat's seed (in place, or returning the trained network).
        score: ``score(net, repeat) -> Perf`` on the repeat's scoring subset.
        repeats: Number of repeats (>= 2 for a standard deviation).

    Returns:
        One Perf per repeat.
    """
    check_count("repeats", repeats, 1)
    perfs = []
    for r in range(repeats):
        net = copy.deepcopy(model)
        trained = finetune(net, r)
        perfs.append(float(score(net if trained is None else trained, r)))
    return perfs


def pick_noise_entries(table: Mapping[Any, float], count: int) -> list[Any]:
    """``count`` entries to re-run for the noise level: evenly spread over the finite entries
    that changed the network (``0 < I < 1``) sorted by importance, excluding both ends."""
    changed = sorted((v, k) for k, v in table.items() if 0 < v < 1 and math.isfinite(v))
    if count <= 0 or not changed:
        return []
    step = len(changed) / (count + 1)
    picks = {changed[min(len(changed) - 1, int(step * (i + 1)))][1] for i in range(count)}
    return sorted(picks)


def pooled_sigma(groups: Sequence[Sequence[float]]) -> float | None:
    """Pooled sample standard deviation of several groups of repeats (``None``: no group of 2+)."""
    variances = [statistics.variance(g) for g in groups if len(g) >= 2]
    return math.sqrt(statistics.mean(variances)) if variances else None


def noise_level(table: Mapping[Any, float], perfs: Sequence[float], *, sigmas: float = SIGMAS,
                entry_perfs: Mapping[Any, Sequence[float]] | None = None, **known: Any) -> NoiseLevel:
    """Count the entries of ``table`` that stand out of the measured noise.

    Args:
        table: ``{key: importance}`` with importance ``exp(Perf - Perf(original))``;
            ``-inf`` (failed) entries are ignored.
        perfs: Perf of the unmodified network over repeats (see :func:`measure_null_perfs`),
            on the same scale as the table (divided by ``|Perf(original)|`` for a relative table).
        sigmas: Entries with ``|ln I| > sigmas * sigma`` are distinguishable.
        entry_perfs: ``{key: [Perf per repeat]}`` of re-run entries (same scale), if any.
        **known: ``steps_per_entry``, ``score_samples``, ``build_seconds``, ``method``, ``extra`` to record.

    Returns:
        The :class:`NoiseLevel`.
    """
    values = [float(p) for p in perfs if math.isfinite(p)]  # a diverged repeat has no spread to offer
    sigma_original = statistics.stdev(values) if len(values) >= 2 else 0.0
    groups = {str(tuple(k)): [float(p) for p in v if math.isfinite(p)] for k, v in (entry_perfs or {}).items()}
    sigma_entries = pooled_sigma(list(groups.values()))
    sigma = max(sigma_original, sigma_entries or 0.0)
    logs = [math.log(v) for v in table.values() if v > 0 and math.isfinite(v)]
    distinguishable = sum(abs(x) > sigmas * sigma for x in logs)
    return NoiseLevel(sigma=sigma, perfs=tuple(values), entries=len(logs), distinguishable=distinguishable,
                      sigma_original=sigma_original, sigma_entries=sigma_entries, entry_perfs=groups, **known)


def warn_if_noisy(level: NoiseLevel, *, below: float = WARN_BELOW, settings: str = "ImportanceSettings") -> bool:
    """Warn (:class:`ImportanceNoiseWarning`) when most entries are within ``2 sigma`` of the original.

    Returns:
        Whether it warned.
    """
    if level.entries == 0 or level.sigma == 0 or level.share_distinguishable >= below:
        return False
    warnings.warn(
        f"importance table: only {level.distinguishable} of {level.entries} entries differ from the unmodified "
        f"network by more than {SIGMAS:g} sigma (sigma = {level.sigma:.4g} of Perf, from re-running the "
        f"unmodified network and {len(level.entry_perfs)} entries with other seeds), so the solver cannot tell "
        f"most segments apart. "
        f"Reduce the noise: raise {settings}.min_score_samples (score on more, e.g. validation, samples) and "
        + (f"bn_batches, or pass {settings}(method='finetune') (entries fine-tuned)" if level.method == "probe" else
           f"{settings}.min_steps or steps (longer fine-tunes), or fraction"),
        ImportanceNoiseWarning, stacklevel=2)
    return True
