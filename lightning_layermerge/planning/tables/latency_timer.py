"""How one latency table build times a module (torch only): alone, or against a reference layer.

:class:`_Timer` is the build's single entry point to the clock: it times a segment's module on its
own (median pass and spread, re-measured while unrepeatable), or, with ``settings.reference``,
interleaved pass by pass with one fixed typical layer of the chain and rescaled by that layer's
latency, so that a slow-down from other processes that comes and goes cancels out.
"""

from __future__ import annotations

import math
import statistics
from typing import Any

from torch import fx, nn

from ...surgery.graph import Chain, Segment
from ...surgery.plan import Plan
from .latency_settings import LatencySettings
from .latency_store import REFERENCE_KEY, _Store
from .segment_modules import _segment_run
from .timing import Timers, Timing, spread, time_samples


def _flops(seg: Segment) -> int:
    """Multiply-adds of a segment's merged conv (to pick a typical reference layer)."""
    n, c_out, h, w = seg.out_shape
    return n * c_out * h * w * (seg.in_shape[1] // seg.groups) * seg.kernel * seg.kernel


class _Timer:
    """Times modules for one build: directly, or relative to a reference (``settings.reference``)."""

    def __init__(self, chain: Chain, settings: LatencySettings, store: _Store, timers: Timers) -> None:
        self.chain, self.settings, self.store, self.timers = chain, settings, store, timers
        self.reference: tuple[nn.Module, tuple] | None = None
        self.used = False

    def _reference(self) -> tuple[tuple[nn.Module, tuple], float]:
        """The reference run and its latency, created (and measured, once per table) lazily."""
        if self.reference is None:
            # The keep-all layer of median cost: a typical layer, neither noise-dominated nor slow.
            layers = sorted((s for s in Plan.keep_all(self.chain).segments if not s.identity), key=_flops)
            self.reference = _segment_run(self.chain, layers[len(layers) // 2], self.settings)
        ref_ms = self.store.get(REFERENCE_KEY)
        if ref_ms is None:
            ref_ms = self.timers.module(*self.reference, self.settings)
            self.store.put(REFERENCE_KEY, ref_ms)
        return self.reference, ref_ms

    def whole(self, gm: fx.GraphModule, inputs: tuple) -> Timing:
        """The network's latency.

        Without a reference: whole forward passes in the settings' runtime (what the final
        side-by-side measurement times). With a reference (eager only): the sum of its
        operations' latencies, each timed in place relative to the reference pass before it.
        """
        self.used = True
        if not self.settings.reference:
            return self._alone(gm, inputs)
        reference, ref_ms = self._reference()
        return Timing(sum(self.timers.nodes(gm, inputs, self.settings, reference=reference).values()) * ref_ms, math.nan)

    def nodes(self, gm: fx.GraphModule, inputs: tuple) -> dict[str, float]:
        """Every operation of ``gm`` timed in place (ms; relative to the reference, rescaled, in reference mode)."""
        self.used = True
        if not self.settings.reference:
            return self.timers.nodes(gm, inputs, self.settings)
        reference, ref_ms = self._reference()
        return {n: v * ref_ms for n, v in self.timers.nodes(gm, inputs, self.settings, reference=reference).items()}

    def __call__(self, module: nn.Module, inputs: tuple) -> Timing:
        self.used = True
        if not self.settings.reference:
            return self._alone(module, inputs)
        reference, ref_ms = self._reference()
        (refs, ours), s = _timed_with_retries([reference, (module, inputs)], self.settings, self.timers, _pass_ratios)
        # Ratio of each pass to the reference pass just before it: a slow-down from other
        # processes that lasts longer than one pass cancels out; the median drops outliers.
        return Timing(statistics.median(_pass_ratios([refs, ours])) * ref_ms, s)

    def _alone(self, module: nn.Module, inputs: tuple) -> Timing:
        """``module`` timed on its own: median pass time and spread."""
        (samples,), s = _timed_with_retries([(module, inputs)], self.settings, self.timers)
        return Timing(statistics.median(samples), s)


def _pass_ratios(samples: list[list[float]]) -> list[float]:
    """Per-pass ratio of the last run to the first (pass-by-pass interleaved)."""
    return [o / r if r > 0 else math.inf for o, r in zip(samples[-1], samples[0])]


def _timed_with_retries(runs: list, settings: LatencySettings, timers: Timers,
                        statistic: Any = None) -> tuple[list[list[float]], float]:
    """:func:`time_samples` when checks are on, one plain attempt with ``on_load="ignore"``."""
    if settings.on_load == "ignore":
        samples = timers.samples(runs, settings)
        return samples, spread((statistic or (lambda x: x[-1]))(samples))
    return time_samples(runs, settings, statistic, timers.samples)
