"""Timing primitives: passes timed one by one, interleaved, node by node, with their spread (torch only).

Every function here runs in :func:`timing_environment` (the settings' thread count and allocator
regime) under ``torch.no_grad``, in the settings' runtime, with the settings' clock.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from .allocator import cached_allocator
from .latency_settings import SPREAD_BLOCKS, LatencySettings
from .load import LoadProbe, probe_load
from .parallel_gate import gate_for
from .runtime import prepare_call

__all__ = ["Timing", "interleaved_samples", "spread", "time_interleaved", "time_module", "time_nodes",
           "time_samples", "timing_environment"]


@contextmanager
def _num_threads(threads: int | None) -> Iterator[None]:
    """Set ``torch.set_num_threads`` for the block and restore the previous value."""
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextmanager
def timing_environment(settings: LatencySettings) -> Iterator[None]:
    """Threads and allocator regime of ``settings`` for the block (both restored after).

    With ``runtime="onnxruntime"`` torch gets one thread: it only exports and converts there,
    and torch's OpenMP workers keep spinning for a while after each torch call, on the cores
    ONNX Runtime's own workers need (measured at 2 threads on 2 cores: the same one-conv
    session timed 0.054-0.057 ms after torch ran at 1 thread, 0.055-0.068 ms with spreads up
    to 22 % after torch ran at 2).
    """
    torch_threads = 1 if settings.runtime == "onnxruntime" else settings.threads
    with _num_threads(torch_threads), cached_allocator(settings.allocator == "cached"):
        yield


def _sync(device: torch.device) -> None:
    """Wait for queued CUDA kernels, so that a timer measures finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
    """Move a tensor to ``device``; floating tensors also get ``dtype``."""
    if not isinstance(value, torch.Tensor):
        return value
    if value.is_floating_point():
        return value.to(device=device, dtype=dtype)
    return value.to(device=device)


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"latency device {device} requested but CUDA is not available; use device='cpu'")


def time_module(module: nn.Module, inputs: tuple | torch.Tensor, settings: LatencySettings) -> float:
    """Median latency of one forward pass of ``module`` on ``inputs``, in milliseconds.

    The module is moved to the settings' device and dtype *in place* and put in eval mode;
    the inputs are copied there. ``warmup`` untimed passes run first, then ``repeats``
    passes each timed on its own with :func:`time.perf_counter` (CUDA synchronised before
    and after each), all under ``torch.no_grad`` and the settings' thread count.

    Args:
        module: The module to time.
        inputs: Positional arguments of ``module.forward`` (a tensor means one argument).
        settings: Device, dtype, warm-up, repeats and threads.

    Returns:
        The median of the timed passes, in ms.
    """
    return time_interleaved([(module, inputs)], settings)[0]


def time_interleaved(runs: Sequence[tuple[nn.Module, tuple | torch.Tensor]], settings: LatencySettings) -> list[float]:
    """Median latencies (ms) of several modules timed alternately, pass by pass.

    Like :func:`time_module` for each ``(module, inputs)`` pair, except that the timed
    passes alternate between the modules (A, B, A, B, ...), so a slow-down caused by other
    processes hits all of them alike and their ratios stay right.

    Args:
        runs: ``(module, inputs)`` pairs; modules are moved to the device/dtype in place.
        settings: Device, dtype, warm-up, repeats and threads.

    Returns:
        One median per pair, in ms, in the order given.
    """
    return [statistics.median(samples) for samples in interleaved_samples(runs, settings)]


def interleaved_samples(runs: Sequence[tuple[nn.Module, tuple | torch.Tensor]],
                         settings: LatencySettings) -> list[list[float]]:
    """Per-pass times (ms) of each run, the passes alternating between the runs.

    The raw material of :func:`time_interleaved`: pass ``r`` of every run is timed right
    after pass ``r`` of the previous run, so ratios of same-index passes compare modules
    under the same load. Under the parallel-state gate (ONNX Runtime at more than one thread on
    CPU) every timed pass of more than one run follows one untimed pass of the same module (A,
    A*, B, B*, ...; * timed): there the first pass after a switch runs on worker threads and
    caches the other session just used, a cost that a network deployed on its own never pays
    (measured on 2 cores, torchvision MobileNetV2 at 224 px: a merged plan at 0.59-0.61 of the
    original timed pass by pass, 0.54-0.55 settled, 0.50-0.53 run back to back). Elsewhere the
    passes simply alternate (eager at 1 thread, the digits MobileNetV2: pass by pass within 1-3 %
    of settled and back to back). Each run is prepared in the settings' runtime and memory format
    (:func:`~lightning_layermerge.tables.runtime.prepare_call`) and timed with the settings'
    clock (:attr:`LatencySettings.clock_used`).

    Args:
        runs: ``(module, inputs)`` pairs; modules are moved to the device/dtype in place.
        settings: Device, dtype, warm-up, repeats, threads, runtime and clock.

    Returns:
        For each run, its ``settings.repeats`` pass times in ms, in pass order.
    """
    device = settings.torch_device
    _check_device(device)
    with timing_environment(settings), torch.no_grad():
        calls = [_prepare(module, inputs, settings) for module, inputs in runs]
        for call in calls:
            for _ in range(settings.warmup):
                call()
        clock = _clock(settings)
        gate = gate_for(settings)
        if gate is None:
            return _passes(calls, settings.repeats, device, clock)
        # Multi-thread ONNX Runtime: passes taken while the threads get their parallel speed-up
        # (:mod:`~lightning_layermerge.planning.tables.parallel_gate`); one untimed pass first,
        # since the wait may have let the workers fall asleep.
        return gate.gated(lambda: _passes(calls, settings.repeats, device, clock, untimed=1, settle=len(calls) > 1))


def _passes(calls: Sequence[Any], repeats: int, device: torch.device, clock: Any, untimed: int = 0,
            settle: bool = False) -> list[list[float]]:
    """``repeats`` rounds of one timed pass of every call, in turn (after ``untimed`` untimed rounds);
    with ``settle``, each timed pass right after an untimed one of the same call."""
    for _ in range(untimed):
        for call in calls:
            call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for samples, call in zip(times, calls):
            if settle:
                call()
            samples.append(_timed_call(call, device, clock)[1])
    return times


def _prepare(module: nn.Module, inputs: tuple | torch.Tensor, settings: LatencySettings) -> Any:
    """``module`` on ``inputs`` as a zero-argument call in the settings' runtime."""
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    return prepare_call(module, args, runtime=settings.runtime, memory_format=settings.memory_format,
                        device=settings.torch_device, dtype=settings.torch_dtype, threads=settings.threads)


def _clock(settings: LatencySettings) -> Any:
    """``time.thread_time`` or ``time.perf_counter``, as the settings resolve."""
    return time.thread_time if settings.clock_used == "thread" else time.perf_counter


def _timed_call(fn: Any, device: torch.device, clock: Any = time.perf_counter) -> tuple[Any, float]:
    """Run ``fn()`` and return its result and its time in ms on ``clock`` (CUDA synchronised)."""
    _sync(device)
    start = clock()
    out = fn()
    _sync(device)
    return out, (clock() - start) * 1e3


@dataclass(frozen=True)
class Timing:
    """One timing: its median and how repeatable it was.

    Attributes:
        ms: Median over the passes (or median pass ratio times the reference, in reference mode).
        spread: ``(max - min) / median`` of the medians of :data:`SPREAD_BLOCKS` consecutive
            blocks of passes (``nan`` with fewer than two passes per block).
        attempts: How many times it was measured (1 + re-measurements for spread).
    """

    ms: float
    spread: float
    attempts: int = 1


def spread(samples: Sequence[float], blocks: int = SPREAD_BLOCKS) -> float:
    """Relative spread of a timing: ``(max - min) / median`` of its block medians.

    The passes are split, in order, into ``blocks`` consecutive blocks (as if the timing
    were repeated ``blocks`` times). A load that comes and goes shows as blocks that disagree.

    Args:
        samples: Per-pass times (or ratios), in pass order.
        blocks: Number of blocks.

    Returns:
        The spread (0.02: the blocks agree within 2 % of the median), or ``nan`` with fewer
        than two samples per block (single passes say nothing about repeatability).
    """
    n = len(samples)
    if n < 2 * max(blocks, 1):
        return math.nan
    medians = [statistics.median(samples[b * n // blocks:(b + 1) * n // blocks]) for b in range(blocks)]
    centre = statistics.median(samples)
    return (max(medians) - min(medians)) / centre if centre > 0 else math.nan


def time_samples(runs: Sequence[tuple[nn.Module, tuple | torch.Tensor]], settings: LatencySettings,
                 statistic: Any = None, sample: Callable[..., list[list[float]]] | None = None,
                 ) -> tuple[list[list[float]], float]:
    """:func:`interleaved_samples`, re-measured while the spread exceeds ``settings.max_spread``.

    Args:
        runs: ``(module, inputs)`` pairs.
        settings: Timing settings (``max_spread``, ``retries``).
        statistic: ``samples -> per-pass values`` whose spread is checked (default: the
            passes of the last run).
        sample: What takes one attempt's samples (default :func:`interleaved_samples`).

    Returns:
        The samples of the most repeatable attempt and its spread (``nan``: not assessable).
    """
    statistic = statistic or (lambda samples: samples[-1])
    sample = sample or interleaved_samples
    best: tuple[list[list[float]], float] | None = None
    for _ in range(1 + settings.retries):
        samples = sample(runs, settings)
        s = spread(statistic(samples))
        if best is None or not (s >= best[1]):  # nan never beats a number; a smaller spread does
            best = (samples, s)
        if not (s > settings.max_spread):  # within the limit, or not assessable
            break
    return best


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for name in target.split("."):
        obj = getattr(obj, name)
    return obj


def _node_pass(gm: fx.GraphModule, args: tuple, device: torch.device,
               reference: tuple[nn.Module, tuple] | None,
               clock: Any = time.perf_counter) -> tuple[dict[str, float], dict[str, float]]:
    """One forward of ``gm``, node by node: ms of every call node (and of a reference pass before each)."""
    env: dict[fx.Node, Any] = {}
    last_use: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:  # free each value after its last reader, as the compiled forward does
        for arg in node.all_input_nodes:
            last_use[arg] = node
    inputs = iter(args)
    times: dict[str, float] = {}
    ref_times: dict[str, float] = {}
    for node in gm.graph.nodes:
        a = fx.node.map_arg(node.args, lambda n: env[n])
        kw = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":  # an argument not given takes its default (e.g. return_dict=True)
            env[node] = next(inputs, node.args[0] if node.args else None)
        elif node.op == "get_attr":
            env[node] = _fetch_attr(gm, str(node.target))
        elif node.op == "output":
            return times, ref_times
        else:
            if node.op == "call_module":
                fn = lambda: gm.get_submodule(str(node.target))(*a, **kw)  # noqa: E731
            elif node.op == "call_function":
                fn = lambda: node.target(*a, **kw)  # noqa: E731
            else:
                fn = lambda: getattr(a[0], str(node.target))(*a[1:], **kw)  # noqa: E731
            if reference is not None:
                ref_module, ref_args = reference
                ref_times[node.name] = _timed_call(lambda: ref_module(*ref_args), device, clock)[1]
            env[node], times[node.name] = _timed_call(fn, device, clock)
        for arg in node.all_input_nodes:
            if last_use.get(arg) is node:
                env.pop(arg, None)
    return times, ref_times


def time_nodes(gm: fx.GraphModule, inputs: tuple | torch.Tensor, settings: LatencySettings,
               reference: tuple[nn.Module, tuple | torch.Tensor] | None = None) -> dict[str, float]:
    """Latency (ms) of every operation of a GraphModule, timed one by one inside the network.

    The network runs ``warmup`` times, then ``repeats`` times node by node, each call
    (module, function or method) timed on its own (CUDA synchronised). Summing the result
    gives the network's latency measured the same way as the table's entries: medians of
    short, individually timed passes. (One long pass averages the slow-downs caused by other
    processes, while the median of short passes does not, so the two do not compare on a
    shared machine.)

    Args:
        gm: The network (e.g. ``merge(prune(model, chain, Plan.keep_all(chain)))``); moved
            to the device/dtype in place and put in eval mode.
        inputs: Positional arguments of its forward.
        settings: Device, dtype, warm-up, repeats and threads.
        reference: Optional ``(module, inputs)`` timed right before every node; each node
            then gets ``median(node pass / reference pass)`` instead of a time in ms (the
            caller multiplies by the reference's latency).

    Returns:
        ``{node name: median ms}`` (or the median ratio to the reference) for every call node.
    """
    device, dtype = settings.torch_device, settings.torch_dtype
    _check_device(device)
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    gm.to(device=device, dtype=dtype).eval()
    args = tuple(_to(a, device, dtype) for a in args)
    ref = None
    if reference is not None:
        ref_module, ref_inputs = reference
        ref_args = (ref_inputs,) if isinstance(ref_inputs, torch.Tensor) else tuple(ref_inputs)
        ref = (ref_module.to(device=device, dtype=dtype).eval(), tuple(_to(a, device, dtype) for a in ref_args))
    samples: dict[str, list[float]] = {}
    with timing_environment(settings), torch.no_grad():
        for _ in range(settings.warmup):
            gm(*args)
            if ref is not None:
                ref[0](*ref[1])
        for _ in range(settings.repeats):
            times, ref_times = _node_pass(gm, args, device, ref, _clock(settings))
            for name, ms in times.items():
                samples.setdefault(name, []).append(ms / ref_times[name] if ref is not None else ms)
    return {name: statistics.median(values) for name, values in samples.items()}



@dataclass(frozen=True)
class Timers:
    """The measuring functions a latency build and a side-by-side timing call.

    The defaults measure the machine. Replace one to observe or fake what a build measures
    (tests, dry runs) without touching the module: ``Timers(samples=my_samples)``.

    Attributes:
        samples: ``(runs, settings) -> per-pass ms of each run`` (:func:`interleaved_samples`).
        module: ``(module, inputs, settings) -> ms`` (:func:`time_module`; the reference layer).
        nodes: ``(gm, inputs, settings, reference=None) -> {node: ms}`` (:func:`time_nodes`).
        probe: ``() -> LoadProbe``, the machine's load before wall-clock timing
            (:func:`~lightning_layermerge.planning.tables.load.probe_load`).
    """

    samples: Callable[..., list[list[float]]] = interleaved_samples
    module: Callable[..., float] = time_module
    nodes: Callable[..., dict[str, float]] = time_nodes
    probe: Callable[[], LoadProbe] = probe_load
