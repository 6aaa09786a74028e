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

__all__ = ["SideBySide", "measure_side_by_side", "side_by_side"]


@dataclass(frozen=True)
class SideBySide:
    """Networks timed interleaved, pass by pass.

    Attributes:
        ms: Name -> median milliseconds of its passes.
        ratio: Name -> median over pass pairs of (its pass / the first network's pass just
            before it); 1.0 for the first network.
        spread: Name -> spread of those per-pass ratios (:func:`~lightning_layermerge.tables.latency.spread`;
            ``nan``: too few passes).
        settings: The settings really used (after a load fallback, the robust ones).
        load_note: What a busy machine made the measurement do (``""``: nothing).
    """

    ms: dict[str, float]
    ratio: dict[str, float]
    spread: dict[str, float]
    settings: LatencySettings
    load_note: str = ""


def side_by_side(modules: Mapping[str, nn.Module], inputs: Sequence[Any], settings: LatencySettings,
                 timers: Timers = Timers()) -> SideBySide:
    """Time networks interleaved forward by forward, each against the first one, with its spread.

    Interleaving (A, B, A, B, ...) exposes all networks to the same machine load. The load
    is checked first and the spread of the last network's ratio is re-measured while it
    exceeds ``settings.max_spread``, as for the latency table
    (:func:`~lightning_layermerge.tables.latency.check_load`,
    :func:`~lightning_layermerge.tables.latency.time_samples`). The modules are deep-copied,
    so the caller's modules keep their device, dtype and mode.

    Args:
        modules: Name -> module, all taking ``inputs``; the first is the reference of the ratios.
        inputs: Positional arguments (already at the batch size to time).
        settings: Device, dtype, warm-up, repeats, threads, runtime and load policy.
        timers: The measuring functions (default: measure this machine).

    Returns:
        A :class:`SideBySide`.
    """
    names = list(modules)
    settings, _, note = check_load(settings, timers.probe)
    runs = [(copy.deepcopy(modules[n]), tuple(inputs)) for n in names]
    samples, _ = time_samples(runs, settings, lambda s: _ratios(s[-1], s[0]), timers.samples)
    ratios = {n: _ratios(samples[i], samples[0]) for i, n in enumerate(names)}
    return SideBySide(ms={n: statistics.median(samples[i]) for i, n in enumerate(names)},
                      ratio={n: statistics.median(r) for n, r in ratios.items()},
                      spread={n: spread(r) for n, r in ratios.items()}, settings=settings, load_note=note)


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
