"""Do the timing threads get their parallel speed-up right now? A sentinel that waits until they do (torch only).

On a virtual machine the host decides where the guest's cores run. Measured on a 2-vCPU cloud
VM with nothing else running: for stretches of 2 s to 2 min, a thread handing work to the other
core waited 3x longer (a two-thread ping-pong took 380-610 ns per round trip instead of
160-250 ns), and an ONNX Runtime session of many small kernels at 2 threads then ran as slowly
as at 1 thread (the digits MobileNetV2 0.77-0.87 ms instead of 0.43-0.46 ms), while a single
large conv still got most of its speed-up. Networks of small layers slow down, networks of
large ones do not, so a table whose entries were timed partly in each state prices plans
wrongly (2-thread ONNX Runtime plans off by up to 48 %), and a network timed in the other
state than its table disagrees with it. Nothing in the process shows it: the load probe sees
no other process, and one thread at a time runs at full speed on either core.

:class:`ParallelGate` measures the state directly: a fixed *sentinel* network of small
depthwise and pointwise layers, run at the timing's thread count and at one thread in the same
runtime. Its ratio (multi-thread time / single-thread time) is ~0.7-0.85 when the threads get
their speed-up and ~1.35-1.55 when they do not (the same VM). Timings are taken when the ratio
is within :data:`TOLERANCE` of the best ratio seen in this process, and re-taken when the state
changed while they ran, so a table and the networks measured against it see the same machine:
the one whose threads run in parallel. Applied to ONNX Runtime timings with more than one thread
on CPU (:func:`gate_for`), where it was measured; eager PyTorch's 2-thread timings moved ~13 %
on the same network between the states and already met the 5 % bar in the fidelity matrix.
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .latency_settings import LatencySettings
from .runtime import prepare_call

__all__ = ["TOLERANCE", "ParallelGate", "gate_for", "ort_threads", "sentinel"]

#: A state is "parallel" while the sentinel's ratio is at most ``(1 + TOLERANCE)`` times the best
#: ratio seen in this process (measured: 0.70-0.85 vs 1.35-1.55, so 0.3 separates them with margin).
TOLERANCE = 0.3
#: Sentinel passes per probe at each thread count (about 1.5 ms in all on the VM above).
PROBE_PASSES = 10
#: Longest wait, in seconds, for the parallel state before a timing is taken anyway (and flagged).
MAX_WAIT_S = 10.0
#: Longest wait, in seconds, over a gate's life: a machine that stays without parallel speed-up
#: for this long has changed for good, and timings are taken (and counted as slow) without waiting.
MAX_TOTAL_WAIT_S = 120.0
#: Pause between probes while waiting.
POLL_S = 0.2

# One gate per (runtime, threads, device, dtype) and process: the best ratio is a property of the machine.
_GATES: dict[tuple, ParallelGate] = {}


def sentinel() -> tuple[nn.Module, tuple[torch.Tensor]]:
    """The probe network and its input: four depthwise 3x3 + pointwise 1x1 pairs, 32 channels, 8x8 maps, batch 16.

    Small kernels are what a slow hand-off between cores hurts most (each one is split over the
    threads and joined again), so the sentinel is made of nothing else.
    """
    gen = torch.Generator().manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(4):
        layers += [nn.Conv2d(32, 32, 3, padding=1, groups=32), nn.ReLU(), nn.Conv2d(32, 32, 1), nn.ReLU()]
    net = nn.Sequential(*layers).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    return net, (torch.randn(16, 32, 8, 8, generator=gen),)


class ParallelGate:
    """Waits until the timing threads get their parallel speed-up, and tells whether they kept it.

    Args:
        settings: The timing settings (runtime, threads, device, dtype); the sentinel runs in
            their runtime at ``settings.threads`` threads and at 1 thread.
        clock: Wall clock (replaceable in tests).
        sleep: Pause function (replaceable in tests).
        probe: ``() -> ratio``; default: time the sentinel (replaceable in tests).
    """

    def __init__(self, settings: LatencySettings, *, clock: Callable[[], float] = time.perf_counter,
                 sleep: Callable[[float], None] = time.sleep, probe: Callable[[], float] | None = None) -> None:
        self.settings = settings
        self.clock, self.sleep = clock, sleep
        self._probe = probe
        self._calls: tuple[Any, Any] | None = None
        self.best = float("inf")
        self.last = float("nan")
        self.waited_s = 0.0
        self.slow_timings = 0

    def _sentinel_calls(self) -> tuple[Any, Any]:
        """The sentinel prepared at the settings' thread count and at one thread (lazily, once)."""
        if self._calls is None:
            s = self.settings
            make = lambda threads: prepare_call(*sentinel(), runtime=s.runtime, memory_format=s.memory_format,  # noqa: E731
                                                device=s.torch_device, dtype=s.torch_dtype, threads=threads)
            self._calls = (make(s.threads), make(1))  # None: the runtime's default, as the timed sessions
        return self._calls

    def ratio(self) -> float:
        """The sentinel's multi-thread / single-thread median pass time now (also updates :attr:`best`)."""
        if self._probe is not None:
            value = self._probe()
        else:
            from .timing import _passes  # timing imports this module for gate_for: imported here, not at the top

            with torch.no_grad():
                # One untimed round: a sleeping worker pool's first pass is a wake-up, not the state.
                many, one = _passes(self._sentinel_calls(), PROBE_PASSES, torch.device("cpu"), time.perf_counter,
                                    untimed=1)
            value = statistics.median(many) / statistics.median(one)
        self.last = value
        self.best = min(self.best, value)
        return value

    def parallel(self, ratio: float | None = None) -> bool:
        """Whether ``ratio`` (default: a fresh probe) is within :data:`TOLERANCE` of the best seen."""
        value = self.ratio() if ratio is None else ratio
        return value <= self.best * (1 + TOLERANCE)

    def wait(self, max_wait_s: float = MAX_WAIT_S) -> bool:
        """Probe until the threads run in parallel, for at most ``max_wait_s`` seconds.

        Returns:
            ``True`` once they do; ``False`` if they still did not after the wait.
        """
        start = self.clock()
        max_wait_s = min(max_wait_s, max(MAX_TOTAL_WAIT_S - self.waited_s, 0.0))
        while not self.parallel():
            if self.clock() - start >= max_wait_s:
                self.waited_s += self.clock() - start
                return False
            self.sleep(POLL_S)
        self.waited_s += self.clock() - start
        return True

    def gated(self, take: Callable[[], Any], tries: int = 3) -> Any:
        """``take()`` run when the threads are parallel, and again if they stopped being so meanwhile.

        Args:
            take: One timing attempt.
            tries: Attempts before giving up; the last one is returned then and counted in
                :attr:`slow_timings`.
        """
        for _ in range(tries):
            self.wait()
            result = take()
            if self.parallel():
                return result
        self.slow_timings += 1
        return result

    def stale(self, ratio: float) -> bool:
        """Whether a timing taken at sentinel ``ratio`` lacked the speed-up seen since (``nan``: unknown, no)."""
        return math.isfinite(ratio) and not self.parallel(ratio)

    def describe(self) -> str:
        """A one-line account for reports and warnings."""
        return (f"parallel-state sentinel: best {ort_threads(self.settings)}-thread/1-thread ratio {self.best:.2f}, "
                f"last {self.last:.2f}, waited {self.waited_s:.1f} s, {self.slow_timings} timing(s) taken without "
                f"a parallel speed-up")


def ort_threads(settings: LatencySettings) -> int:
    """ONNX Runtime's intra-op threads for ``settings`` (``None``: its default, one per core)."""
    return settings.threads if settings.threads is not None else (os.cpu_count() or 1)


def gate_for(settings: LatencySettings) -> ParallelGate | None:
    """The process-wide gate for ``settings``, or ``None`` where none is needed.

    Gated: ONNX Runtime on CPU with more than one thread and the wall clock (the case measured
    above). Not gated: one thread (nothing to hand off), the thread clock (one thread), CUDA,
    eager and TorchScript.
    """
    if (settings.runtime != "onnxruntime" or settings.torch_device.type != "cpu"
            or ort_threads(settings) <= 1 or settings.clock_used != "wall"):
        return None
    key = (settings.runtime, ort_threads(settings), str(settings.torch_device), str(settings.torch_dtype))
    if key not in _GATES:
        _GATES[key] = ParallelGate(settings)
    return _GATES[key]
