"""Planning (torch only, no Lightning): what to keep and merge, and how fast the result runs.

The latency table (:func:`build_latency_table`) times every mergeable segment of a chain, the
importance table (:func:`build_importance_table`) scores it, and :func:`solve` picks the plan
of highest importance within a latency budget (:func:`solve_chain` on a traced chain, with
:func:`reachable_floor_ms` the fastest any plan can be); :func:`calibrate` re-plans against
real measurements of the candidates. :class:`LayerMergeReport` records the outcome.
Planning builds on :mod:`lightning_layermerge.surgery` and never imports Lightning.
"""

from .calibrate import Calibration, calibrate
from .chain_solve import reachable_floor_ms, solve_chain
from .objective import OBJECTIVES, dp_values
from .report import LayerMergeReport
from .side_by_side import SideBySide, measure_side_by_side, side_by_side
from .solve import Solution, solve
from .tables.importance import build_importance_table
from .tables.latency import LatencySettings, LatencyTable, Timers, build_latency_table

__all__ = [
    "OBJECTIVES", "Calibration", "LatencySettings", "LatencyTable", "LayerMergeReport", "SideBySide", "Solution",
    "Timers", "build_importance_table", "build_latency_table", "calibrate", "dp_values", "measure_side_by_side",
    "reachable_floor_ms", "side_by_side", "solve", "solve_chain",
]
