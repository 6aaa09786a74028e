"""Latency lookup table T[i, j, k] (torch only, no Lightning): the time of layers i+1..j merged
into one conv of kernel size k.

Every legal segment ``(i, j, k)`` of a chain is timed as the module that
:func:`~lightning_layermerge.merge` really produces for it: one ``nn.Conv2d`` of the merged
geometry (or nothing for an identity segment) followed by the activation that ends the
segment (a removed conv leaves that activation in the network, so it is priced too). The whole original network with BatchNorm folded (``merge`` of the keep-all plan) is
timed too (whole forward passes; operation by operation in place with ``reference=True``),
so a budget given as a fraction of the model's latency can be turned into a budget for the
table: the part of the model outside the chain (stem pooling, classifier, residual
additions, shortcut projections, ...) is ``total_ms - chain_ms``.

Timing protocol: ``warmup`` untimed forward passes, then ``repeats`` single forward passes,
each timed on its own, median in milliseconds. By default (1 thread on CPU) the clock is the
calling thread's CPU time (``time.thread_time``), which does not count time the thread spends
descheduled while other processes use the CPU; otherwise :func:`time.perf_counter` (CUDA
synchronised before and after each pass). Every timing states its spread (the passes split
into :data:`SPREAD_BLOCKS` blocks, ``(max - min) / median`` of the block medians) and is
measured again while it exceeds ``settings.max_spread``; a wall-clock setting on a busy CPU is
detected before measuring (:func:`probe_load`) and handled as ``settings.on_load`` says.
Modules run in the settings' runtime (eager, TorchScript or ONNX Runtime,
:mod:`~lightning_layermerge.tables.runtime`). ONNX Runtime timings at more than one thread
are taken when the threads get their parallel speed-up (on a virtual machine it comes and
goes; :mod:`~lightning_layermerge.planning.tables.parallel_gate`), and entries timed before
that state was first seen are re-timed at the end of the build. With ``settings.context`` (default) the original
network is also timed operation by operation in place, and every entry is scaled by the
in-place / alone time of the original layers it replaces (:func:`in_context`), and the
residual additions with their shortcut projections, timed in place too, are priced with the
segments that keep them rather than as a constant (:func:`with_skip_costs`): a segment that
spans a whole block folds them away. All timing runs with the allocator keeping freed memory
(``settings.allocator``, :mod:`~lightning_layermerge.tables.allocator`). Segments with
identical module geometry are timed once per build, which also keeps the table
self-consistent (equal modules get equal numbers, not two noisy draws).
On a shared machine, where other processes slow everything down by a factor that changes
from minute to minute, ``LatencySettings(reference=True)`` times every module interleaved
with one fixed reference layer and rescales, so that entries measured minutes apart (and
the whole-model total) stay comparable.

Each entry is written to a :class:`~lightning_layermerge.tables.cache.TableCache` the moment
it is measured, so an interrupted build resumes and a second build with the same settings
measures nothing.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from torch import fx, nn
from tqdm.auto import tqdm

from ...surgery.graph import Chain, Segment
from ...surgery.plan import Plan
from .cache import TableCache, fingerprint  # noqa: F401  (re-exported: tables name their cache here)
from .latency_store import (
    IN_PLACE,
    IN_PLACE_SKIP,
    REFERENCE_KEY,
    TOTAL_KEY,
    Key,
    _cache_key,
    _complete,
    _open_cache,
    _Store,
    _uses_context,
    spread_key,
)
from .latency_settings import CLOCKS, ON_LOAD, SPREAD_BLOCKS, LatencySettings
from .latency_timer import _Timer
from .load import LatencyLoadError, LatencyLoadWarning, LoadProbe, check_load, probe_load
from .ort_profile import ort_node_times
from .parallel_gate import gate_for, ort_threads
from .pricing import (
    _in_place_layers,
    _scaled_to,
    in_context,
    in_context_additive,
    in_context_fitted,
    skip_costs,
    with_skip_costs,
)
from .segment_modules import _geometry, _segment_run, _whole_run, batched_example, segment_module
from .timing import (
    Timers,
    Timing,
    _check_device,
    interleaved_samples,
    spread,
    time_interleaved,
    time_module,
    time_nodes,
    time_samples,
    timing_environment,
)
from .unreliable import _report_unreliable, _retime_stale, _watched, _with_gate_note

__all__ = [
    "CLOCKS",
    "ON_LOAD",
    "REFERENCE_KEY",
    "SPREAD_BLOCKS",
    "LatencyLoadError",
    "LatencyLoadWarning",
    "LoadProbe",
    "Timers",
    "Timing",
    "probe_load",
    "spread",
    "time_samples",
    "TOTAL_KEY",
    "LatencySettings",
    "LatencyTable",
    "batched_example",
    "build_latency_table",
    "check_load",
    "in_context",
    "skip_costs",
    "with_skip_costs",
    "spread_key",
    "interleaved_samples",
    "segment_module",
    "time_interleaved",
    "time_module",
    "time_nodes",
    "timing_environment",
]


@dataclass
class LatencyTable:
    """Measured latencies of every legal segment, plus the whole model's.

    Attributes:
        entries: Milliseconds per legal segment ``(i, j, k)`` (an identity segment costs its
            activation, 0.0 without one).
        total_ms: The whole original model with BatchNorm folded (``merge`` of the keep-all
            plan), at the same settings.
        chain_ms: Sum of the keep-all plan's entries.
        settings: How the numbers were measured: the settings the build really used (after
            a fallback to the robust settings, those). Time calibration and final
            measurements with these, so that all numbers come from one runtime and clock.
        spreads: Spread (:func:`spread`) of each measured entry (identity segments: 0.0;
            ``nan``: too few passes to tell).
        total_spread: Spread of the whole-model timing.
        unreliable: Entries whose spread stayed above ``settings.max_spread`` after the retries.
        build_s: Seconds spent measuring in this build (0.0 when everything came from the cache).
        load_note: What a busy machine made the build do (``""``: nothing).
        alone: The entries as timed alone, before the in-context scaling (``settings.context``;
            equal to ``entries`` without it).
    """

    entries: dict[Key, float]
    total_ms: float
    chain_ms: float
    settings: LatencySettings
    spreads: dict[Key, float] = field(default_factory=dict, compare=False)
    total_spread: float = field(default=math.nan, compare=False)
    unreliable: list[Key] = field(default_factory=list, compare=False)
    build_s: float = field(default=0.0, compare=False)
    load_note: str = field(default="", compare=False)
    alone: dict[Key, float] = field(default_factory=dict, compare=False)

    @property
    def max_spread(self) -> float:
        """The largest spread of any measured entry or of the total (``nan`` if none is known)."""
        known = [v for v in [*self.spreads.values(), self.total_spread] if not math.isnan(v)]
        return max(known) if known else math.nan

    @property
    def outside_ms(self) -> float:
        """The part of the model outside the chain: ``max(total_ms - chain_ms, 0)``."""
        return max(self.total_ms - self.chain_ms, 0.0)

    def budget_for(self, fraction: float) -> float:
        """Table budget (ms) for a target latency of ``fraction * total_ms``.

        Args:
            fraction: Target latency as a fraction of :attr:`total_ms` (e.g. 0.6).

        Returns:
            ``fraction * total_ms - outside_ms``: what the chain's segments may take.

        Raises:
            ValueError: If the result is not positive (the part outside the chain alone
                exceeds the target).
        """
        if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
            raise ValueError(f"budget fraction must be a finite number, got {fraction!r}")
        budget = fraction * self.total_ms - self.outside_ms
        if budget <= 0:
            floor = self.outside_ms / self.total_ms if self.total_ms > 0 else float("nan")
            raise ValueError(
                f"a budget of {fraction:g} x {self.total_ms:.4g} ms leaves {budget:.4g} ms for the chain: "
                f"the part of the model outside the chain alone takes {self.outside_ms:.4g} ms "
                f"({floor:.1%} of the total); choose a fraction above {floor:.3f}"
            )
        return budget

    def predicted_ms(self, keys: Iterable[Key | Segment]) -> float:
        """Predicted latency of the network made of the segments ``keys``.

        Args:
            keys: ``(i, j, k)`` triples or :class:`~lightning_layermerge.Segment` objects
                (e.g. ``sol.segments`` or ``plan.keys``).

        Returns:
            ``outside_ms + sum(entries[k] for k in keys)``.

        Raises:
            KeyError: If a key is not in the table.
        """
        total = self.outside_ms
        for key in keys:
            key = key.key if isinstance(key, Segment) else tuple(key)
            if key not in self.entries:
                raise KeyError(f"segment {key} is not in the latency table; was it built for this chain?")
            total += self.entries[key]
        return total



# ---------------------------------------------------------------------- building



def build_latency_table(
    model: nn.Module,
    chain: Chain,
    settings: LatencySettings = LatencySettings(),
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
    timers: Timers = Timers(),
) -> LatencyTable:
    """Measure the latency of every legal segment of ``chain`` and of the whole model.

    Before measuring, a wall-clock CPU setting checks the machine's load
    (:func:`check_load`, as ``settings.on_load`` says: fall back to 1 thread with the thread
    CPU clock, warn, or raise). Every timing states its spread and is measured again while
    the spread exceeds ``settings.max_spread`` (``settings.retries`` times); entries that stay
    unrepeatable are listed in :attr:`LatencyTable.unreliable` and warned about (or raise,
    with ``on_load="raise"``).

    Args:
        model: The network ``chain`` was traced from (timed as ``merge`` of the keep-all plan).
        chain: From :func:`~lightning_layermerge.trace`.
        settings: Device, batch size, dtype, warm-up, repeats, threads, runtime and load policy.
        cache_dir: Directory of the on-disk cache. Entries are stored as they are measured,
            in a file named after the architecture and settings; an interrupted build
            resumes and a repeated build measures nothing. ``None``: no cache.
        progress: Show a progress bar.
        timers: The measuring functions (default: measure this machine); replace one to
            observe or fake the build's timings.

    Returns:
        The :class:`LatencyTable`; its ``settings`` are the ones really used.

    Raises:
        TypeError: If ``chain`` is not a :class:`~lightning_layermerge.Chain`.
        ValueError: If the device or runtime is unavailable.
        LatencyLoadError: With ``on_load="raise"``, if the machine is busy or entries stay
            unrepeatable.
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must come from lightning_layermerge.trace(...), got {type(chain).__name__}")
    if not isinstance(settings, LatencySettings):
        raise TypeError(f"settings must be a LatencySettings, got {type(settings).__name__}")
    _check_device(settings.torch_device)
    key = _cache_key(chain, settings, settings.batch_size)
    store = _Store(_open_cache(cache_dir, chain, key))
    if not _complete(store, chain):  # a complete cached table needs no load check
        settings, _, note = check_load(settings, timers.probe)
        if note:
            key = _cache_key(chain, settings, settings.batch_size)
            store = _Store(_open_cache(cache_dir, chain, key))
    else:
        note = ""
    gate = gate_for(settings)
    timer = _Timer(chain, settings, store, timers)
    # Geometries already measured (also in an earlier, interrupted build) are not re-timed.
    by_geometry = {_geometry(s): s.key for s in chain.segments if store.get(s.key) is not None}
    bar = tqdm(total=len(chain.segments) + 1, desc="latency table", unit="entry", disable=not progress)
    measured, start = 0, time.perf_counter()
    states: dict[Key, float] = {}  # sentinel ratio at the end of each timing of this build (gated settings)
    gate_before = (gate.waited_s, gate.slow_timings) if gate is not None else (0.0, 0)

    def time_total() -> None:
        timing = _watched(gate, states, TOTAL_KEY, lambda: timer.whole(*_whole_run(model, chain, settings)))
        store.put_timing(TOTAL_KEY, timing.ms, timing.spread)

    with bar, timing_environment(settings):
        pending: dict[tuple, Segment] = {}  # one segment per geometry still to be timed
        for seg in chain.segments:
            geometry = _geometry(seg)
            if store.get(seg.key) is not None or geometry in by_geometry or geometry in pending:
                continue
            if seg.identity and seg.activation is None:
                store.put_timing(seg.key, 0.0, 0.0)
                by_geometry[geometry] = seg.key
            else:
                pending[geometry] = seg
        for seg in pending.values():
            timing = _watched(gate, states, seg.key, lambda: timer(*_segment_run(chain, seg, settings)))
            store.put_timing(seg.key, timing.ms, timing.spread)
            by_geometry[_geometry(seg)] = seg.key
            measured += 1
            bar.update(1)
            bar.set_postfix(measured=measured)
        for seg in chain.segments:  # every other segment has the time of its geometry
            if store.get(seg.key) is None:
                source = by_geometry[_geometry(seg)]
                store.put_timing(seg.key, store.values[source], store.spread(source))
        bar.update(len(chain.segments) - measured)
        if store.get(TOTAL_KEY) is None:
            time_total()
        bar.update(1)
        if gate is not None:
            _retime_stale(chain, settings, store, timer, gate, states, time_total)
        if _uses_context(settings) and store.get((IN_PLACE, 0, 0)) is None:
            nodes = _scaled_to(_in_place_nodes(timer, *_whole_run(model, chain, settings)), store.values[TOTAL_KEY])
            for layer, ms in _in_place_layers(chain, nodes).items():
                store.put((IN_PLACE, layer, 0), ms)
            for index, ms in enumerate(skip_costs(chain, nodes)):
                store.put((IN_PLACE_SKIP, index, 0), ms)
            store.put((IN_PLACE, 0, 0), 1.0)  # done (also when no layer could be found in place)
    note = _with_gate_note(note, gate, gate_before)
    raw = {s.key: store.values[s.key] for s in chain.segments}
    entries = raw
    if _uses_context(settings):
        in_place = {l: store.values[(IN_PLACE, l, 0)] for l in range(1, chain.num_layers + 1)
                    if (IN_PLACE, l, 0) in store.values}
        costs = [store.values.get((IN_PLACE_SKIP, index, 0), 0.0) for index in range(len(chain.skips))]
        # ONNX Runtime: a segment's own session pays a layout conversion at its input and output,
        # so the in-place correction is additive there (measured: the factor model priced merged
        # MobileNetV2 blocks 26-45 % too low); with more than one thread each of those conversions
        # is also a kernel dispatched to the threads, a fixed cost that the size-proportional split
        # under-assigns to merged segments, so it is fitted (2-thread block: 74 / 93 % within 5 /
        # 10 % fitted vs 67 / 85 % additive; at 1 thread the additive split is better, 90 / 100 %
        # vs 75 / 90 %). Eager: a factor.
        to_context = in_context
        if settings.runtime == "onnxruntime":
            to_context = in_context_fitted if ort_threads(settings) > 1 else in_context_additive
        entries = with_skip_costs(chain, to_context(chain, raw, in_place), costs)
    chain_ms = sum(entries[k] for k in Plan.keep_all(chain).keys)
    table = LatencyTable(entries, store.values[TOTAL_KEY], chain_ms, settings, alone=raw,
                         spreads={s.key: store.spread(s.key) for s in chain.segments},
                         total_spread=store.spread(TOTAL_KEY),
                         build_s=time.perf_counter() - start if measured or timer.used else 0.0, load_note=note)
    table.unreliable = [k for k, v in table.spreads.items() if v > settings.max_spread]
    if table.total_spread > settings.max_spread:
        table.unreliable.append(TOTAL_KEY)
    _report_unreliable(table, gate)
    return table



def _in_place_nodes(timer: _Timer, gm: fx.GraphModule, inputs: tuple) -> dict[str, float]:
    """Every operation of the BN-folded original timed in place, in the settings' runtime."""
    if timer.settings.runtime == "onnxruntime":
        timer.used = True
        gate = gate_for(timer.settings)
        if gate is None:
            return ort_node_times(gm, inputs, timer.settings)
        return gate.gated(lambda: ort_node_times(gm, inputs, timer.settings))
    return timer.nodes(gm, inputs)
