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
"""

from __future__ import annotations

import math
from collections.abc import Mapping

__all__ = ["OBJECTIVES", "dp_values"]

#: ``"log"``: maximise ``sum ln I`` (the summed Perf change; default). ``"exp"``: ``sum I`` (the paper's Eq. 5).
OBJECTIVES = ("log", "exp")

Key = tuple[int, int, int]


def dp_values(importance: Mapping[Key, float], objective: str = "log") -> dict[Key, float]:
    """The per-segment values the DP maximises the sum of.

    Args:
        importance: ``(i, j, k) -> I`` from :func:`~lightning_layermerge.build_importance_table`
            (``I > 0``; ``0`` or ``-inf`` marks an entry that must not be chosen).
        objective: ``"log"`` (``ln I``) or ``"exp"`` (``I`` itself).

    Returns:
        ``(i, j, k) ->`` value; ``-inf`` where ``I <= 0`` under ``"log"``.

    Raises:
        ValueError: On an unknown objective.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {list(OBJECTIVES)}, got {objective!r}")
    if objective == "exp":
        return dict(importance)
    return {k: math.log(v) if v > 0 else -math.inf for k, v in importance.items()}
