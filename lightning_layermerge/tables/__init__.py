"""Lookup tables of LayerMerge: measured latency, estimated importance, and their on-disk cache."""

from lightning_layermerge.tables.cache import TableCache, fingerprint

__all__ = ["TableCache", "fingerprint"]
