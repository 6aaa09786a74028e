"""Planning (torch only, no Lightning): what to keep and merge, and how fast the result runs.

The latency table (:func:`build_latency_table`) times every mergeable segment of a chain, the
importance table (:func:`build_importance_table`) scores it, and :func:`solve` picks the plan
of highest importance within a latency budget. :class:`LayerMergeReport` records the outcome.
Planning builds on :mod:`lightning_layermerge.surgery` and never imports Lightning.
"""

from .report import LayerMergeReport
from .solve import Solution, solve
from .tables.importance import build_importance_table
from .tables.latency import LatencySettings, LatencyTable, build_latency_table

__all__ = [
    "LatencySettings", "LatencyTable", "LayerMergeReport", "Solution", "build_importance_table",
    "build_latency_table", "solve",
]
