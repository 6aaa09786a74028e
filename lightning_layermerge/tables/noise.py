"""How much of an importance table is signal: the measured noise level (torch only, no Lightning).

Every entry is ``exp(Perf(entry) - Perf(original))``, where ``Perf(entry)`` comes from a short,
seeded fine-tune scored on a finite sample. Running the *unmodified* network through the
same protocol several times (another fine-tuning seed and scoring subset each time) gives
Perf values whose spread ``sigma`` is the noise floor of the table: entries whose
``|ln I| = |Perf(entry) - Perf(original)|`` is below ``2 sigma`` cannot be told apart from
the original network, nor reliably from each other, and the solver's choice among them is
a coin toss. :func:`noise_level` counts them; :func:`warn_if_noisy` warns when they are
the majority, naming the settings that reduce the noise.
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

__all__ = ["ImportanceNoiseWarning", "NoiseLevel", "measure_null_perfs", "noise_level", "warn_if_noisy"]

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
        sigma: Sample standard deviation of Perf of the unmodified network over ``perfs``
            (same units as the table's Perf, i.e. of ``ln I``); 0 with fewer than 2 repeats.
        perfs: Perf of the unmodified network, once per repeat (fine-tuning seed + scoring subset).
        entries: Finite entries of the table.
        distinguishable: Entries with ``|ln I| > 2 sigma``.
        steps_per_entry: Optimizer steps of each entry's fine-tune (``None``: unknown).
        score_samples: Samples each entry is scored on (``None``: unknown).
        build_seconds: Wall time of the table build on this process (``None``: unknown).
    """

    sigma: float
    perfs: tuple[float, ...]
    entries: int
    distinguishable: int
    steps_per_entry: int | None = None
    score_samples: int | None = None
    build_seconds: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def share_distinguishable(self) -> float:
        """``distinguishable / entries`` (1.0 for an empty table)."""
        return self.distinguishable / self.entries if self.entries else 1.0

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly copy (for the report and the checkpoint state)."""
        out = asdict(self)
        out["perfs"] = list(self.perfs)
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
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    perfs = []
    for r in range(repeats):
        net = copy.deepcopy(model)
        trained = finetune(net, r)
        perfs.append(float(score(net if trained is None else trained, r)))
    return perfs


def noise_level(table: Mapping[Any, float], perfs: Sequence[float], *, sigmas: float = SIGMAS,
                **known: Any) -> NoiseLevel:
    """Count the entries of ``table`` that stand out of the noise measured by ``perfs``.

    Args:
        table: ``{key: importance}`` with importance ``exp(Perf - Perf(original))``;
            ``-inf`` (failed) entries are ignored.
        perfs: Perf of the unmodified network over repeats (see :func:`measure_null_perfs`),
            on the same scale as the table (divided by ``|Perf(original)|`` for a relative table).
        sigmas: Entries with ``|ln I| > sigmas * sigma`` are distinguishable.
        **known: ``steps_per_entry``, ``score_samples``, ``build_seconds``, ``extra`` to record.

    Returns:
        The :class:`NoiseLevel`.
    """
    values = [float(p) for p in perfs]
    if not all(math.isfinite(p) for p in values):
        raise ValueError(f"the unmodified network's Perf over the repeats is not finite: {values}")
    sigma = statistics.stdev(values) if len(values) >= 2 else 0.0
    logs = [math.log(v) for v in table.values() if v > 0 and math.isfinite(v)]
    distinguishable = sum(abs(x) > sigmas * sigma for x in logs)
    return NoiseLevel(sigma=sigma, perfs=tuple(values), entries=len(logs), distinguishable=distinguishable, **known)


def warn_if_noisy(level: NoiseLevel, *, below: float = WARN_BELOW, settings: str = "ImportanceSettings") -> bool:
    """Warn (:class:`ImportanceNoiseWarning`) when most entries are within ``2 sigma`` of the original.

    Returns:
        Whether it warned.
    """
    if level.entries == 0 or level.sigma == 0 or level.share_distinguishable >= below:
        return False
    warnings.warn(
        f"importance table: only {level.distinguishable} of {level.entries} entries differ from the unmodified "
        f"network by more than {SIGMAS:g} sigma (sigma = {level.sigma:.4g} of Perf, measured over "
        f"{len(level.perfs)} repeats of the unmodified network), so the solver cannot tell most segments apart. "
        f"Reduce the noise: raise {settings}.min_score_samples (score on more, e.g. validation, samples) and "
        f"{settings}.min_steps or steps (longer fine-tunes), or fraction",
        ImportanceNoiseWarning, stacklevel=2)
    return True
