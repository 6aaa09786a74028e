"""What the dynamic program sums over a plan's segments (no Lightning).

An importance entry is ``I = exp(Perf(segment replaced) - Perf(original))`` (the paper's Eq. 4).
The paper's DP (Eq. 5) maximises ``sum I``. Every segment adds about 1 to that sum, because
``I <= ~1``. So plans with more segments (more kept activations, i.e. removing convs rather
than merging them) gain about 1 per extra segment. That is more than the accuracy differences
between entries, which come out at ``1 - I`` of 0.01-0.3 after short fine-tunes.

``sum ln I = sum (Perf - Perf(original))`` is the additive estimate of the whole plan's Perf
change, and it has no such term. Measured on the digits ResNet and MobileNetV2 at budget 0.7
(3 importance seeds, 3 fine-tuning epochs with KD):

* ``sum I`` lost 1.4-1.7 (ResNet) and 2.8-4.5 (MobileNetV2) points.
* ``sum ln I`` lost 0.56 (ResNet, every seed) and 0.28-1.11 points (MobileNetV2).
* In both cases ``sum ln I`` ranked Depth's plan above the plan that ``sum I`` chose.

``"log"`` is therefore the default, and ``"exp"`` reproduces the paper.

**The entry protocol's own cost** (``paired``). Every entry is the pruned network *after a
short fine-tune*; the fine-tune itself moves Perf even when nothing was pruned. The table holds
that case: a *trivial* entry (one layer, its conv kept, see :func:`trivial_keys`) is the
unmodified network run through the protocol. On the Fashion-MNIST tables of
``recipes/benchmarks/compare_fashion.py`` they came out at ``ln I = -0.0054 +- 0.0028``
(ResNet-20, 19 entries) and ``-0.0066 +- 0.0023`` (MobileNetV2, 16 entries): a 30-step
fine-tune costs a converged network about 0.005 of Perf, and every segment of a plan pays it
again. Summed over a plan that is a penalty of ``0.005 x (number of segments)``, as large as the
whole estimated loss of a plan near budget 0.8, and it pushes the DP toward plans with fewer,
longer segments. ``paired=True`` compares each entry with the unmodified network *under the same
protocol*: ``ln I - offset`` with ``offset`` the mean ``ln I`` of the trivial entries, and the
trivial entries themselves set to exactly 0 (they are the unmodified network; what they differ
by is noise).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

from ..surgery.graph import Chain

__all__ = ["OBJECTIVES", "dp_values", "protocol_offset", "trivial_keys"]

#: ``"log"``: maximise ``sum ln I`` (the summed Perf change; default). ``"exp"``: ``sum I`` (the paper's Eq. 5).
OBJECTIVES = ("log", "exp")

Key = tuple[int, int, int]


def trivial_keys(chain: Chain) -> frozenset[Key]:
    """Segments whose replacement leaves the network unchanged: one layer, its conv kept."""
    return frozenset(s.key for s in chain.segments if s.j == s.i + 1 and s.convs == (s.j,))


def protocol_offset(importance: Mapping[Key, float], trivial: Collection[Key]) -> float:
    """Mean ``ln I`` of the finite trivial entries: what the entry protocol alone does to Perf
    (0.0 when the table has none)."""
    logs = [math.log(importance[k]) for k in trivial if k in importance and 0 < importance[k] < math.inf]
    return sum(logs) / len(logs) if logs else 0.0


def dp_values(importance: Mapping[Key, float], objective: str = "log", *,
              trivial: Collection[Key] = ()) -> dict[Key, float]:
    """The per-segment values the DP maximises the sum of.

    Args:
        importance: ``(i, j, k) -> I`` from :func:`~lightning_layermerge.build_importance_table`
            (``I > 0``; ``0`` or ``-inf`` marks an entry that must not be chosen).
        objective: ``"log"`` (``ln I``) or ``"exp"`` (``I`` itself).
        trivial: Keys of the entries that are the unmodified network (:func:`trivial_keys`):
            when given, every entry is read relative to them (``ln I - protocol_offset``) and
            they are set to exactly ``ln I = 0`` (the module docstring says why). Empty: the
            table as it is.

    Returns:
        ``(i, j, k) ->`` value; ``-inf`` where ``I <= 0`` under ``"log"``.

    Raises:
        ValueError: On an unknown objective.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if not trivial:
        if objective == "exp":
            return dict(importance)
        return {k: math.log(v) if v > 0 else -math.inf for k, v in importance.items()}
    offset = protocol_offset(importance, trivial)
    logs = {k: (0.0 if k in trivial else math.log(v) - offset) if v > 0 else -math.inf
            for k, v in importance.items()}
    if objective == "exp":  # I relative to the trivial entries; unusable entries stay as they were
        return {k: math.exp(logs[k]) if v > 0 else v for k, v in importance.items()}
    return logs
