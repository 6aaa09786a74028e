"""Is the machine busy? The load probe and what a busy CPU makes a latency build do (torch only)."""

from __future__ import annotations

import os
import time
import warnings
from dataclasses import dataclass
from typing import Any

from .latency_settings import LatencySettings

__all__ = ["LOAD_MARGIN", "LatencyLoadError", "LatencyLoadWarning", "LoadProbe", "check_load", "probe_load"]

#: Other processes using more CPU than ``cores - threads + LOAD_MARGIN`` cores make a
#: multi-threaded or wall-clock timing unreliable. Half a core: the probe's ``/proc/stat``
#: accounting is tick-based (10 ms) and kernel threads use a little CPU, so a smaller margin
#: flagged quiet 2-core machines; a real competing process uses a whole core.
LOAD_MARGIN = 0.5


class LatencyLoadError(RuntimeError):
    """Timings are not repeatable (another process is using the CPU); see the message for what to do."""


class LatencyLoadWarning(UserWarning):
    """Timings may be unreliable, or the settings were changed to the robust ones because of load."""


@dataclass(frozen=True)
class LoadProbe:
    """How busy the machine was just before measuring.

    Attributes:
        cores: CPUs the scheduler can use (``os.cpu_count()``).
        others: CPU used by other processes, in cores (``None`` where ``/proc/stat`` is missing).
        preempted: Fraction of a single-threaded busy loop's wall time spent descheduled.
        seconds: How long the probe took.
    """

    cores: int
    others: float | None
    preempted: float
    seconds: float

    def busy_for(self, threads: int) -> bool:
        """Whether ``threads`` timing threads would have to share cores with other processes."""
        if self.others is not None:
            return self.others > max(self.cores - threads, 0) + LOAD_MARGIN
        return self.preempted > 0.1

    def describe(self) -> str:
        """A short human-readable account, e.g. ``"other processes use 1.7 of 2 cores"``."""
        if self.others is not None:
            return f"other processes use {self.others:.1f} of {self.cores} cores"
        return f"a busy loop was descheduled {self.preempted:.0%} of the time"


def _proc_stat() -> tuple[float, float] | None:
    """``(busy, total)`` jiffies summed over all CPUs, from ``/proc/stat`` (``None`` off Linux)."""
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            fields = [float(v) for v in fh.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    total = sum(fields[:8])  # guest time is already counted in user/nice
    return total - idle, total


def probe_load(seconds: float = 0.3) -> LoadProbe:
    """Measure how much CPU other processes use, and how often a busy thread is descheduled.

    For ``seconds``, one thread of this process spins on a small loop. ``/proc/stat`` gives the
    whole machine's busy CPU time over the probe, minus this process's own CPU time: what
    other processes used. The spinning thread's CPU time over its wall time gives the
    fraction it was descheduled (the portable fallback where ``/proc/stat`` is missing).

    Args:
        seconds: Probe duration.

    Returns:
        A :class:`LoadProbe`.
    """
    cores = os.cpu_count() or 1
    before_stat, before_self = _proc_stat(), time.process_time()
    wall0, cpu0 = time.perf_counter(), time.thread_time()
    x = 0
    while time.perf_counter() - wall0 < seconds:
        for i in range(1000):
            x += i
    wall, cpu = time.perf_counter() - wall0, time.thread_time() - cpu0
    after_stat, own = _proc_stat(), time.process_time() - before_self
    others = None
    if before_stat is not None and after_stat is not None and after_stat[1] > before_stat[1]:
        busy_fraction = (after_stat[0] - before_stat[0]) / (after_stat[1] - before_stat[1])
        others = max(busy_fraction * cores - own / wall, 0.0)
    return LoadProbe(cores=cores, others=others, preempted=max(1.0 - cpu / wall, 0.0), seconds=wall)


def check_load(settings: LatencySettings, probe: Any = None) -> tuple[LatencySettings, LoadProbe | None, str]:
    """Decide, before measuring, whether the settings can give repeatable numbers now.

    Only CPU timings with the wall clock are at risk (the thread clock ignores time spent
    descheduled); for those, a busy machine is handled as ``settings.on_load`` says.

    Args:
        settings: The requested settings.
        probe: The load probe (default :func:`probe_load`; replaceable in tests).

    Returns:
        The settings to measure with (:meth:`LatencySettings.robust` after a fallback), the
        probe (``None`` if none was needed) and a note saying what was done (``""``: nothing).

    Raises:
        LatencyLoadError: With ``on_load="raise"`` on a busy machine.
    """
    if settings.on_load == "ignore" or settings.torch_device.type != "cpu" or settings.clock_used == "thread":
        return settings, None, ""
    found = (probe or probe_load)()
    if not found.busy_for(settings.threads_used):
        return settings, found, ""
    problem = (f"another process is using the CPU ({found.describe()}), so timings at threads="
               f"{settings.threads_used} with the wall clock are not repeatable")
    advice = "pass LatencySettings(threads=1) (it times per-thread CPU time) or stop the other process(es)"
    if settings.on_load == "raise":
        raise LatencyLoadError(f"{problem}; {advice}")
    if settings.on_load == "warn":
        note = f"{problem}; measuring anyway (on_load='warn'): {advice}"
        warnings.warn(note, LatencyLoadWarning, stacklevel=3)
        return settings, found, note
    note = (f"{problem}; measuring at threads=1 with the thread CPU clock instead (on_load='fallback'). "
            f"To time {settings.threads_used} threads, stop the other process(es)")
    warnings.warn(note, LatencyLoadWarning, stacklevel=3)
    return settings.robust(), found, note
