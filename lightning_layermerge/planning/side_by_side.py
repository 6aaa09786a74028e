"""Networks timed side by side (torch only, no Lightning): the measured latencies of a report.

:func:`side_by_side` times several networks interleaved, forward by forward, on the same device,
batch, dtype and thread count, and states each one's median time, its median per-pass ratio
against the first network and that ratio's spread; :func:`measure_side_by_side` keeps the
medians only. Interleaving exposes all networks to the same machine load, so the ratios stay
meaningful on a busy machine. The timing primitives are those of the latency table
(:mod:`lightning_layermerge.planning.tables.latency`).
"""

from __future__ import annotations

import copy
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from .tables.latency import LatencySettings, Timers, check_load, spread, time_samples
from .validate import check_count

__all__ = ["ROUNDS", "SideBySide", "measure_side_by_side", "side_by_side"]


@dataclass(frozen=True)
class SideBySide:
    """Networks timed interleaved, pass by pass (under the parallel-state gate, each timed pass right
    after an untimed one of the same network: :func:`~lightning_layermerge.planning.tables.timing.interleaved_samples`).

    Attributes:
        ms: Name -> median milliseconds of its passes.
        ratio: Name -> median over pass pairs of (its pass / the first network's pass just
            before it), median over the rounds; 1.0 for the first network.
        spread: Name -> how repeatable that ratio is: the larger of the per-pass ratios' spread
            (:func:`~lightning_layermerge.tables.latency.spread`, median over the rounds; ``nan``:
            too few passes) and the spread of the rounds' ratios.
        settings: The settings really used (after a load fallback, the robust ones).
        load_note: What a busy machine made the measurement do (``""``: nothing).
    """

    ms: dict[str, float]
    ratio: dict[str, float]
    spread: dict[str, float]
    settings: LatencySettings
    load_note: str = ""


#: Rounds of a side-by-side measurement, each with fresh copies of the networks. One round's ratio
#: varies from call to call within a process as much as between processes (fresh copies land
#: elsewhere in memory); measured on a 16 px MobileNetV2: single rounds 0.464-0.491 over 30 calls in
#: 5 processes, the median of 3 rounds 0.470-0.483 over 36 calls in 6.
ROUNDS = 3


def side_by_side(modules: Mapping[str, nn.Module], inputs: Sequence[Any], settings: LatencySettings,
                 timers: Timers = Timers(), rounds: int = ROUNDS) -> SideBySide:
    """Time networks interleaved forward by forward, each against the first one, with its spread.

    Interleaving (A, B, A, B, ...) exposes all networks to the same machine load. The load
    is checked first and the spread of the last network's ratio is re-measured while it
    exceeds ``settings.max_spread``, as for the latency table
    (:func:`~lightning_layermerge.tables.latency.check_load`,
    :func:`~lightning_layermerge.tables.latency.time_samples`). The modules are deep-copied
    for every round, so the caller's modules keep their device, dtype and mode, and each round
    places the networks afresh in memory; the medians over the rounds are reported.

    Args:
        modules: Name -> module, all taking ``inputs``; the first is the reference of the ratios.
        inputs: Positional arguments (already at the batch size to time).
        settings: Device, dtype, warm-up, repeats, threads, runtime and load policy.
        timers: The measuring functions (default: measure this machine).
        rounds: Rounds of ``settings.repeats`` interleaved passes, each with fresh copies.

    Returns:
        A :class:`SideBySide`; its spread is the larger of the per-pass ratios' spread (median
        over rounds) and the rounds' ``(max - min) / median``.
    """
    check_count("side_by_side(rounds=...)", rounds, 1)
    names = list(modules)
    settings, _, note = check_load(settings, timers.probe)
    ms: dict[str, list[float]] = {n: [] for n in names}
    ratio: dict[str, list[float]] = {n: [] for n in names}
    within: dict[str, list[float]] = {n: [] for n in names}
    for _ in range(rounds):
        runs = [(copy.deepcopy(modules[n]), tuple(inputs)) for n in names]
        samples, _ = time_samples(runs, settings, lambda s: _ratios(s[-1], s[0]), timers.samples)
        for i, n in enumerate(names):
            ratios = _ratios(samples[i], samples[0])
            ms[n].append(statistics.median(samples[i]))
            ratio[n].append(statistics.median(ratios))
            within[n].append(spread(ratios))
    return SideBySide(ms={n: statistics.median(v) for n, v in ms.items()},
                      ratio={n: statistics.median(v) for n, v in ratio.items()},
                      spread={n: _worst(_median(within[n]), _range(ratio[n])) for n in names},
                      settings=settings, load_note=note)


def _median(values: Sequence[float]) -> float:
    """Median of the assessable values (``nan`` if none)."""
    known = [v for v in values if not math.isnan(v)]
    return statistics.median(known) if known else math.nan


def _worst(*spreads: float) -> float:
    """The largest assessable spread (``nan`` if none)."""
    known = [v for v in spreads if not math.isnan(v)]
    return max(known) if known else math.nan


def _range(values: Sequence[float]) -> float:
    """``(max - min) / median`` (0 for one value)."""
    centre = statistics.median(values)
    return (max(values) - min(values)) / centre if centre > 0 else math.nan


def _ratios(ours: Sequence[float], base: Sequence[float]) -> list[float]:
    return [o / b if b > 0 else math.inf for o, b in zip(ours, base)]


def measure_side_by_side(
    modules: Mapping[str, nn.Module],
    inputs: Sequence[Any],
    settings: LatencySettings,
) -> dict[str, float]:
    """Median latency (ms) of each module, timed interleaved forward by forward.

    :func:`side_by_side` without the ratios and spreads.

    Args:
        modules: Name -> module, all taking ``inputs``.
        inputs: Positional arguments (already at the batch size to time).
        settings: Device, dtype, warm-up, repeats, threads and runtime.

    Returns:
        Name -> median milliseconds.
    """
    return side_by_side(modules, inputs, settings).ms
