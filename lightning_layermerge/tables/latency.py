"""Latency lookup table T[i, j, k] (torch only, no Lightning): the time of layers i+1..j merged
into one conv of kernel size k.

Every legal segment ``(i, j, k)`` of a chain is timed as the module that
:func:`~lightning_layermerge.merge` really produces for it: one ``nn.Conv2d`` of the merged
geometry (or nothing for an identity segment) followed by the activation that ends the
segment. The whole original network with BatchNorm folded (``merge`` of the keep-all plan) is
timed too, so a budget given as a fraction of the model's latency can be turned into a budget
for the table: the part of the model outside the chain (stem pooling, classifier, residual
additions, shortcut projections, ...) is ``total_ms - chain_ms``. The whole network is timed
operation by operation in place (:func:`time_nodes`) and summed, so that it is measured with
the same statistic as the entries (medians of short passes).

Timing protocol: ``warmup`` untimed forward passes, then ``repeats`` single forward passes
each timed with :func:`time.perf_counter` (CUDA synchronised before and after each), median
in milliseconds. Segments with identical module geometry are timed once per build, which
also keeps the table self-consistent (equal modules get equal numbers, not two noisy draws).
On a shared machine, where other processes slow everything down by a factor that changes
from minute to minute, ``LatencySettings(reference=True)`` times every module interleaved
with one fixed reference layer and rescales, so that entries measured minutes apart (and
the whole-model total) stay comparable.

Each entry is written to a :class:`~lightning_layermerge.tables.cache.TableCache` the moment
it is measured, so an interrupted build resumes and a second build with the same settings
measures nothing.
"""

from __future__ import annotations

import copy
import math
import os
import platform
import statistics
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import fx, nn
from tqdm.auto import tqdm

from ..graph import Chain, Segment
from ..merge import merge
from ..plan import Plan
from ..prune import prune
from .cache import TableCache, fingerprint

__all__ = [
    "REFERENCE_KEY",
    "TOTAL_KEY",
    "LatencySettings",
    "LatencyTable",
    "build_latency_table",
    "interleaved_samples",
    "segment_module",
    "time_interleaved",
    "time_module",
    "time_nodes",
]

#: Reserved cache entry holding ``total_ms`` (no legal segment has a negative position).
TOTAL_KEY = (-1, -1, 0)
#: Reserved cache entry holding the reference module's latency (``settings.reference``).
REFERENCE_KEY = (-2, -2, 0)

#: Bumped whenever the measurement method changes, so old cache files are not reused.
_METHOD_VERSION = 3

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

Key = tuple[int, int, int]


@dataclass(frozen=True)
class LatencySettings:
    """How table entries are measured.

    Attributes:
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:n"``; CUDA timing is synchronised.
        batch_size: Batch size of the timed inputs; ``None`` keeps the example input's.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"float64"``.
        warmup: Untimed forward passes before timing.
        repeats: Timed forward passes (one forward each); the median is reported.
        threads: ``torch.set_num_threads`` during measurement (restored after); ``None``
            leaves the current setting. On a shared CPU, 1 thread gives the stablest numbers.
        reference: Time every module interleaved pass by pass with one fixed reference
            module (a typical layer of the chain) and store ``median(module pass /
            reference pass) * reference_ms`` over pairs of adjacent passes, with
            ``reference_ms`` measured once per table. A slow-down from other processes
            that comes and goes during the build then cancels out, so entries and
            ``total_ms`` stay comparable (shared machines); costs up to twice the passes.
    """

    device: str = "cpu"
    batch_size: int | None = None
    dtype: str = "float32"
    warmup: int = 10
    repeats: int = 30
    threads: int | None = None
    reference: bool = False

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        _check_int("batch_size", self.batch_size, minimum=1, optional=True)
        _check_int("warmup", self.warmup, minimum=0)
        _check_int("repeats", self.repeats, minimum=1)
        _check_int("threads", self.threads, minimum=1, optional=True)
        if not isinstance(self.reference, bool):
            raise TypeError(f"LatencySettings.reference must be a bool, got {type(self.reference).__name__}")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by :attr:`dtype`."""
        return _DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        """The ``torch.device`` named by :attr:`device`."""
        return torch.device(self.device)


def _check_int(name: str, value: Any, *, minimum: int, optional: bool = False) -> None:
    """Raise a helpful error unless ``value`` is an int >= ``minimum`` (or None if optional)."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"LatencySettings.{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"LatencySettings.{name} must be >= {minimum}, got {value}")


@dataclass
class LatencyTable:
    """Measured latencies of every legal segment, plus the whole model's.

    Attributes:
        entries: Milliseconds per legal segment ``(i, j, k)`` (0.0 for identity segments).
        total_ms: The whole original model with BatchNorm folded (``merge`` of the keep-all
            plan), at the same settings.
        chain_ms: Sum of the keep-all plan's entries.
        settings: How the numbers were measured.
    """

    entries: dict[Key, float]
    total_ms: float
    chain_ms: float
    settings: LatencySettings

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


# ---------------------------------------------------------------------- modules


class _FunctionActivation(nn.Module):
    """A functional activation (``F.relu(x)``, ``torch.sigmoid(x)``) as a module."""

    def __init__(self, fn: Any, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.fn, self.args, self.kwargs = fn, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, *self.args, **self.kwargs)


class _MethodActivation(nn.Module):
    """A tensor-method activation (``x.relu()``) as a module."""

    def __init__(self, name: str, args: tuple, kwargs: dict) -> None:
        super().__init__()
        self.name, self.args, self.kwargs = name, args, kwargs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(x, self.name)(*self.args, **self.kwargs)


def _activation_module(chain: Chain, position: int) -> nn.Module | None:
    """Deep copy of the activation at ``position`` of the captured graph (None if none)."""
    name = chain.positions[position].activation
    if name is None:
        return None
    gm = chain.capture.gm
    node = next(n for n in gm.graph.nodes if n.name == name)
    extra = node.args[1:]
    if any(isinstance(a, fx.Node) for a in extra) or any(isinstance(v, fx.Node) for v in node.kwargs.values()):
        raise ValueError(f"activation {name} reads another tensor; it cannot be timed on its own")
    if node.op == "call_module":
        return copy.deepcopy(gm.get_submodule(str(node.target)))
    if node.op == "call_function":
        return _FunctionActivation(node.target, tuple(extra), dict(node.kwargs))
    if node.op == "call_method":
        return _MethodActivation(str(node.target), tuple(extra), dict(node.kwargs))
    raise ValueError(f"activation {name} is a {node.op} node, not a module, function or method call")


def segment_module(chain: Chain, seg: Segment) -> nn.Sequential:
    """The module ``merge`` produces for ``seg``, with random weights, for timing.

    Args:
        chain: The chain ``seg`` belongs to.
        seg: A legal segment of ``chain``.

    Returns:
        ``nn.Sequential(conv, activation)``: ``nn.Conv2d(in, out, seg.kernel, stride, padding,
        groups, bias=True)`` of the merged geometry (``seg.kernel`` is ``k`` less the taps that
        ``merge`` trims because they only read zero padding) (absent for an identity segment), followed by a
        deep copy of the activation ending the segment at position ``seg.j`` (absent if the
        position has none; functional activations are wrapped in a module).
    """
    layers: list[nn.Module] = []
    if not seg.identity:
        # seg.kernel, not seg.k: merge trims taps that can only ever read zero padding.
        layers.append(nn.Conv2d(seg.in_shape[1], seg.out_shape[1], seg.kernel, stride=seg.stride,
                                padding=seg.padding, groups=seg.groups, bias=True))
    act = _activation_module(chain, seg.j)
    if act is not None:
        layers.append(act)
    return nn.Sequential(*layers)


# ---------------------------------------------------------------------- timing


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
    under the same load.

    Args:
        runs: ``(module, inputs)`` pairs; modules are moved to the device/dtype in place.
        settings: Device, dtype, warm-up, repeats and threads.

    Returns:
        For each run, its ``settings.repeats`` pass times in ms, in pass order.
    """
    device, dtype = settings.torch_device, settings.torch_dtype
    _check_device(device)
    prepared = []
    for module, inputs in runs:
        args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
        module.to(device=device, dtype=dtype).eval()
        prepared.append((module, tuple(_to(a, device, dtype) for a in args)))
    times: list[list[float]] = [[] for _ in prepared]
    with _num_threads(settings.threads), torch.no_grad():
        for module, args in prepared:
            for _ in range(settings.warmup):
                module(*args)
        for _ in range(settings.repeats):
            for samples, (module, args) in zip(times, prepared):
                _sync(device)
                start = time.perf_counter()
                module(*args)
                _sync(device)
                samples.append((time.perf_counter() - start) * 1e3)
    return times


def _timed_call(fn: Any, device: torch.device) -> tuple[Any, float]:
    """Run ``fn()`` and return its result and its wall time in ms (CUDA synchronised)."""
    _sync(device)
    start = time.perf_counter()
    out = fn()
    _sync(device)
    return out, (time.perf_counter() - start) * 1e3


def _fetch_attr(gm: fx.GraphModule, target: str) -> Any:
    obj: Any = gm
    for name in target.split("."):
        obj = getattr(obj, name)
    return obj


def _node_pass(gm: fx.GraphModule, args: tuple, device: torch.device,
               reference: tuple[nn.Module, tuple] | None) -> tuple[dict[str, float], dict[str, float]]:
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
                ref_times[node.name] = _timed_call(lambda: ref_module(*ref_args), device)[1]
            env[node], times[node.name] = _timed_call(fn, device)
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
    with _num_threads(settings.threads), torch.no_grad():
        for _ in range(settings.warmup):
            gm(*args)
            if ref is not None:
                ref[0](*ref[1])
        for _ in range(settings.repeats):
            times, ref_times = _node_pass(gm, args, device, ref)
            for name, ms in times.items():
                samples.setdefault(name, []).append(ms / ref_times[name] if ref is not None else ms)
    return {name: statistics.median(values) for name, values in samples.items()}


# ---------------------------------------------------------------------- building


def _batched(shape: Sequence[int], batch: int | None) -> tuple[int, ...]:
    """``shape`` with its batch dimension replaced by ``batch`` (kept when None)."""
    return tuple(shape) if batch is None else (batch, *tuple(shape)[1:])


def _example_batch(chain: Chain) -> int:
    """Batch size of the chain's example input (first dim of its first tensor argument)."""
    for arg in chain.example:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0:
            return int(arg.shape[0])
    return int(chain.layers[0].in_shape[0])


def batched_example(chain: Chain, batch: int | None) -> tuple:
    """``chain.example`` with every batch-sized tensor resized to ``batch`` along dim 0.

    Real example data is reused (cycled when the batch grows), so integer arguments such
    as diffusion timesteps stay valid.
    """
    if batch is None:
        return tuple(chain.example)
    n = _example_batch(chain)
    out = []
    for arg in chain.example:
        if isinstance(arg, torch.Tensor) and arg.dim() > 0 and arg.shape[0] == n:
            arg = arg.index_select(0, torch.arange(batch, device=arg.device) % n)
        out.append(arg)
    return tuple(out)


def _geometry(seg: Segment) -> tuple:
    """What a segment's timed module depends on: equal geometries are timed once."""
    return (tuple(seg.in_shape[1:]), seg.out_shape[1], seg.kernel, seg.stride, seg.padding, seg.groups,
            seg.activation, seg.identity)


def _device_name(device: torch.device) -> str:
    """Human-readable hardware identity for the cache key (numbers are hardware-specific)."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} {torch.cuda.get_device_name(index)}"
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            model = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), "")
    except OSError:
        pass
    return f"cpu {platform.machine()} {model or platform.processor()}".strip()


def _cache_key(chain: Chain, settings: LatencySettings, batch: int | None) -> dict[str, Any]:
    """Everything the measured numbers depend on."""
    shapes = [list(_batched(s, batch)) for s in chain.input_shapes]
    return {
        "table": "latency",
        "method": _METHOD_VERSION,
        "chain": chain.fingerprint,
        "device": _device_name(settings.torch_device),
        "dtype": settings.dtype,
        "batch": shapes,
        "torch": str(torch.__version__),
        # The thread count actually used, also when the settings leave it alone.
        "threads": settings.threads if settings.threads is not None else torch.get_num_threads(),
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "reference": settings.reference,
    }


def _open_cache(cache_dir: str | os.PathLike | None, chain: Chain, key: dict[str, Any]) -> TableCache | None:
    """The cache file for these settings (one file per architecture and settings)."""
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"latency-{chain.fingerprint}-{fingerprint(key)[:12]}.json"
    return TableCache(path, key)


class _Store:
    """Entries of one build: the cache file when there is one, else memory only."""

    def __init__(self, cache: TableCache | None) -> None:
        self.cache = cache
        self.values: dict[Key, float] = cache.items() if cache is not None else {}

    def get(self, key: Key) -> float | None:
        return self.values.get(key)

    def put(self, key: Key, value: float) -> None:
        self.values[key] = value
        if self.cache is not None:
            self.cache.put(key, value)


def build_latency_table(
    model: nn.Module,
    chain: Chain,
    settings: LatencySettings = LatencySettings(),
    *,
    cache_dir: str | os.PathLike | None = None,
    progress: bool = True,
) -> LatencyTable:
    """Measure the latency of every legal segment of ``chain`` and of the whole model.

    Args:
        model: The network ``chain`` was traced from (timed as ``merge`` of the keep-all plan).
        chain: From :func:`~lightning_layermerge.trace`.
        settings: Device, batch size, dtype, warm-up, repeats and threads.
        cache_dir: Directory of the on-disk cache. Entries are stored as they are measured,
            in a file named after the architecture and settings; an interrupted build
            resumes and a repeated build measures nothing. ``None``: no cache.
        progress: Show a progress bar.

    Returns:
        The :class:`LatencyTable`.

    Raises:
        TypeError: If ``chain`` is not a :class:`~lightning_layermerge.Chain`.
        ValueError: If the device is unavailable.
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must come from lightning_layermerge.trace(...), got {type(chain).__name__}")
    if not isinstance(settings, LatencySettings):
        raise TypeError(f"settings must be a LatencySettings, got {type(settings).__name__}")
    _check_device(settings.torch_device)
    store = _Store(_open_cache(cache_dir, chain, _cache_key(chain, settings, settings.batch_size)))
    timer = _Timer(chain, settings, store)
    # Geometries already measured (also in an earlier, interrupted build) are not re-timed.
    by_geometry = {_geometry(s): store.get(s.key) for s in chain.segments if store.get(s.key) is not None}
    bar = tqdm(total=len(chain.segments) + 1, desc="latency table", unit="entry", disable=not progress)
    measured = 0
    with bar, _num_threads(settings.threads):
        for seg in chain.segments:
            if store.get(seg.key) is None:
                geometry = _geometry(seg)
                if geometry not in by_geometry:
                    by_geometry[geometry] = 0.0 if seg.identity else timer(*_segment_run(chain, seg, settings))
                    measured += not seg.identity
                store.put(seg.key, by_geometry[geometry])
            bar.update(1)
            bar.set_postfix(measured=measured)
        if store.get(TOTAL_KEY) is None:
            store.put(TOTAL_KEY, timer.whole(*_whole_run(model, chain, settings)))
        bar.update(1)
    entries = {s.key: store.values[s.key] for s in chain.segments}
    chain_ms = sum(entries[k] for k in Plan.keep_all(chain).keys)
    return LatencyTable(entries, store.values[TOTAL_KEY], chain_ms, settings)


def _segment_run(chain: Chain, seg: Segment, settings: LatencySettings) -> tuple[nn.Module, tuple]:
    """The merged module of one segment and a random input of its shape."""
    return segment_module(chain, seg), (torch.randn(_batched(seg.in_shape, settings.batch_size)),)


def _whole_run(model: nn.Module, chain: Chain, settings: LatencySettings) -> tuple[nn.Module, tuple]:
    """The original model with BatchNorm folded (the keep-all plan, merged) and its input."""
    merged = merge(prune(model, chain, Plan.keep_all(chain)))
    return merged, batched_example(chain, settings.batch_size)


def _flops(seg: Segment) -> int:
    """Multiply-adds of a segment's merged conv (to pick a typical reference layer)."""
    n, c_out, h, w = seg.out_shape
    return n * c_out * h * w * (seg.in_shape[1] // seg.groups) * seg.kernel * seg.kernel


class _Timer:
    """Times modules for one build: directly, or relative to a reference (``settings.reference``)."""

    def __init__(self, chain: Chain, settings: LatencySettings, store: _Store) -> None:
        self.chain, self.settings, self.store = chain, settings, store
        self.reference: tuple[nn.Module, tuple] | None = None

    def _reference(self) -> tuple[tuple[nn.Module, tuple], float]:
        """The reference run and its latency, created (and measured, once per table) lazily."""
        if self.reference is None:
            # The keep-all layer of median cost: a typical layer, neither noise-dominated nor slow.
            layers = sorted((s for s in Plan.keep_all(self.chain).segments if not s.identity), key=_flops)
            self.reference = _segment_run(self.chain, layers[len(layers) // 2], self.settings)
        ref_ms = self.store.get(REFERENCE_KEY)
        if ref_ms is None:
            ref_ms = time_module(*self.reference, self.settings)
            self.store.put(REFERENCE_KEY, ref_ms)
        return self.reference, ref_ms

    def whole(self, gm: fx.GraphModule, inputs: tuple) -> float:
        """The network's latency: the sum of its operations' latencies, timed one by one in place."""
        if not self.settings.reference:
            return sum(time_nodes(gm, inputs, self.settings).values())
        reference, ref_ms = self._reference()
        return sum(time_nodes(gm, inputs, self.settings, reference=reference).values()) * ref_ms

    def __call__(self, module: nn.Module, inputs: tuple) -> float:
        if not self.settings.reference:
            return time_module(module, inputs, self.settings)
        reference, ref_ms = self._reference()
        refs, ours = interleaved_samples([reference, (module, inputs)], self.settings)
        # Ratio of each pass to the reference pass just before it: a slow-down from other
        # processes that lasts longer than one pass cancels out; the median drops outliers.
        return statistics.median(o / r for o, r in zip(ours, refs)) * ref_ms
