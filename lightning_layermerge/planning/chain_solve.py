"""Solving on a traced chain's tables: the method-aware solve, the reachable floor, and the DP
resolution that reaches a budget (torch only, no Lightning).

:func:`~lightning_layermerge.planning.solve.solve` works on bare tables. On a real chain the
Depth baseline needs one more rule: it keeps every conv, so a pair ``(i, j)`` whose segments must
all drop a conv (a strided conv followed by a ``k > 1`` conv) is no candidate at all, and both
tables are filtered to the pairs that have an all-convs-kept segment (``Chain.all_kept_kernels``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from ..surgery.graph import Chain
from .solve import Solution, min_latency, solve
from .tables.latency import LatencyTable

__all__ = ["RESOLUTIONS", "fastest_importance", "reachable_floor_ms", "resolution_for", "smallest_budget",
           "solve_chain"]

Key = tuple[int, int, int]

#: Discretisation units of the DP budget, coarse to fine. Rounding every segment up costs at
#: most one unit per segment, so a budget just above the reachable floor needs a finer grid;
#: the planner takes the first resolution at which the budget is feasible.
RESOLUTIONS = (1000, 4000, 16000, 64000)


def _method_tables(table: LatencyTable, importance: Mapping[Key, float], chain: Chain,
                   method: str) -> tuple[dict, dict, dict | None]:
    """Latency and importance entries ``method`` may use on ``chain``, and Depth's kernel map."""
    if method != "depth":
        return dict(table.entries), dict(importance), None
    kept = chain.all_kept_kernels()
    # solve() rejects a Depth kernel map that lacks pairs present in the table, so pairs without
    # an all-kept segment leave both tables.
    entries = {key: v for key, v in table.entries.items() if key[:2] in kept}
    return entries, {key: v for key, v in importance.items() if key[:2] in kept}, kept


def solve_chain(table: LatencyTable, importance: Mapping[Key, float], chain: Chain, budget_ms: float,
                method: str, *, resolution: int = RESOLUTIONS[0]) -> Solution:
    """:func:`solve` on ``chain``'s tables; Depth gets the kernel its all-convs-kept segments really have.

    Raises:
        ValueError: As :func:`solve` (bad method, budget below what the DP can reach).
    """
    entries, scores, kept = _method_tables(table, importance, chain, method)
    return solve(entries, scores, chain.num_layers, budget_ms, method, all_kept_kernel=kept, resolution=resolution)


def reachable_floor_ms(table: LatencyTable, chain: Chain, method: str) -> float:
    """Smallest chain latency (ms, by the table) any plan of ``method`` can have: below it no budget works."""
    entries, _, kept = _method_tables(table, {}, chain, method)
    return min_latency(entries, chain.num_layers, method, all_kept_kernel=kept)


def fastest_importance(table: LatencyTable) -> dict[Key, float]:
    """Importance = -latency: the DP then picks the fastest plan within a budget."""
    return {k: -v for k, v in table.entries.items()}


def resolution_for(table: LatencyTable, chain: Chain, budget_ms: float, method: str) -> int | None:
    """The coarsest of :data:`RESOLUTIONS` at which the DP finds any plan within ``budget_ms``
    (``None``: none does, the budget is too close to or below the floor)."""
    fastest = fastest_importance(table)
    for resolution in RESOLUTIONS:
        try:
            solve_chain(table, fastest, chain, budget_ms, method, resolution=resolution)
            return resolution
        except ValueError:
            continue
    return None


def smallest_budget(table: LatencyTable, chain: Chain, method: str) -> float:
    """The smallest budget fraction of the original latency, in steps of 0.001, that the DP can
    solve (rounding included): the value an error message can tell the user to raise a budget to."""
    exact = (table.outside_ms + reachable_floor_ms(table, chain, method)) / table.total_ms
    fraction = math.ceil(exact * 1000 - 1e-9) / 1000
    while fraction < 1 and resolution_for(table, chain, table.budget_for(fraction), method) is None:
        fraction = round(fraction + 0.001, 3)
    return min(fraction, 1.0)
