"""Tests of the parallel-state gate (lightning_layermerge.planning.tables.parallel_gate).

The machine state it detects (threads that stop getting a parallel speed-up) cannot be made
on demand, so the sentinel's probe, the clock and the sleep are replaced by scripted ones.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_layermerge import trace
from lightning_layermerge.planning import Timers
from lightning_layermerge.planning.tables import latency as latency_module
from lightning_layermerge.planning.tables import parallel_gate
from lightning_layermerge.planning.tables.latency import TOTAL_KEY, LatencySettings, build_latency_table
from lightning_layermerge.planning.tables.parallel_gate import MAX_WAIT_S, ParallelGate, gate_for, sentinel

ORT2 = LatencySettings(runtime="onnxruntime", threads=2, warmup=0, repeats=1, on_load="ignore", context=False)


class FakeClock:
    """A clock that only moves when the gate sleeps."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def scripted_gate(ratios: list[float], settings: LatencySettings = ORT2) -> tuple[ParallelGate, FakeClock]:
    """A gate whose probes return ``ratios`` in order (the last one repeated)."""
    clock, queue = FakeClock(), list(ratios)
    gate = ParallelGate(settings, clock=clock, sleep=clock.sleep,
                        probe=lambda: queue.pop(0) if len(queue) > 1 else queue[0])
    return gate, clock


def test_gate_applies_to_multithread_onnxruntime_on_cpu_only() -> None:
    assert gate_for(LatencySettings()) is None  # eager, 1 thread, thread clock
    assert gate_for(LatencySettings(threads=2)) is None  # eager at 2 threads: not gated
    assert gate_for(LatencySettings(runtime="onnxruntime", threads=1)) is None  # nothing to hand off
    first = gate_for(LatencySettings(runtime="onnxruntime", threads=2))
    assert isinstance(first, ParallelGate)
    # One gate per machine setting and process: the best state seen is shared by every build.
    assert gate_for(LatencySettings(runtime="onnxruntime", threads=2, repeats=7)) is first


def test_wait_returns_once_the_threads_run_in_parallel_again() -> None:
    gate, clock = scripted_gate([0.75, 1.4, 1.45, 1.4, 0.8])
    assert gate.wait()  # 0.75: parallel, no wait
    assert clock.now == 0.0 and gate.best == 0.75
    assert gate.wait()  # three slow probes, then 0.8 (within 30 % of 0.75)
    assert clock.now == pytest.approx(3 * parallel_gate.POLL_S)
    assert gate.last == 0.8


def test_wait_gives_up_after_its_limit_and_gated_counts_the_slow_timing() -> None:
    gate, clock = scripted_gate([0.75, 1.4])
    gate.ratio()  # the best state: 0.75
    taken: list[int] = []
    result = gate.gated(lambda: taken.append(1) or len(taken), tries=2)
    assert result == 2 and len(taken) == 2  # re-taken once, then given up
    assert gate.slow_timings == 1
    assert clock.now >= 2 * MAX_WAIT_S  # waited the limit before each try
    assert "1 timing(s) taken without a parallel speed-up" in gate.describe()


def test_gated_retakes_a_timing_during_which_the_state_changed() -> None:
    gate, _ = scripted_gate([0.75, 1.5, 0.76, 0.74])  # before, after (slow), before, after
    taken: list[int] = []
    assert gate.gated(lambda: taken.append(1) or len(taken)) == 2
    assert gate.slow_timings == 0


def test_total_wait_is_bounded_over_the_gates_life() -> None:
    gate, clock = scripted_gate([0.75, 1.4])
    gate.ratio()
    for _ in range(int(parallel_gate.MAX_TOTAL_WAIT_S / MAX_WAIT_S) + 3):
        gate.wait()
    assert clock.now <= parallel_gate.MAX_TOTAL_WAIT_S + parallel_gate.POLL_S


def test_stale_compares_with_the_best_state_seen_since() -> None:
    gate, _ = scripted_gate([1.4, 0.75])
    assert not gate.stale(gate.ratio())  # the first state seen is the best so far
    gate.ratio()  # now 0.75 has been seen
    assert gate.stale(1.4) and not gate.stale(0.9) and not gate.stale(float("nan"))


def test_a_build_retimes_what_it_timed_before_the_parallel_state_was_seen(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(8, 8, 1)).eval()
    chain = trace(model, torch.randn(2, 3, 8, 8))
    # The first two timings run without a speed-up (sentinel 1.4, and slow: 5 ms); then 0.75 and 2 ms.
    gate, _ = scripted_gate([1.4, 1.4, 0.75])
    monkeypatch.setattr(latency_module, "gate_for", lambda settings: gate)
    timed: list[float] = []

    def samples(runs, settings):
        slow = gate.ratio() > 1.0
        timed.append(5.0 if slow else 2.0)
        return [[timed[-1]] for _ in runs]

    table = build_latency_table(model, chain, ORT2, progress=False, timers=Timers(samples=samples))
    distinct = len({latency_module._geometry(s) for s in chain.segments if not (s.identity and s.activation is None)})
    assert timed.count(5.0) == 2
    assert len(timed) == distinct + 1 + 2  # every geometry and the total once, the two slow ones again
    timed_keys = [s.key for s in chain.segments if not (s.identity and s.activation is None)]
    assert all(table.entries[k] == 2.0 for k in timed_keys) and table.total_ms == 2.0


def test_sentinel_is_small_and_fixed() -> None:
    (net, (x,)), (net2, (x2,)) = sentinel(), sentinel()
    assert x.shape == (16, 32, 8, 8) and torch.equal(x, x2)
    with torch.no_grad():
        assert torch.equal(net(x), net2(x2))  # the same network every time: ratios compare across builds
    assert sum(isinstance(m, nn.Conv2d) for m in net.modules()) == 8


def test_real_probe_gives_a_positive_ratio() -> None:
    pytest.importorskip("onnxruntime")
    gate = ParallelGate(ORT2)
    value = gate.ratio()
    assert 0.05 < value < 20 and gate.best == value


def test_a_build_that_waited_says_so_in_its_load_note(monkeypatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    chain = trace(model, torch.randn(2, 3, 8, 8))
    gate, clock = scripted_gate([0.75])
    monkeypatch.setattr(latency_module, "gate_for", lambda settings: gate)

    def samples(runs, settings):  # each timing waits 2.5 s for the parallel state, as on a VM whose cores drift
        clock.sleep(2.5)
        gate.waited_s += 2.5
        gate.ratio()
        return [[1.0] for _ in runs]

    table = build_latency_table(model, chain, ORT2, progress=False, timers=Timers(samples=samples))
    assert table.load_note.startswith("waited ") and "parallel speed-up" in table.load_note
    assert "0 timing(s) taken without it" in table.load_note
    quiet, _ = scripted_gate([0.75])
    monkeypatch.setattr(latency_module, "gate_for", lambda settings: quiet)
    plain = build_latency_table(model, chain, ORT2, progress=False, timers=Timers(samples=lambda r, s: [[1.0] for _ in r]))
    assert plain.load_note == ""


def test_unrepeatable_gated_timings_name_the_drift_and_the_way_out(monkeypatch) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 1)).eval()
    chain = trace(model, torch.randn(2, 3, 8, 8))
    gate, _ = scripted_gate([0.75])  # the threads run in parallel throughout, yet the passes disagree
    monkeypatch.setattr(latency_module, "gate_for", lambda settings: gate)
    noisy = Timers(samples=lambda runs, s: [[1.0, 1.0, 3.0, 3.0, 1.0, 1.0] for _ in runs],
                   probe=lambda: latency_module.LoadProbe(cores=2, others=0.05, preempted=0.0, seconds=0.3))
    settings = LatencySettings(runtime="onnxruntime", threads=2, warmup=0, repeats=6, retries=0, context=False)
    with pytest.warns(latency_module.LatencyLoadWarning,
                      match=r"unrepeatable.*speed drifts on this machine.*LatencySettings\(threads=1\)"):
        table = build_latency_table(model, chain, settings, progress=False, timers=noisy)
    assert TOTAL_KEY in table.unreliable and gate.slow_timings == 0
