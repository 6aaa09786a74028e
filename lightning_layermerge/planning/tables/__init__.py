"""Lookup tables of LayerMerge: measured latency, estimated importance, and their on-disk cache."""

from lightning_layermerge.planning.tables.cache import TableCache, fingerprint
from lightning_layermerge.planning.tables.importance import (
    FineTune,
    ImportanceWarning,
    Score,
    build_importance_table,
    combine_shards,
    weights_fingerprint,
)
from lightning_layermerge.planning.tables.latency import (
    LatencyLoadError,
    LatencyLoadWarning,
    LatencySettings,
    LatencyTable,
    Timers,
    build_latency_table,
    probe_load,
    segment_module,
    time_module,
)

__all__ = [
    "FineTune",
    "ImportanceWarning",
    "LatencyLoadError",
    "LatencyLoadWarning",
    "LatencySettings",
    "LatencyTable",
    "Score",
    "TableCache",
    "Timers",
    "build_importance_table",
    "build_latency_table",
    "combine_shards",
    "fingerprint",
    "probe_load",
    "segment_module",
    "time_module",
    "weights_fingerprint",
]
