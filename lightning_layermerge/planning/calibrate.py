"""Calibration: search the table budget whose plan, really measured, fits the budget (no Lightning).

The latency table adds up segments timed one by one, possibly minutes apart on a shared machine,
so its total can be off either way (load drift, cache effects, an inflated outside-the-chain
part). :func:`calibrate` measures candidate plans through a caller-given ``measure(plan)`` (the
Lightning layer times the merged candidate side by side with the BN-folded original) and moves
the table budget: down when a candidate is over the budget (by the measured / targeted ratio),
up when it is more than :data:`CALIBRATION_SLACK` under it (a looser plan keeps more of the
network; to where the table's prices, corrected by the measured / predicted ratio of the
candidates so far, meet the budget), until the two sides are bracketed, then by bisection. A
looser candidate is timed only while its corrected prediction fits the budget (otherwise timing it
would only confirm that it does not). Of the candidates that fit, the one the DP rates most
important wins.
"""

from __future__ import annotations

import math
import statistics
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
        elif ratio <= budget:  # looser: where the table, corrected by what was measured, meets the aim
            aim = CALIBRATION_AIM * budget / _correction(rounds)
            budget_ms = min(max(aim * table.total_ms - table.outside_ms, floor), ceiling)
        else:
            budget_ms = min(max(budget_ms * CALIBRATION_AIM * budget / ratio, floor), ceiling)
        found = _untried_plan(table, importance, chain, method, resolution, budget_ms, tried,
                              grow=ratio <= budget, bracketed=bracketed, bounds=(floor, ceiling))
        if found is not None and ratio <= budget:
            found = _looser_that_may_fit(table, importance, chain, method, resolution, found, tried,
                                         rounds, budget=budget, low_ms=fits)
        if found is None:
            break
        plan, budget_ms = found
    bar.close()
    return _choose(chain, importance, tried, budget, rounds)


def _looser_that_may_fit(table: LatencyTable, importance: Mapping[Key, float], chain: Chain, method: str,
                         resolution: int, found: tuple[Plan, float], tried: dict[tuple, float],
                         rounds: list[dict[str, Any]], *, budget: float, low_ms: float) -> tuple[Plan, float] | None:
    """``found`` if it may fit the budget (:func:`_expected`), else the DP's plan at the largest
    table budget between ``low_ms`` (known to fit) and ``found``'s that may; ``None`` if none.

    The re-plan budget moves in steps, and a step can land past a plan that would fit; bisection
    on the table budget, with no measurement, finds it. A plan already measured counts as what it
    measured.
    """
    plan, high_ms = found
    if _expected(table, plan, rounds) <= budget:
        return found
    low = low_ms
    for _ in range(16):
        mid = (low + high_ms) / 2
        try:
            keys = tuple(solve_chain(table, importance, chain, mid, method, resolution=resolution).segments)
        except ValueError:  # below what the DP can reach
            low = mid
            continue
        candidate = Plan.from_segments(chain, list(keys))
        if keys in tried:
            low, high_ms = (mid, high_ms) if tried[keys] <= budget else (low, mid)
        elif _expected(table, candidate, rounds) > budget:
            high_ms = mid
        else:
            return candidate, mid
    return None


def _expected(table: LatencyTable, plan: Plan, rounds: list[dict[str, Any]]) -> float:
    """``plan``'s predicted ratio corrected by how the candidates measured so far compared with theirs.

    A looser candidate is only worth timing if it may fit: when the first plan measures far under
    the budget because the DP had nothing between it and the budget (the table was right), the next
    plan is priced over the budget and would measure over it too. The correction is the median
    measured / predicted ratio of the rounds so far, so a table that prices too high still lets
    calibration try the looser plans it over-prices.
    """
    return table.predicted_ms(plan.keys) / table.total_ms * _correction(rounds)


def _correction(rounds: list[dict[str, Any]]) -> float:
    """Median measured / predicted ratio of the candidates measured so far (1 if none is priced)."""
    corrections = [r["measured"] / r["predicted"] for r in rounds if r["predicted"] > 0 and r["measured"] > 0]
    return statistics.median(corrections) if corrections else 1.0


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
