"""Lookup tables of LayerMerge: measured latency, estimated importance, and their on-disk cache."""

from lightning_layermerge.tables.cache import TableCache, fingerprint
from lightning_layermerge.tables.importance import (
    FineTune,
    ImportanceWarning,
    Score,
    build_importance_table,
    combine_shards,
    weights_fingerprint,
)
from lightning_layermerge.tables.latency import (
    LatencySettings,
    LatencyTable,
    build_latency_table,
    segment_module,
    time_module,
)

__all__ = [
    "FineTune",
    "ImportanceWarning",
    "LatencySettings",
    "LatencyTable",
    "Score",
    "TableCache",
    "build_importance_table",
    "build_latency_table",
    "combine_shards",
    "fingerprint",
    "segment_module",
    "time_module",
    "weights_fingerprint",
]
