"""The latency settings for a trainer's precision: what is timed is what gets deployed."""

from __future__ import annotations

import dataclasses
from typing import Any

from ..planning.tables.latency import LatencySettings

__all__ = ["timing_settings"]

#: Trainer precisions that store the weights in another dtype (what gets deployed), and that dtype.
_TRUE_PRECISION_DTYPES = {"bf16-true": "bfloat16", "16-true": "float16", "64-true": "float64", "64": "float64"}


def timing_settings(settings: LatencySettings, precision: Any) -> LatencySettings:
    """The latency settings for a trainer ``precision``.

    With a ``*-true`` precision the weights themselves are bf16/fp16/fp64, which is what gets
    deployed, so the default ``dtype="float32"`` becomes that dtype. Mixed precision keeps
    float32 weights and leaves the inference dtype a deployment choice: timed in
    ``settings.dtype`` (float32 unless you pass ``LatencySettings(dtype=...)``).
    """
    dtype = _TRUE_PRECISION_DTYPES.get(str(precision))
    if dtype is not None and settings.dtype == "float32":
        return dataclasses.replace(settings, dtype=dtype)
    return settings
