"""Exact solvers for the LayerMerge surrogate problem (Algorithm 1, Eq. 8 of the paper).

The network is a chain of ``L`` layers. A *segment* ``(i, j, k)`` with ``0 <= i < j <= L``
replaces layers ``i+1..j`` by one merged layer of kernel size ``k``; a solution is a list of
segments that covers ``0..L`` in order. Given a latency table ``T`` and an importance table
``I`` keyed by segments, :func:`solve` maximises the summed importance subject to the summed
latency staying within a budget.

Three methods are offered (LayerMerge and the two baselines of the paper):

* ``"layermerge"``: Algorithm 1, every table entry is a candidate.
* ``"layeronly"``: the 0-1 knapsack of Eq. 8. Activations are untouched, so only single-layer
  segments ``(l-1, l, k)`` are candidates (``k`` = original kernel when the conv is kept,
  ``k = 1`` when it is removed, as present in the table). Solved with the same DP restricted
  to those candidates, which *is* an exact knapsack DP on the discretised latencies.
* ``"depth"``: every conv is kept and only activations are chosen, so each pair ``(i, j)``
  contributes exactly one candidate: ``k = all_kept_kernel[(i, j)]`` when that mapping is
  given, otherwise the largest ``k`` present for ``(i, j)`` (with tables keyed by merged
  kernel size, the all-convs-kept merge is the one with the largest kernel).

Discretisation rule (why it is *not* the paper's round-down): with ``u = budget / resolution``
each entry latency is rounded **up** to ``ceil(T / u - 1e-9)`` units and the capacity is
``resolution`` units. Rounding up guarantees that the true (undiscretised) latency of the
returned solution never exceeds the budget, except for float noise: the ``1e-9``-unit
tolerance absorbs values such as ``T / u = 3.0000000001`` that are meant to be exact
multiples, so the overshoot is at most ``num_segments * 1e-9 * u`` (relative ``<= L * 1e-9 /
resolution`` of the budget). The paper's round-down can return solutions that break the budget.

The price of rounding up is that the solver may miss solutions within ``u`` per segment of
the budget; raise ``resolution`` to shrink that gap. When all latencies are integer multiples
of ``u`` the answer is exactly optimal for the true problem.

Ties in importance are broken by lower true latency, then by the first candidate in sorted
``(i, j, k)`` order, so results are deterministic.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from .validate import check_int

__all__ = ["METHODS", "Solution", "min_latency", "solve"]

Entry = tuple[int, int, int]

#: Valid values of ``solve(method=...)``.
METHODS: tuple[str, ...] = ("layermerge", "layeronly", "depth")

# Tolerance (in units of u) under which T / u is taken as an exact multiple; absorbs float noise.
_UNIT_EPS = 1e-9


@dataclass(frozen=True)
class Solution:
    """Result of :func:`solve`.

    Attributes:
        segments: Chosen segments ``(i, j, k)``, covering ``0..L`` in increasing order.
        latency: Sum of the true (undiscretised) latencies of the chosen segments.
        importance: Sum of the importances of the chosen segments.
        method: The method that produced the solution.
        budget: The latency budget the solution was computed for.
    """

    segments: list[tuple[int, int, int]]
    latency: float
    importance: float
    method: str
    budget: float

    @property
    def kept_activations(self) -> list[int]:
        """Layer indices ``a`` (``0 < a < L``) whose activation is kept: the segment boundaries."""
        return [j for (_, j, _) in self.segments[:-1]]


@dataclass(frozen=True)
class _Candidate:
    """One usable table entry, with its latency rounded to units."""

    i: int
    j: int
    k: int
    latency: float
    importance: float
    units: int


def solve(
    latency: Mapping[tuple[int, int, int], float],
    importance: Mapping[tuple[int, int, int], float],
    num_layers: int,
    budget: float,
    method: str = "layermerge",
    *,
    resolution: int = 1000,
    all_kept_kernel: Mapping[tuple[int, int], int] | None = None,
) -> Solution:
    """Pick segments maximising summed importance under a latency budget.

    Args:
        latency: True latency of each legal segment ``(i, j, k)``, ``0 <= i < j <= L``.
            Must be finite and non-negative.
        importance: Importance of each segment; same keys as ``latency``. Any finite float;
            ``-inf`` (or NaN, treated as ``-inf``) marks an entry that must never be chosen.
        num_layers: ``L``, the number of layers of the chain.
        budget: Latency budget, same unit as ``latency``; finite and positive.
        method: ``"layermerge"``, ``"layeronly"`` or ``"depth"`` (see the module docstring).
        resolution: Number of discretisation units the budget is split into. Larger is more
            accurate and proportionally slower.
        all_kept_kernel: Only used by ``method="depth"``: merged kernel size of the
            all-convs-kept merge of each pair ``(i, j)``. Every pair present in the table must
            be listed. When omitted, the largest ``k`` of each pair is used.

    Returns:
        The optimal :class:`Solution` of the discretised problem. Its true latency is at most
        ``budget`` (up to the float tolerance described in the module docstring).

    Raises:
        ValueError: On invalid arguments, a table that does not cover ``0..L``, or a budget
            below the smallest achievable latency (the message names that latency).
        TypeError: On keys that are not triples of integers.
    """
    budget = _check_scalars(num_layers, budget, method, resolution)
    table = _read_tables(latency, importance, num_layers)
    candidates = _select(table, method, all_kept_kernel)
    _check_coverage(candidates, num_layers, method)
    unit = budget / resolution
    usable = [_discretise(c, unit) for c in candidates if c[4] > -math.inf]
    if not _covers(((c.i, c.j) for c in usable), num_layers):
        raise ValueError(
            f"method {method!r}: every covering of 0..{num_layers} uses an entry with importance "
            "-inf/NaN (marked never-choose); give those entries finite importances"
        )
    chosen = _dp(usable, num_layers, resolution)
    if chosen is None:
        raise ValueError(_infeasible_message(usable, num_layers, budget, method, resolution, unit))
    return Solution(
        segments=[(c.i, c.j, c.k) for c in chosen],
        latency=math.fsum(c.latency for c in chosen),
        importance=math.fsum(c.importance for c in chosen),
        method=method,
        budget=budget,
    )


def min_latency(
    latency: Mapping[tuple[int, int, int], float],
    num_layers: int,
    method: str = "layermerge",
    *,
    all_kept_kernel: Mapping[tuple[int, int], int] | None = None,
) -> float:
    """The smallest summed latency of any covering ``method`` may choose: the floor of :func:`solve`.

    A budget below it has no solution; one at or just above it may still need a higher
    ``resolution`` (rounding up costs at most one unit per segment). Arguments as in :func:`solve`.

    Raises:
        ValueError / TypeError: As :func:`solve` for the table, ``num_layers`` and ``method``.
    """
    _check_scalars(num_layers, 1.0, method, 1)
    rows = _select(_read_tables(latency, dict.fromkeys(latency, 0.0), num_layers), method, all_kept_kernel)
    _check_coverage(rows, num_layers, method)
    return _min_latency([_discretise(r, 1.0) for r in rows], num_layers, units=False)


# --------------------------------------------------------------------------- validation


def _check_scalars(num_layers: int, budget: float, method: str, resolution: int) -> float:
    """Validate the scalar arguments of :func:`solve`; return the budget as float."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; valid methods are {', '.join(METHODS)}")
    check_int("num_layers", num_layers, 1)
    check_int("resolution", resolution, 1)
    try:
        b = float(budget)
    except (TypeError, ValueError):
        raise TypeError(f"budget must be a number, got {type(budget).__name__}") from None
    if not math.isfinite(b) or b <= 0:
        raise ValueError(f"budget must be a finite positive number, got {budget!r}")
    return b


def _as_entry(key: object, num_layers: int) -> Entry:
    """Convert a table key to ``(i, j, k)`` ints, checking ``0 <= i < j <= L`` and ``k >= 1``."""
    if not isinstance(key, Sequence) or isinstance(key, str) or len(key) != 3:
        raise TypeError(f"table keys must be (i, j, k) triples of ints, got {key!r}")
    try:
        i, j, k = (operator.index(v) for v in key)
    except TypeError:
        raise TypeError(f"table keys must be (i, j, k) triples of ints, got {key!r}") from None
    if not 0 <= i < j <= num_layers:
        raise ValueError(
            f"table key {key!r} is outside 0 <= i < j <= num_layers={num_layers}; "
            "check num_layers or drop the entry"
        )
    if k < 1:
        raise ValueError(f"table key {key!r}: merged kernel size k must be >= 1")
    return (i, j, k)


def _read_tables(
    latency: Mapping[Entry, float], importance: Mapping[Entry, float], num_layers: int
) -> list[tuple[int, int, int, float, float]]:
    """Validate both tables and return sorted rows ``(i, j, k, latency, importance)``.

    NaN importances become ``-inf`` (never choose).
    """
    lat_keys, imp_keys = set(latency), set(importance)
    if lat_keys != imp_keys:
        only_lat = sorted(lat_keys - imp_keys, key=repr)
        only_imp = sorted(imp_keys - lat_keys, key=repr)
        raise ValueError(
            "latency and importance tables must have the same keys; "
            f"missing from importance: {_preview(only_lat)}; "
            f"missing from latency: {_preview(only_imp)}"
        )
    if not lat_keys:
        raise ValueError("the latency/importance tables are empty")
    rows: dict[Entry, tuple[int, int, int, float, float]] = {}
    for key in latency:
        entry = _as_entry(key, num_layers)
        if entry in rows:
            raise ValueError(f"table key {key!r} appears twice (as {entry})")
        rows[entry] = (*entry, _read_latency(key, latency[key]), _read_importance(key, importance[key]))
    return [rows[e] for e in sorted(rows)]


def _read_latency(key: object, value: object) -> float:
    """Return a latency as float, rejecting NaN, infinite and negative values."""
    t = _as_float(key, value, "latency")
    if math.isnan(t):
        raise ValueError(f"latency of {key!r} is NaN; re-measure that entry")
    if t < 0:
        raise ValueError(f"latency of {key!r} is negative ({t}); latencies must be >= 0")
    if math.isinf(t):
        raise ValueError(f"latency of {key!r} is infinite; drop the entry instead")
    return t


def _read_importance(key: object, value: object) -> float:
    """Return an importance as float; NaN maps to -inf (never choose), +inf is rejected."""
    v = _as_float(key, value, "importance")
    if math.isnan(v):
        return -math.inf
    if v == math.inf:
        raise ValueError(f"importance of {key!r} is +inf; importances must be finite or -inf")
    return v


def _as_float(key: object, value: object, what: str) -> float:
    """Convert a table value to float, with an error naming the entry."""
    try:
        return float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise TypeError(f"{what} of {key!r} must be a number, got {value!r}") from None


def _preview(keys: list, limit: int = 10) -> str:
    """Format up to ``limit`` keys for an error message."""
    if not keys:
        return "none"
    more = f" ... ({len(keys)} in all)" if len(keys) > limit else ""
    return ", ".join(map(repr, keys[:limit])) + more


# --------------------------------------------------------------------------- candidates


def _select(
    rows: list[tuple[int, int, int, float, float]],
    method: str,
    all_kept_kernel: Mapping[tuple[int, int], int] | None,
) -> list[tuple[int, int, int, float, float]]:
    """Restrict the table rows to the candidates allowed by ``method``."""
    if method == "layermerge":
        return rows
    if method == "layeronly":
        # Eq. 8: activations untouched, so every segment is one layer: kept or removed conv.
        return [r for r in rows if r[1] == r[0] + 1]
    return _select_depth(rows, all_kept_kernel)


def _select_depth(
    rows: list[tuple[int, int, int, float, float]],
    all_kept_kernel: Mapping[tuple[int, int], int] | None,
) -> list[tuple[int, int, int, float, float]]:
    """One candidate per pair ``(i, j)``: the all-convs-kept merge."""
    by_pair: dict[tuple[int, int], dict[int, tuple[int, int, int, float, float]]] = {}
    for r in rows:
        by_pair.setdefault((r[0], r[1]), {})[r[2]] = r
    if all_kept_kernel is None:
        # Keyed by kernel size, keeping every conv gives the largest merged kernel.
        return [ks[max(ks)] for _, ks in sorted(by_pair.items())]
    kept = {(operator.index(i), operator.index(j)): operator.index(k)
            for (i, j), k in all_kept_kernel.items()}
    missing = sorted(set(by_pair) - set(kept))
    if missing:
        raise ValueError(
            f"all_kept_kernel lacks pairs (i, j) present in the table: {_preview(missing)}; "
            "list every pair or pass all_kept_kernel=None to use the largest k"
        )
    out = []
    for pair, ks in sorted(by_pair.items()):
        if kept[pair] not in ks:
            raise ValueError(
                f"all_kept_kernel[{pair}] = {kept[pair]} but the table has no entry "
                f"{(*pair, kept[pair])} (kernels present: {sorted(ks)})"
            )
        out.append(ks[kept[pair]])
    return out


def _discretise(row: tuple[int, int, int, float, float], unit: float) -> _Candidate:
    """Round a row's latency UP to whole units (with float-noise tolerance)."""
    i, j, k, t, imp = row
    units = max(0, math.ceil(t / unit - _UNIT_EPS))
    return _Candidate(i, j, k, t, imp, units)


def _reachable(pairs, num_layers: int) -> list[bool]:
    """Layer boundaries reachable from 0 by chaining segments ``(i, j)``."""
    reach = [False] * (num_layers + 1)
    reach[0] = True
    for i, j in sorted(pairs):  # sorted by i: reach[i] is final once i's segments come up
        if reach[i]:
            reach[j] = True
    return reach


def _covers(pairs, num_layers: int) -> bool:
    """Whether the segments ``(i, j)`` can chain from 0 to ``num_layers``."""
    return _reachable(pairs, num_layers)[num_layers]


def _check_coverage(rows: list, num_layers: int, method: str) -> None:
    """Raise if the method's candidates leave a gap in ``0..L``."""
    reach = _reachable([(r[0], r[1]) for r in rows], num_layers)
    if reach[num_layers]:
        return
    first_gap = next(l for l in range(num_layers + 1) if not reach[l])
    hint = (" (layeronly needs single-layer entries (l-1, l, k) for every layer)"
            if method == "layeronly" else "")
    raise ValueError(
        f"the table does not cover 0..{num_layers} for method {method!r}: no chain of segments "
        f"reaches layer boundary {first_gap}{hint}; add the missing entries"
    )


# --------------------------------------------------------------------------- dynamic program


def _dp(cands: list[_Candidate], num_layers: int, resolution: int) -> list[_Candidate] | None:
    """Algorithm 1 on discretised latencies; ``None`` if nothing fits ``resolution`` units.

    ``best[l, t]`` is the best (importance, -true latency) pair, lexicographically, over
    chains covering ``0..l`` that use *at most* ``t`` units. Both criteria are additive, so
    the lexicographic order keeps the optimal-substructure property and the DP stays exact.
    Each candidate updates a whole row at once (vectorised over ``t``).
    """
    width = resolution + 1
    imp = np.full((num_layers + 1, width), -np.inf)
    lat = np.full((num_layers + 1, width), np.inf)
    back = np.full((num_layers + 1, width), -1, dtype=np.int64)
    imp[0] = 0.0
    lat[0] = 0.0
    by_end: dict[int, list[int]] = {}
    for idx, c in enumerate(cands):
        by_end.setdefault(c.j, []).append(idx)
    for l in range(1, num_layers + 1):
        for idx in by_end.get(l, ()):
            _relax(imp, lat, back, cands[idx], idx, width)
    if back[num_layers, resolution] < 0:
        return None
    return _backtrack(cands, back, num_layers, resolution)


def _relax(imp: np.ndarray, lat: np.ndarray, back: np.ndarray, c: _Candidate, idx: int,
           width: int) -> None:
    """Try appending candidate ``c`` to every chain ending at ``c.i``, for all budgets."""
    if c.units >= width:
        return  # alone it already exceeds the budget
    new_imp = imp[c.i, : width - c.units] + c.importance
    new_lat = lat[c.i, : width - c.units] + c.latency
    cur_imp = imp[c.j, c.units:]
    cur_lat = lat[c.j, c.units:]
    # Strict comparisons: on an exact tie the earlier candidate (sorted order) is kept.
    better = (new_imp > cur_imp) | ((new_imp == cur_imp) & (new_lat < cur_lat))
    better &= new_imp > -np.inf  # unreachable states never win
    if better.any():
        cur_imp[better] = new_imp[better]
        cur_lat[better] = new_lat[better]
        back[c.j, c.units:][better] = idx


def _backtrack(cands: list[_Candidate], back: np.ndarray, num_layers: int,
               resolution: int) -> list[_Candidate]:
    """Follow back-pointers from ``(L, resolution)`` to recover the chosen segments."""
    chosen: list[_Candidate] = []
    l, t = num_layers, resolution
    while l > 0:
        c = cands[int(back[l, t])]
        chosen.append(c)
        l, t = c.i, t - c.units
    chosen.reverse()
    return chosen


# --------------------------------------------------------------------------- infeasibility


def _min_latency(cands: list[_Candidate], num_layers: int, *, units: bool) -> float:
    """Smallest total latency (true, or in units) of any covering of ``0..L``."""
    best = [math.inf] * (num_layers + 1)
    best[0] = 0.0
    for c in sorted(cands, key=lambda c: (c.i, c.j, c.k)):
        cost = c.units if units else c.latency
        if best[c.i] + cost < best[c.j]:
            best[c.j] = best[c.i] + cost
    return best[num_layers]


def _infeasible_message(cands: list[_Candidate], num_layers: int, budget: float, method: str,
                        resolution: int, unit: float) -> str:
    """Explain why no covering fits the budget, naming the smallest achievable latency."""
    true_min = _min_latency(cands, num_layers, units=False)
    if true_min > budget:
        return (
            f"budget {budget:g} is infeasible for method {method!r}: the smallest achievable "
            f"latency is {true_min:.6g}; raise the budget to at least {true_min:.6g}"
        )
    unit_min = int(_min_latency(cands, num_layers, units=True))
    return (
        f"budget {budget:g} is infeasible for method {method!r} after discretisation: the "
        f"smallest achievable latency is {true_min:.6g}, but rounding each segment up to "
        f"units of {unit:.6g} (resolution={resolution}) needs {unit_min} units > {resolution}; "
        "raise the resolution or the budget"
    )
