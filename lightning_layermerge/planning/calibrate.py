"""Calibration: search the table budget whose plan, really measured, fits the budget (no Lightning).

The latency table adds up segments timed one by one, possibly minutes apart on a shared machine,
so its total can be off either way (load drift, cache effects, an inflated outside-the-chain
part). :func:`calibrate` measures candidate plans through a caller-given ``measure(plan)`` (the
Lightning layer times the merged candidate side by side with the BN-folded original) and moves
the table budget: down when a candidate is over the budget, up when it is more than
:data:`CALIBRATION_SLACK` under it (a looser plan keeps more of the network), by the
measured/targeted ratio until the two sides are bracketed, then by bisection. Of the candidates
that fit, the one the DP rates most important wins.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tqdm.auto import tqdm

from ..surgery.graph import Chain
from ..surgery.plan import Plan
from .chain_solve import RESOLUTIONS, reachable_floor_ms, solve_chain
from .tables.latency import LatencyTable

__all__ = ["CALIBRATION_AIM", "CALIBRATION_SLACK", "MAX_REPLANS", "Calibration", "Measure", "calibrate"]

#: Re-plans allowed when the measured candidate misses the budget.
MAX_REPLANS = 5
#: A calibrated plan may measure this far below the budget before a looser plan is tried.
CALIBRATION_SLACK = 0.1
#: Re-plans aim this far below the budget, to leave room for timing noise in later measurements.
CALIBRATION_AIM = 0.95

#: ``measure(plan)``: the candidate's latency as a fraction of the original's, optionally with the
#: spread of that measurement (``(ratio, spread)``; ``None`` when unknown).
Measure = Callable[[Plan], "float | tuple[float, float | None]"]
Key = tuple[int, int, int]


@dataclass
class Calibration:
    """The outcome of :func:`calibrate`.

    Attributes:
        plan: The chosen plan: the most important one that measured within the budget, else the
            fastest one measured.
        rounds: One record per measured candidate: ``segments``, ``measured`` ratio, its
            ``spread``, the ``table_budget_ms`` it was solved at and the table's ``predicted`` ratio.
        fits: Whether the chosen plan measured within the budget.
    """

    plan: Plan
    rounds: list[dict[str, Any]] = field(default_factory=list)
    fits: bool = True

    @property
    def measured(self) -> float:
        """The chosen plan's measured ratio."""
        return next(r["measured"] for r in self.rounds if r["segments"] == self.plan.keys)


def calibrate(table: LatencyTable, importance: Mapping[Key, float], chain: Chain, plan: Plan, budget_ms: float,
              *, budget: float, method: str, measure: Measure, resolution: int = RESOLUTIONS[0],
              progress: bool = False) -> Calibration:
    """Measure ``plan`` and up to :data:`MAX_REPLANS` re-plans; keep the best one that fits ``budget``.

    Args:
        table / importance: The tables ``plan`` was solved on.
        chain: The traced chain.
        plan: The DP's plan at ``budget_ms``: the first candidate.
        budget_ms: The table budget ``plan`` was solved at.
        budget: The target, as a fraction of the original latency.
        method: The solve method (``"layermerge"``, ``"layeronly"``, ``"depth"``).
        measure: ``plan -> ratio`` or ``plan -> (ratio, spread)`` (see :data:`Measure`).
        resolution: The DP resolution to re-plan at.
        progress: Show a progress bar.
    """
    floor, ceiling = reachable_floor_ms(table, chain, method), table.chain_ms * 2
    fits, over = 0.0, math.inf  # largest table budget known to fit / smallest known not to
    tried: dict[tuple, float] = {}
    rounds: list[dict[str, Any]] = []
    bar = tqdm(total=1 + MAX_REPLANS, desc="calibration (timed candidates)", unit="plan", disable=not progress)
    for _ in range(1 + MAX_REPLANS):
        ratio, spread = _measured(measure, plan)
        bar.update()
        bar.set_postfix(measured=f"{ratio:.3f}", budget=budget)
        tried[tuple(plan.keys)] = ratio
        rounds.append({"segments": plan.keys, "measured": ratio, "spread": spread, "table_budget_ms": budget_ms,
                       "predicted": table.predicted_ms(plan.keys) / table.total_ms})
        if ratio <= budget:
            fits = max(fits, budget_ms)
            if ratio >= (1 - CALIBRATION_SLACK) * budget:
                break
        else:
            over = min(over, budget_ms)
        bracketed = bool(fits) and over < math.inf
        if bracketed:
            budget_ms = (fits + over) / 2
        else:
            budget_ms = min(max(budget_ms * CALIBRATION_AIM * budget / ratio, floor), ceiling)
        found = _untried_plan(table, importance, chain, method, resolution, budget_ms, tried,
                              grow=ratio <= budget, bracketed=bracketed, bounds=(floor, ceiling))
        if found is None:
            break
        plan, budget_ms = found
    bar.close()
    return _choose(chain, importance, tried, budget, rounds)


def _measured(measure: Measure, plan: Plan) -> tuple[float, float | None]:
    """``measure(plan)`` as ``(ratio, spread)``."""
    result = measure(plan)
    ratio, spread = result if isinstance(result, tuple) else (result, None)
    return float(ratio), spread


def _choose(chain: Chain, importance: Mapping[Key, float], tried: dict[tuple, float], budget: float,
            rounds: list[dict[str, Any]]) -> Calibration:
    """The most important measured plan within the budget (ties: the faster); else the fastest."""
    within = [k for k, r in tried.items() if r <= budget]
    if not within:
        best = min(tried, key=tried.get)
        return Calibration(Plan.from_segments(chain, list(best)), rounds, fits=False)
    best = max(within, key=lambda k: (sum(importance[s] for s in k), -tried[k]))
    return Calibration(Plan.from_segments(chain, list(best)), rounds, fits=True)


def _untried_plan(table: LatencyTable, importance: Mapping[Key, float], chain: Chain, method: str, resolution: int,
                  budget_ms: float, tried: dict, *, grow: bool, bracketed: bool,
                  bounds: tuple[float, float]) -> tuple[Plan, float] | None:
    """The DP's plan at ``budget_ms``; while unbracketed, the budget keeps moving (x1.15 per
    step, no measurement) until the DP picks a plan not timed yet. ``None``: nothing new."""
    for _ in range(32):
        try:
            keys = tuple(solve_chain(table, importance, chain, budget_ms, method, resolution=resolution).segments)
        except ValueError:  # a re-plan budget below what the DP can reach: nothing new here
            return None
        if keys not in tried:
            return Plan.from_segments(chain, list(keys)), budget_ms
        moved = min(max(budget_ms * (1.15 if grow else 1 / 1.15), bounds[0]), bounds[1])
        if bracketed or moved == budget_ms:
            return None
        budget_ms = moved
    return None
