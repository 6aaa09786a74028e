"""Diagnostic: ``compare.py`` with the DP maximising the summed ``ln I`` instead of the summed ``I``.

The library (like the official code) maximises ``sum I`` with ``I = exp(Perf - Perf(original))``
per segment. Every segment adds about 1 (``I <= ~1`` for a loss Perf), so plans with more
segments (more kept activations: layer pruning instead of merging) gain about 1 per extra
segment, more than most accuracy differences between entries (``1 - I`` is 0.01-0.3 here). The
additive alternative ``sum ln I = sum (Perf - Perf(original))`` (the product of the ``I``) has no
such term. This script runs ``compare.py`` unchanged except that the DP (plan and calibration
candidates) sees ``ln I``; the tables come from the same cache, the plans get their own cache
files (their key gets a suffix). It changes nothing in the library.

Run (same arguments as ``compare.py``; use ``--work`` on a copy of a compare work directory to
reuse its trained weights and tables, and ``--out`` so the committed results are not overwritten)::

    python recipes/benchmarks/objective_check.py --work /tmp/lm13/compare_lnI --out compare_lnI
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import compare  # noqa: E402

from lightning_layermerge.fit import planner  # noqa: E402


def _ln(importance: dict) -> dict:
    return {k: (v if v == -math.inf else math.log(v)) for k, v in importance.items()}


def _patch() -> None:
    solve_chain = planner.solve_chain

    def solve_chain_ln(table, importance, *args, **kwargs):
        return solve_chain(table, _ln(importance), *args, **kwargs)

    planner.solve_chain = solve_chain_ln
    # Calibration re-plans with, and picks the most important measured candidate by, the table it gets.
    calibrate = planner.calibrate

    def calibrate_ln(table, importance, *args, **kwargs):
        return calibrate(table, _ln(importance), *args, **kwargs)

    planner.calibrate = calibrate_ln
    cache_path = planner.plan_cache_path

    def cache_path_ln(*args, **kwargs):
        path = cache_path(*args, **kwargs)
        return None if path is None else path.with_name(path.stem + "-lnI.json")

    planner.plan_cache_path = cache_path_ln


if __name__ == "__main__":
    _patch()
    compare.main()
