"""What a latency table build does with timings it cannot vouch for (torch only).

Timings taken while the machine's timing threads got no parallel speed-up
(:mod:`~lightning_layermerge.planning.tables.parallel_gate`) are marked, re-taken once the build has
seen the fast state, and said in the table's load note; timings that stay unrepeatable are warned
about (or refused) with a message naming the likely cause and what to do.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING

from ...surgery.graph import Chain
from .latency_settings import LatencySettings
from .latency_store import TOTAL_KEY, Key, _Store
from .latency_timer import _Timer
from .load import LatencyLoadError, LatencyLoadWarning
from .parallel_gate import ParallelGate
from .segment_modules import _geometry, _segment_run
from .timing import Timing

if TYPE_CHECKING:
    from .latency import LatencyTable


def _watched(gate: ParallelGate | None, states: dict[Key, float], key: Key, take: Callable[[], Timing]) -> Timing:
    """``take()``, noting the gate's state after it as ``key``'s.

    A timing the gate gave up on counts as unrepeatable: its spread becomes at least how much
    slower the sentinel ran than in the best state, so the table lists it in
    :attr:`~lightning_layermerge.planning.tables.latency.LatencyTable.unreliable` and warns, as for any unrepeatable timing.
    """
    if gate is None:
        return take()
    before = gate.slow_timings
    timing = take()
    states[key] = gate.last
    if gate.slow_timings == before or not math.isfinite(gate.last / gate.best):
        return timing
    excess = gate.last / gate.best - 1
    return Timing(timing.ms, excess if math.isnan(timing.spread) else max(timing.spread, excess), timing.attempts)


def _with_gate_note(note: str, gate: ParallelGate | None, before: tuple[float, int]) -> str:
    """``note`` plus what the parallel-state gate did in this build, when it waited a second or more or gave up."""
    if gate is None:
        return note
    waited, slow = gate.waited_s - before[0], gate.slow_timings - before[1]
    if waited < 1.0 and not slow:
        return note
    threads = gate.settings.threads or "default"
    said = (f"waited {waited:.1f} s for the {threads} timing threads' parallel speed-up "
            f"(it comes and goes on this machine); {slow} timing(s) taken without it")
    return f"{note}; {said}" if note else said


def _retime_stale(chain: Chain, settings: LatencySettings, store: _Store, timer: _Timer,
                  gate: ParallelGate, states: dict[Key, float], time_total: Callable[[], None]) -> None:
    """Time again what this build timed before the gate had seen the machine's parallel speed-up.

    The gate accepts a timing when the sentinel is within tolerance of the best ratio seen *so
    far*; a build that started while the threads got no speed-up took its first timings in
    that state. Once a better state has been seen, those are re-taken (in it), and every
    segment of the same geometry gets the new value.
    """
    for key in [key for key, ratio in states.items() if gate.stale(ratio)]:
        if key == TOTAL_KEY:
            time_total()
            continue
        seg = next(s for s in chain.segments if s.key == key)
        timing = _watched(gate, states, key, lambda: timer(*_segment_run(chain, seg, settings)))
        for other in chain.segments:
            if _geometry(other) == _geometry(seg):
                store.put_timing(other.key, timing.ms, timing.spread)



def _report_unreliable(table: LatencyTable, gate: ParallelGate | None) -> None:
    """Warn about (or, with ``on_load="raise"``, refuse) entries that stayed unrepeatable; ``gate``:
    the build's parallel-state gate (:func:`~lightning_layermerge.planning.tables.parallel_gate.gate_for`), whose record names the likely cause."""
    settings = table.settings
    if not table.unreliable or settings.on_load == "ignore":
        return
    worst = max(table.unreliable, key=lambda k: table.spreads.get(k, table.total_spread))
    worst_spread = table.spreads.get(worst, table.total_spread)
    what = "the whole model" if worst == TOTAL_KEY else f"segment {worst}"
    message = (f"{len(table.unreliable)} latency table timing(s) stayed unrepeatable after {settings.retries} "
               f"re-measurement(s): spread up to {worst_spread:.1%} ({what}) > max_spread={settings.max_spread:g}")
    if gate is not None and gate.slow_timings:
        message += (f"; the {settings.threads or 'default'} timing threads got no parallel speed-up for long stretches "
                    f"({gate.describe()}): on a virtual machine the host decides this; pass "
                    "LatencySettings(threads=1) (per-thread CPU time) for prices that do not depend on it")
    elif gate is not None:
        message += (f"; another process may be using the CPU, or the {settings.threads or 'default'} timing threads' "
                    f"speed drifts on this machine ({gate.describe()}; on a virtual machine the host decides where "
                    "they run): stop other processes, or pass LatencySettings(threads=1) (per-thread CPU time) for "
                    "prices that do not depend on it")
    elif settings.clock_used == "wall" and settings.torch_device.type == "cpu":
        message += ("; another process is probably using the CPU: pass LatencySettings(threads=1) (per-thread "
                    "CPU time) or stop it")
    else:
        message += "; raise repeats, or stop other processes using the CPU"
    if settings.on_load == "raise":
        raise LatencyLoadError(message)
    warnings.warn(message, LatencyLoadWarning, stacklevel=3)
