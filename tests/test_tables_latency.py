"""Tests of the latency table (lightning_layermerge.tables.latency).

Timings on a shared CPU are noise, so no test asserts milliseconds: they check which
modules are timed, how many times, and what the cache returns.
"""

from __future__ import annotations

import math
import time
import random
import warnings
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from lightning_layermerge import Plan, merge, prune, trace
from lightning_layermerge.planning.tables import latency as latency_module
from lightning_layermerge.planning import Timers
from lightning_layermerge.planning.tables.cache import TableCacheWarning
from lightning_layermerge.planning.tables.latency import (
    TOTAL_KEY,
    LatencySettings,
    LatencyTable,
    build_latency_table,
    segment_module,
    time_module,
)

FAST = LatencySettings(warmup=0, repeats=1)


class TinyNet(nn.Module):
    """Stem, one residual block, a strided conv, a 1x1 conv and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.down = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16), nn.ReLU6())
        self.c3 = nn.Conv2d(16, 16, 1)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(x + self.b2(self.c2(y)))
        return self.head(torch.sigmoid(self.c3(self.down(x))))


class TwoInputNet(nn.Module):
    """A network whose forward takes two tensors (an image and a per-sample scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(4, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x))) * scale


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = TinyNet().eval()
    return model, trace(model, torch.randn(2, 3, 12, 12))


class CountingTimer:
    """Timing functions (``samples`` for entries and the whole model, ``nodes`` for the whole
    model in place) that count their calls and fail after ``fail_after`` calls, like an
    interrupted build. Pass ``timer.timers`` to the build."""

    def __init__(self, fail_after: int | None = None, base: Timers = Timers()) -> None:
        self.fail_after, self.calls = fail_after, 0
        self.timers = replace(base, samples=self._wrap(base.samples), nodes=self._wrap(base.nodes))

    def _wrap(self, real):
        def timed(*args, **kwargs):
            if self.fail_after is not None and self.calls >= self.fail_after:
                raise RuntimeError("interrupted")
            self.calls += 1
            return real(*args, **kwargs)
        return timed


def distinct_geometries(chain) -> int:
    """How many different timed modules the chain's segments produce (all but bare identities)."""
    return len({latency_module._geometry(s) for s in chain.segments if not (s.identity and s.activation is None)})


# ---------------------------------------------------------------------- building


def test_every_legal_segment_has_an_entry_and_identities_cost_their_activation(tiny) -> None:
    model, chain = tiny
    table = build_latency_table(model, chain, FAST, progress=False)
    assert set(table.entries) == {s.key for s in chain.segments}
    bare = [s.key for s in chain.segments if s.identity and s.activation is None]
    activated = [s.key for s in chain.segments if s.identity and s.activation is not None]
    assert activated, "TinyNet must have identity segments for this test to mean anything"
    assert all(table.entries[k] == 0.0 for k in bare)  # nothing left to run
    # A removed conv leaves the activation after it in the network; it is priced, not free.
    assert all(table.alone[k] > 0 for k in activated)
    assert all(table.entries[s.key] > 0 for s in chain.segments if not s.identity)
    keep_all = Plan.keep_all(chain).keys
    assert table.chain_ms == pytest.approx(sum(table.entries[k] for k in keep_all), rel=1e-12)
    assert table.total_ms > 0 and table.settings == FAST


def test_equal_geometries_are_timed_once(tiny) -> None:
    model, chain = tiny
    timer = CountingTimer()
    table = build_latency_table(model, chain, FAST, progress=False, timers=timer.timers)
    assert timer.calls == distinct_geometries(chain) + 2  # + the whole model, + its operations in place (context)
    by_geometry: dict = {}
    for seg in chain.segments:  # equal modules get the very same number (before the in-place scaling)
        assert by_geometry.setdefault(latency_module._geometry(seg), table.alone[seg.key]) == table.alone[seg.key]


def test_segment_module_is_conv_then_activation(tiny) -> None:
    _, chain = tiny
    for seg in chain.segments:
        module = segment_module(chain, seg)
        act = chain.positions[seg.j].activation_type
        expected = (0 if seg.identity else 1) + (act is not None)
        assert len(module) == expected
        if not seg.identity:
            conv = module[0]
            assert isinstance(conv, nn.Conv2d) and conv.bias is not None
            out = conv(torch.randn(seg.in_shape))
            assert tuple(out.shape) == seg.out_shape
        if act is not None:  # module activations are copies, functional ones are wrapped
            last = module[-1]
            name = type(last).__name__ if isinstance(last, (nn.ReLU, nn.ReLU6)) else last.fn.__name__
            assert name == act


def conv_geometry(conv: nn.Conv2d) -> tuple:
    return (conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.groups)


def short_plan(chain, rng: random.Random, max_span: int = 3) -> Plan:
    """A random covering by segments of at most ``max_span`` layers (many segments, quick to merge)."""
    at, keys = 0, []
    while at < chain.num_layers:
        options = [s for s in chain.segments if s.i == at]
        seg = rng.choice([s for s in options if s.j - s.i <= max_span] or options)
        keys.append(seg.key)
        at = seg.j
    return Plan.from_segments(chain, keys)


@pytest.mark.parametrize("arch, seed, at_least", [("resnet18", 0, 12), ("mobilenet_v2", 1, 40)])
def test_segment_module_matches_what_merge_produces(arch: str, seed: int, at_least: int) -> None:
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)().eval()
    chain = trace(model, torch.randn(1, 3, 32, 32))  # 32x32: late stages are 1x1/2x2, kernels get trimmed
    rng = random.Random(seed)
    # remove_all: long merged segments; short plans: many segments (and quick to merge).
    plans = [Plan.remove_all(chain) if arch == "resnet18" else short_plan(chain, rng, max_span=2),
             short_plan(chain, rng)]
    checked: set = set()
    for plan in plans:
        merged = dict(merge(prune(model, chain, plan)).named_modules())
        for seg in plan.segments:
            ours = segment_module(chain, seg)
            name = f"merged_{seg.i}_{seg.j}"
            if seg.identity:
                assert name not in merged and not any(isinstance(m, nn.Conv2d) for m in ours)
                continue
            assert conv_geometry(ours[0]) == conv_geometry(merged[name]), (arch, seg.key)
            checked.add(seg)
    assert len(checked) >= at_least  # many different segments, not a handful
    assert any(len(s.convs) > 1 for s in checked)  # merged ones among them
    if arch == "resnet18":  # ... and ones whose merged kernel merge trims on a tiny feature map
        assert any(s.kernel < s.k for s in checked)


def test_total_uses_the_example_with_the_batch_replaced() -> None:
    model = TwoInputNet().eval()
    example = (torch.randn(3, 3, 8, 8), torch.rand(3, 1, 1, 1))
    chain = trace(model, example)
    seen: list[tuple] = []

    def record(runs, settings):
        (module, inputs), = runs
        seen.append(tuple(tuple(a.shape) for a in inputs))
        return [[1.0]]

    table = build_latency_table(model, chain, LatencySettings(batch_size=5), progress=False,
                                timers=Timers(samples=record))
    assert seen[-1] == ((5, 3, 8, 8), (5, 1, 1, 1))  # the whole model, both arguments batched
    assert all(shape[0][0] == 5 for shape in seen[:-1])  # segments too
    assert table.total_ms == 1.0
    inputs = latency_module.batched_example(chain, 5)
    assert torch.equal(inputs[0][3:], example[0][:2]) and torch.equal(inputs[1][:3], example[1])


# ---------------------------------------------------------------------- timing


def test_time_module_puts_eval_no_grad_and_restores_threads() -> None:
    class Probe(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.calls, self.training_seen, self.grad_seen = 0, set(), set()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self.calls += 1
            self.training_seen.add(self.training)
            self.grad_seen.add(torch.is_grad_enabled())
            return x.double() * 2

    probe = Probe().train()
    before = torch.get_num_threads()
    ms = time_module(probe, (torch.ones(2),), LatencySettings(warmup=3, repeats=5, threads=1, dtype="float64"))
    assert ms >= 0 and math.isfinite(ms)
    assert probe.calls == 8 and probe.training_seen == {False} and probe.grad_seen == {False}
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("kwargs, error", [
    ({"dtype": "int8"}, ValueError), ({"device": "tpu"}, ValueError), ({"repeats": 0}, ValueError),
    ({"warmup": -1}, ValueError), ({"threads": 0}, ValueError), ({"batch_size": 2.5}, TypeError),
])
def test_settings_are_validated(kwargs: dict, error: type) -> None:
    with pytest.raises(error):
        LatencySettings(**kwargs)


def test_time_nodes_times_every_operation_in_place(tiny) -> None:
    model, chain = tiny
    merged = merge(prune(model, chain, Plan.keep_all(chain)))
    calls = {n.name for n in merged.graph.nodes if n.op in ("call_module", "call_function", "call_method")}
    times = latency_module.time_nodes(merged, chain.example, LatencySettings(warmup=1, repeats=3))
    assert set(times) == calls and all(v >= 0 for v in times.values())
    reference = (nn.Conv2d(3, 3, 3), (torch.randn(1, 3, 8, 8),))
    ratios = latency_module.time_nodes(merged, chain.example, LatencySettings(warmup=0, repeats=2),
                                       reference=reference)
    assert set(ratios) == calls and all(v >= 0 for v in ratios.values())


# ---------------------------------------------------------------------- table arithmetic


def test_budget_for_and_predicted_ms() -> None:
    table = LatencyTable({(0, 1, 3): 3.0, (1, 2, 3): 4.0, (0, 2, 5): 5.5, (1, 2, 1): 0.0},
                         total_ms=10.0, chain_ms=7.0, settings=LatencySettings())
    assert table.outside_ms == 3.0
    assert table.budget_for(0.5) == pytest.approx(2.0)
    assert table.budget_for(1.0) == pytest.approx(7.0)
    assert table.predicted_ms([(0, 1, 3), (1, 2, 3)]) == pytest.approx(10.0)
    assert table.predicted_ms([(0, 2, 5)]) == pytest.approx(8.5)
    assert table.predicted_ms([(0, 1, 3), (1, 2, 1)]) == pytest.approx(6.0)
    with pytest.raises(ValueError, match=r"outside the chain alone takes 3 ms \(30.0% of the total\)"):
        table.budget_for(0.3)
    with pytest.raises(KeyError, match=r"\(2, 3, 3\)"):
        table.predicted_ms([(2, 3, 3)])
    noisy = LatencyTable({(0, 1, 3): 6.0}, total_ms=5.0, chain_ms=6.0, settings=LatencySettings())
    assert noisy.outside_ms == 0.0 and noisy.budget_for(0.5) == pytest.approx(2.5)


def test_predicted_ms_accepts_segments(tiny) -> None:
    _, chain = tiny
    entries = {s.key: float(n) for n, s in enumerate(chain.segments)}
    table = LatencyTable(entries, total_ms=1000.0, chain_ms=1.0, settings=LatencySettings())
    plan = Plan.keep_all(chain)
    assert table.predicted_ms(plan.segments) == table.predicted_ms(plan.keys) == 999.0 + sum(entries[k] for k in plan.keys)


# ---------------------------------------------------------------------- cache


def test_second_build_measures_nothing(tiny, tmp_path: Path) -> None:
    model, chain = tiny
    first = build_latency_table(model, chain, FAST, cache_dir=tmp_path, progress=False)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].name.startswith(f"latency-{chain.fingerprint}-")
    nothing = CountingTimer(fail_after=0).timers
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = build_latency_table(model, chain, FAST, cache_dir=tmp_path, progress=False, timers=nothing)
    assert again == first
    # Other settings (here the batch size) are a different table: measured, not reused.
    with pytest.raises(RuntimeError, match="interrupted"):
        build_latency_table(model, chain, LatencySettings(warmup=0, repeats=1, batch_size=3),
                            cache_dir=tmp_path, progress=False, timers=nothing)


def test_interrupted_build_resumes_with_the_missing_entries_only(tiny, tmp_path: Path) -> None:
    model, chain = tiny
    needed = distinct_geometries(chain) + 2  # + the whole model, + its operations in place
    interrupted = CountingTimer(fail_after=needed // 2)
    with pytest.raises(RuntimeError, match="interrupted"):
        build_latency_table(model, chain, FAST, cache_dir=tmp_path, progress=False, timers=interrupted.timers)
    assert interrupted.calls == needed // 2
    resumed = CountingTimer()
    table = build_latency_table(model, chain, FAST, cache_dir=tmp_path, progress=False, timers=resumed.timers)
    assert resumed.calls == needed - needed // 2  # nothing measured twice
    assert set(table.entries) == {s.key for s in chain.segments} and table.total_ms > 0


def test_corrupted_cache_is_rebuilt_with_a_warning(tiny, tmp_path: Path) -> None:
    model, chain = tiny
    build_latency_table(model, chain, FAST, cache_dir=tmp_path, progress=False)
    (path,) = tmp_path.iterdir()
    path.write_text(path.read_text()[: len(path.read_text()) // 2])  # truncated mid-write
    timer = CountingTimer()
    with pytest.warns(TableCacheWarning, match="corrupt"):
        table = build_latency_table(model, chain, FAST, cache_dir=tmp_path, progress=False, timers=timer.timers)
    assert timer.calls == distinct_geometries(chain) + 2  # everything measured again
    assert set(table.entries) == {s.key for s in chain.segments}
    assert all(table.entries[s.key] > 0 for s in chain.segments if not s.identity)
    assert latency_module.TableCache(path, latency_module._cache_key(chain, FAST, None)).get(TOTAL_KEY) == table.total_ms


# ---------------------------------------------------------------------- reference mode


class _Tag(nn.Module):
    """Appends its name to ``order`` on every forward pass."""

    def __init__(self, name: str, order: list[str]) -> None:
        super().__init__()
        self.name, self.order = name, order

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.order.append(self.name)
        return x + 1


def test_time_interleaved_alternates_passes() -> None:
    order: list[str] = []
    Tag = lambda name: _Tag(name, order)  # noqa: E731

    ms = latency_module.time_interleaved([(Tag("a"), (torch.ones(3),)), (Tag("b"), torch.ones(3))],
                                         LatencySettings(warmup=2, repeats=3))
    assert order == ["a", "a", "b", "b"] + ["a", "b"] * 3  # warm-up each, then alternate
    assert len(ms) == 2 and all(v >= 0 for v in ms)


def test_gated_interleaved_passes_are_settled(monkeypatch) -> None:
    """Under the parallel-state gate every timed pass of two modules follows an untimed one of the same module."""
    from lightning_layermerge.planning.tables import timing

    order: list[str] = []
    Tag = lambda name: _Tag(name, order)  # noqa: E731

    class Gate:
        def gated(self, take):
            return take()

    monkeypatch.setattr(timing, "gate_for", lambda settings: Gate())
    settings = LatencySettings(warmup=1, repeats=2)
    latency_module.time_interleaved([(Tag("a"), (torch.ones(3),)), (Tag("b"), (torch.ones(3),))], settings)
    # warm-up each, one untimed round after the gate's wait, then (untimed, timed) pairs in turn
    assert order == ["a", "b"] + ["a", "b"] + ["a", "a", "b", "b"] * 2
    order.clear()
    latency_module.time_interleaved([(Tag("c"), (torch.ones(3),))], settings)
    assert order == ["c"] * 4  # one module never switches: no settling pass


def test_reference_mode_stores_the_median_pass_ratio_times_the_reference(tiny, tmp_path: Path) -> None:
    model, chain = tiny
    settings = LatencySettings(warmup=0, repeats=3, reference=True, max_spread=1.0)  # ratios 3, 2, 3: spread 33 %
    runs: list[int] = []

    def fake_samples(pairs, s):
        assert len(pairs) == 2 and s is settings  # (reference, module), interleaved
        runs.append(1)
        return [[1.0, 2.0, 1.0], [3.0, 4.0, 3.0]]  # pass ratios 3, 2, 3 -> median 3

    def fake_nodes(gm, inputs, s, reference=None):
        assert reference is not None and s is settings
        return {"conv": 2.5, "add": 0.5}  # median ratios to the reference, per operation

    fake = Timers(module=lambda m, i, s: 2.0, samples=fake_samples, nodes=fake_nodes)  # module: the reference alone
    table = build_latency_table(model, chain, settings, cache_dir=tmp_path, progress=False, timers=fake)
    assert table.total_ms == 6.0  # (2.5 + 0.5) x 2.0
    (skip,) = chain.skips
    for seg in chain.segments:  # 3 x 2.0, plus the in-place addition (0.5 x 2.0) where the segment keeps it
        keeps_add = chain.analysis.skip_role(skip, seg.i, seg.j) == "end"
        assert table.entries[seg.key] == (7.0 if keeps_add else 6.0)
    assert len(runs) == distinct_geometries(chain)
    (path,) = tmp_path.iterdir()
    assert latency_module.TableCache(path, latency_module._cache_key(chain, settings, None)).get(
        latency_module.REFERENCE_KEY) == 2.0
    # A second build measures nothing, not even the reference.
    def no_timing(*args):
        raise AssertionError("measured again")

    nothing = Timers(module=no_timing, samples=no_timing, nodes=no_timing)
    assert build_latency_table(model, chain, settings, cache_dir=tmp_path, progress=False, timers=nothing) == table


def test_reference_mode_measures_real_modules(tiny) -> None:
    model, chain = tiny
    table = build_latency_table(model, chain, LatencySettings(warmup=0, repeats=2, reference=True), progress=False)
    assert all(table.entries[s.key] > 0 for s in chain.segments if not s.identity) and table.total_ms > 0


# ---------------------------------------------------------------------- load: spread, probe, policy


BUSY = latency_module.LoadProbe(cores=2, others=1.8, preempted=0.6, seconds=0.3)
QUIET = latency_module.LoadProbe(cores=2, others=0.05, preempted=0.0, seconds=0.3)


def test_default_settings_are_the_robust_ones() -> None:
    default = LatencySettings()
    assert default.threads == 1 and default.clock_used == "thread" and default.runtime == "eager"
    assert LatencySettings(threads=None).clock_used == "wall"  # the thread clock misses worker threads
    assert LatencySettings(threads=2).robust() == LatencySettings(threads=1, clock="thread")
    with pytest.raises(ValueError, match="threads=1"):
        LatencySettings(clock="thread", threads=2)
    for kwargs in ({"runtime": "tensorrt"}, {"memory_format": "nhwc"}, {"clock": "cycles"}, {"on_load": "retry"},
                   {"max_spread": 0}, {"runtime": "onnxruntime", "memory_format": "channels_last"},
                   {"runtime": "torchscript", "reference": True}):
        with pytest.raises(ValueError):
            LatencySettings(**kwargs)


def test_spread_compares_the_medians_of_consecutive_blocks() -> None:
    assert latency_module.spread([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0, 1.0, 1.0]) == pytest.approx(1.0)
    assert latency_module.spread([10.0, 11.0, 10.0, 10.5, 10.2, 10.1]) == pytest.approx((10.5 - 10.15) / 10.15)
    assert latency_module.spread([4.0] * 30) == 0.0
    assert math.isnan(latency_module.spread([1.0, 2.0]))  # fewer passes than blocks: nothing to compare
    assert math.isnan(latency_module.spread([1.0, 2.0, 3.0, 4.0, 5.0]))  # single-pass blocks: noise, not spread


def test_noisy_timings_are_measured_again_and_the_most_repeatable_kept() -> None:
    noisy, steady = [[1.0, 1.0, 3.0, 3.0, 1.0, 1.0]], [[2.0, 2.0, 2.08, 2.08, 2.0, 2.0]]
    answers = [noisy, steady, noisy]

    def answer(runs, s):
        return answers.pop(0)

    samples, s = latency_module.time_samples([(nn.Identity(), torch.ones(1))], LatencySettings(retries=2), None, answer)
    assert samples == steady and s == pytest.approx(0.04) and len(answers) == 1  # stopped once repeatable
    answers[:] = [noisy, noisy, noisy]
    samples, s = latency_module.time_samples([(nn.Identity(), torch.ones(1))], LatencySettings(retries=1), None, answer)
    assert samples == noisy and s == pytest.approx(2.0) and len(answers) == 1  # 1 + retries attempts


@pytest.mark.parametrize("on_load", ["fallback", "warn", "raise", "ignore"])
def test_a_busy_machine_is_handled_as_on_load_says(on_load: str) -> None:
    settings = LatencySettings(threads=2, on_load=on_load)
    calls: list[int] = []

    def busy():
        calls.append(1)
        return BUSY

    if on_load == "raise":
        with pytest.raises(latency_module.LatencyLoadError,
                           match=r"another process is using the CPU \(other processes use 1.8 of 2 cores\).*"
                                 r"LatencySettings\(threads=1\)"):
            latency_module.check_load(settings, busy)
        return
    if on_load == "ignore":
        assert latency_module.check_load(settings, busy) == (settings, None, "") and not calls
        return
    with pytest.warns(latency_module.LatencyLoadWarning, match="another process is using the CPU"):
        used, probe, note = latency_module.check_load(settings, busy)
    assert probe is BUSY and note
    if on_load == "fallback":
        assert used.threads == 1 and used.clock_used == "thread" and "threads=1" in note
    else:
        assert used == settings


def test_the_thread_clock_needs_no_load_check_and_a_quiet_machine_passes() -> None:
    def never():
        raise AssertionError("probed")

    assert latency_module.check_load(LatencySettings(), never) == (LatencySettings(), None, "")
    settings = LatencySettings(threads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert latency_module.check_load(settings, lambda: QUIET) == (settings, QUIET, "")
    # At 1 thread on 2 cores, one other busy core still leaves a core free.
    assert not latency_module.LoadProbe(cores=2, others=1.0, preempted=0.0, seconds=0.3).busy_for(1)
    assert latency_module.LoadProbe(cores=2, others=None, preempted=0.3, seconds=0.3).busy_for(1)  # no /proc/stat


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="needs /proc/stat (Linux)")
def test_probe_load_sees_a_busy_process() -> None:
    import subprocess
    import sys

    spinner = subprocess.Popen([sys.executable, "-c", "import time\nt = time.time()\nwhile time.time() - t < 20: pass"])
    try:
        time.sleep(0.3)  # let it start spinning
        probe = latency_module.probe_load(0.5)
    finally:
        spinner.kill()
        spinner.wait()
    assert probe.cores >= 1 and 0.4 <= probe.seconds < 5
    assert probe.others is not None and probe.others >= min(0.7, probe.cores - 0.3)  # at least most of a core
    assert probe.busy_for(probe.cores)  # every core for timing would have to share with it


def test_build_falls_back_to_the_robust_settings_under_load(tiny, tmp_path: Path) -> None:
    model, chain = tiny
    requested = LatencySettings(warmup=0, repeats=1, threads=2)
    with pytest.warns(latency_module.LatencyLoadWarning, match="measuring at threads=1 with the thread CPU clock"):
        table = build_latency_table(model, chain, requested, cache_dir=tmp_path, progress=False,
                                    timers=Timers(probe=lambda: BUSY))
    assert table.settings == requested.robust() and "another process" in table.load_note
    (path,) = tmp_path.iterdir()  # cached under the settings really used
    assert latency_module.TableCache(path, latency_module._cache_key(chain, requested.robust(), None)).get(
        TOTAL_KEY) == table.total_ms
    quiet = CountingTimer(fail_after=0, base=Timers(probe=lambda: QUIET))  # quiet now: the requested settings
    with pytest.raises(RuntimeError, match="interrupted"):                 # are a different table
        build_latency_table(model, chain, requested, cache_dir=tmp_path, progress=False, timers=quiet.timers)


@pytest.mark.parametrize("on_load", ["fallback", "raise"])
def test_unrepeatable_entries_are_flagged_before_any_plan(tiny, on_load: str) -> None:
    model, chain = tiny
    calls: list[int] = []

    def noisy(runs, settings):  # a load that comes and goes: the middle block is 3x slower
        calls.append(1)
        return [[1.0, 1.0, 3.0, 3.0, 1.0, 1.0] for _ in runs]

    settings = LatencySettings(warmup=0, repeats=6, retries=1, on_load=on_load)
    if on_load == "raise":
        with pytest.raises(latency_module.LatencyLoadError, match=r"unrepeatable.*spread up to 200.0%"):
            build_latency_table(model, chain, settings, progress=False, timers=Timers(samples=noisy))
        return
    with pytest.warns(latency_module.LatencyLoadWarning, match=r"stayed unrepeatable after 1 re-measurement"):
        table = build_latency_table(model, chain, settings, progress=False, timers=Timers(samples=noisy))
    assert len(calls) == 2 * (distinct_geometries(chain) + 1)  # every timing measured twice (in place: time_nodes)
    measured = {s.key for s in chain.segments if not (s.identity and s.activation is None)}
    assert set(table.unreliable) == measured | {TOTAL_KEY}
    assert all(table.spreads[k] == pytest.approx(2.0) for k in measured) and table.max_spread == pytest.approx(2.0)
    assert all(table.spreads[s.key] == 0.0 for s in chain.segments if s.identity and s.activation is None)


def test_spreads_are_cached_with_the_entries(tiny, tmp_path: Path) -> None:
    model, chain = tiny
    steady = Timers(samples=lambda runs, s: [[2.0, 2.0, 2.2, 2.2, 2.0, 2.0] for _ in runs])
    settings = LatencySettings(warmup=0, repeats=6, max_spread=0.5)
    first = build_latency_table(model, chain, settings, cache_dir=tmp_path, progress=False, timers=steady)
    assert first.build_s > 0 and first.total_spread == pytest.approx(0.1)
    again = build_latency_table(model, chain, settings, cache_dir=tmp_path, progress=False,
                                timers=CountingTimer(fail_after=0).timers)
    assert again == first and again.spreads == first.spreads and again.build_s == 0.0


@pytest.mark.parametrize("change", [{"runtime": "torchscript"}, {"memory_format": "channels_last"},
                                    {"threads": None}, {"clock": "wall"}, {"allocator": "system"}])
def test_cache_key_names_runtime_memory_format_threads_and_clock(tiny, change: dict) -> None:
    _, chain = tiny
    base = latency_module._cache_key(chain, LatencySettings(), None)
    other = latency_module._cache_key(chain, LatencySettings(**change), None)
    assert base["runtime"] == "eager" and base["memory_format"] == "contiguous" and base["clock"] == "thread"
    assert other != base and latency_module.fingerprint(other) != latency_module.fingerprint(base)


def test_side_by_side_states_ratio_and_spread() -> None:
    from lightning_layermerge.planning import side_by_side

    passes = [[10.0, 10.0, 20.0, 20.0, 10.0, 10.0], [5.0, 5.0, 10.0, 10.0, 5.5, 5.5]]
    timed = side_by_side({"original": nn.Identity(), "candidate": nn.Identity()}, (torch.ones(1),),
                         LatencySettings(repeats=6), Timers(samples=lambda runs, s: passes))
    assert timed.ms == {"original": 10.0, "candidate": 5.5}  # medians of each network's passes
    assert timed.ratio == {"original": 1.0, "candidate": 0.5}  # the load cancels in the pass ratios
    assert timed.spread["candidate"] == pytest.approx(0.1) and timed.spread["original"] == 0.0


def test_side_by_side_takes_the_medians_of_rounds_with_fresh_copies() -> None:
    from lightning_layermerge.planning import side_by_side

    rounds = [[[10.0] * 6, [5.0] * 6], [[10.0] * 6, [6.0] * 6], [[8.0] * 6, [4.4] * 6]]  # ratios 0.5, 0.6, 0.55
    seen: list[nn.Module] = []  # the copies timed, kept alive so their ids stay distinct

    def sample(runs, settings):
        seen.append(runs[1][0])
        return rounds[len(seen) - 1]

    candidate = nn.Identity()
    timed = side_by_side({"original": nn.Identity(), "candidate": candidate}, (torch.ones(1),),
                         LatencySettings(repeats=6), Timers(samples=sample))
    assert timed.ratio["candidate"] == pytest.approx(0.55) and timed.ms == {"original": 10.0, "candidate": 5.0}
    assert timed.spread["candidate"] == pytest.approx(0.1 / 0.55)  # the rounds disagree by 0.1
    assert len({id(m) for m in seen}) == 3 and all(m is not candidate for m in seen)  # fresh copies every round
    with pytest.raises(ValueError, match=r"rounds=.*int >= 1"):
        side_by_side({"a": nn.Identity()}, (torch.ones(1),), LatencySettings(), rounds=0)



def test_in_context_scales_entries_by_the_replaced_layers_in_place_over_alone(tiny) -> None:
    _, chain = tiny
    keep = {s.j: s.key for s in Plan.keep_all(chain).segments}
    alone = {s.key: (0.0 if s.identity else 1.0 + s.j - s.i) for s in chain.segments}
    in_place = {l: 2.0 * alone[keep[l]] for l in keep}  # every layer twice as slow in place ...
    in_place[1] = alone[keep[1]]  # ... except the first
    scaled = latency_module.in_context(chain, alone, in_place)
    assert all(scaled[keep[l]] == pytest.approx(in_place[l]) for l in keep)  # keep-all: exactly the in-place time
    for seg in chain.segments:
        a = sum(alone[keep[l]] for l in range(seg.i + 1, seg.j + 1))
        p = sum(in_place[l] for l in range(seg.i + 1, seg.j + 1))
        assert scaled[seg.key] == pytest.approx(alone[seg.key] * p / a)
    assert all(scaled[s.key] == 0.0 for s in chain.segments if s.identity)


def test_context_table_adds_up_to_the_in_place_chain(tiny) -> None:
    model, chain = tiny
    table = build_latency_table(model, chain, LatencySettings(warmup=0, repeats=3, max_spread=10.0), progress=False)
    plain = build_latency_table(model, chain, LatencySettings(warmup=0, repeats=3, max_spread=10.0, context=False),
                                progress=False)
    assert plain.entries == plain.alone and table.entries != table.alone
    keep = Plan.keep_all(chain).keys
    assert table.chain_ms == pytest.approx(sum(table.entries[k] for k in keep))
    assert table.settings.context and latency_module._cache_key(chain, table.settings, None)["context"] is True
    assert latency_module._cache_key(chain, plain.settings, None)["context"] is False


def plan_folds(chain, plan: Plan, skip) -> bool:
    """Whether one of the plan's segments folds ``skip`` into its merged conv."""
    return any(chain.analysis.skip_role(skip, seg.i, seg.j) == "fold" for seg in plan.segments)


@pytest.mark.parametrize("arch", ["tiny", "resnet18"])
def test_skip_costs_are_paid_exactly_by_the_plans_that_keep_the_addition(tiny, arch: str) -> None:
    if arch == "tiny":
        chain = tiny[1]
    else:
        model = torchvision.models.resnet18(num_classes=3).eval()
        chain = trace(model, torch.randn(1, 3, 32, 32))
    assert chain.skips, "the network must have residual additions for this test to mean anything"
    costs = [float(2 ** n) for n in range(len(chain.skips))]  # distinct powers of two: each sum names its skips
    zero = {s.key: 0.0 for s in chain.segments}
    moved = latency_module.with_skip_costs(chain, zero, costs)
    assert all(v >= 0 for v in moved.values())
    rng, folded_some = random.Random(0), False
    for trial in range(60):
        plan = Plan.keep_all(chain) if trial == 0 else Plan.random(chain, rng)
        kept = sum(c for skip, c in zip(chain.skips, costs) if not plan_folds(chain, plan, skip))
        folded_some |= kept < sum(costs)
        # Every skip is in the entries (additive role), so a plan pays exactly the skips it keeps.
        assert sum(moved[k] for k in plan.keys) == kept
    assert folded_some, "no random plan folded a skip; the test would not tell anything"


def test_context_table_moves_the_in_place_addition_into_the_entries(tiny, tmp_path: Path) -> None:
    model, chain = tiny
    settings = LatencySettings(warmup=1, repeats=5, max_spread=10.0)
    table = build_latency_table(model, chain, settings, cache_dir=tmp_path, progress=False)
    stored = latency_module._open_cache(tmp_path, chain, latency_module._cache_key(chain, table.settings, None)).items()
    costs = [stored[(latency_module.IN_PLACE_SKIP, n, 0)] for n in range(len(chain.skips))]
    assert costs and all(c > 0 for c in costs)  # TinyNet's addition is timed in place
    in_place = {l: stored[(latency_module.IN_PLACE, l, 0)] for l in range(1, chain.num_layers + 1)}
    expected = latency_module.with_skip_costs(chain, latency_module.in_context(chain, table.alone, in_place), costs)
    assert table.entries == pytest.approx(expected)
    # The keep-all chain now holds the addition, so the constant part outside it is smaller by its cost.
    assert table.chain_ms == pytest.approx(sum(latency_module.in_context(chain, table.alone, in_place)[k]
                                               for k in Plan.keep_all(chain).keys) + sum(costs))


def test_node_times_are_rescaled_to_the_whole_pass() -> None:
    nodes = {"a": 1.0, "b": 3.0}
    assert latency_module._scaled_to(nodes, 2.0) == {"a": 0.5, "b": 1.5}
    assert latency_module._scaled_to(nodes, math.nan) == nodes  # nothing to scale to: unchanged
