"""The plan cache: the (calibrated) plan of two tables, a budget and a method, on disk (no Lightning).

A repeated or resumed run whose tables come from the table cache finds its plan here too, and
so times nothing at all. The file name is a function of both tables, the budget, the method and
the calibration settings only; a file is written atomically, so an interrupted write never
leaves half a file behind.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..surgery.graph import Chain
from ..surgery.plan import Plan
from .calibrate import MAX_REPLANS
from .tables.cache import fingerprint
from .tables.latency import LatencyTable

__all__ = ["plan_cache_path", "read_cached_plan", "write_cached_plan"]

# Part of every file name: bump it when the cached plans of an older version must not be re-used.
_PLAN_FILE_VERSION = 3


def plan_cache_path(cache_dir: str | os.PathLike | None, chain: Chain, table: LatencyTable,
                    importance: Mapping[tuple[int, int, int], float], budget: float, method: str,
                    calibrated: bool) -> Path | None:
    """The cache file of the plan for these tables and settings (``None`` without a cache directory)."""
    if cache_dir is None:
        return None
    key = fingerprint([[*k, repr(v)] for k, v in sorted(table.entries.items())], repr(table.total_ms),
                      [[*k, repr(v)] for k, v in sorted(importance.items())], budget, method,
                      calibrated, MAX_REPLANS, _PLAN_FILE_VERSION)
    return Path(cache_dir) / f"plan-{chain.fingerprint}-{key[:12]}.json"


def read_cached_plan(path: Path | None) -> dict[str, Any] | None:
    """``{"segments", "calibration"}`` from ``path``; ``None`` if there is none or it is unreadable
    (the caller then plans again)."""
    if path is None or not path.is_file():
        return None
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) and "segments" in found else None


def write_cached_plan(path: Path | None, plan: Plan, calibration: list[dict[str, Any]]) -> None:
    """Write the plan and its calibration record to ``path`` atomically (nothing if ``path`` is ``None``)."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"segments": plan.keys, "calibration": calibration}))
    os.replace(tmp, path)
