"""How latency is measured: :class:`LatencySettings` (torch only, no Lightning)."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..validate import check_int
from .allocator import ALLOCATORS
from .runtime import MEMORY_FORMATS, RUNTIMES

__all__ = ["CLOCKS", "ON_LOAD", "SPREAD_BLOCKS", "LatencySettings"]

#: Clocks a pass can be timed with (``LatencySettings.clock``).
CLOCKS = ("auto", "thread", "wall")
#: Reactions to a busy CPU or unrepeatable timings (``LatencySettings.on_load``).
ON_LOAD = ("fallback", "warn", "raise", "ignore")
#: A timing's passes are split into this many consecutive blocks to state its spread.
SPREAD_BLOCKS = 3

_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


@dataclass(frozen=True)
class LatencySettings:
    """How table entries are measured.

    The defaults are the robust ones: one thread, timed with the thread's own CPU clock
    (``time.thread_time``), which does not count time the thread spends descheduled while
    another process uses the CPU; every timing is repeated in blocks and its spread checked.

    Attributes:
        device: ``"cpu"`` or ``"cuda"`` / ``"cuda:n"``; CUDA timing is synchronised.
        batch_size: Batch size of the timed inputs; ``None`` keeps the example input's.
        dtype: ``"float32"``, ``"float16"``, ``"bfloat16"`` or ``"float64"``.
        warmup: Untimed forward passes before timing.
        repeats: Timed forward passes (one forward each); the median is reported.
        threads: ``torch.set_num_threads`` (and ONNX Runtime's intra-op threads) during
            measurement, restored after; ``None``: all cores (the current torch setting).
            Default 1: the only setting whose timings stay repeatable while other processes
            use the CPU. ONNX Runtime on CPU at more than one thread: timings wait for the
            threads' parallel speed-up (``parallel_gate``).
        reference: Time every module interleaved pass by pass with one fixed reference
            module (a typical layer of the chain) and store ``median(module pass /
            reference pass) * reference_ms`` over pairs of adjacent passes, with
            ``reference_ms`` measured once per table. A slow-down from other processes
            that comes and goes during the build then cancels out, so entries and
            ``total_ms`` stay comparable (shared machines); costs up to twice the passes.
        context: Price segments as they run inside the network, not alone (eager and ONNX Runtime):
            the BN-folded original is also timed operation by operation in place, and every
            entry ``(i, j, k)`` is scaled by ``sum(in place) / sum(alone)`` over the original
            layers ``i+1..j`` it replaces (conv + activation). A layer timed alone in a tight
            loop runs with its weights and input hot in cache; inside the network it does not
            (or, with a big neighbour, even more so): measured 0.6-0.9x of its in-place time
            on the digits networks and resnet18 at 16 px
            (``recipes/benchmarks/results/latency_diagnose.md``). The keep-all plan's entries
            then add up to the in-place chain, and ``outside_ms`` holds only the operations
            outside the chain and the framework's overhead between operations. The residual
            additions and shortcut projections timed in the same pass move into the entries
            of the segments that keep them (``pricing.with_skip_costs``). With
            ``runtime="onnxruntime"`` the in-place times come from ONNX Runtime's profiler
            (``ort_profile.ort_node_times``) and the correction is additive
            (``pricing.in_context_additive``): a segment's own session pays a fixed layout
            conversion at its input and output; with more than one thread, a fitted fixed +
            per-element session overhead (``pricing.in_context_fitted``). TorchScript has no per-operation times; its
            entries stay as timed alone.
        runtime: What runs the network: ``"eager"`` PyTorch, ``"torchscript"`` (the file
            ``export_torchscript`` writes, loaded back) or ``"onnxruntime"`` (the file
            ``export_onnx`` writes, in an ONNX Runtime session; ``pip install -e ".[onnx]"``).
            Table entries, calibration and the final measurement all use it.
        memory_format: ``"contiguous"`` or ``"channels_last"`` weights and inputs (eager and
            TorchScript).
        clock: ``"thread"``: CPU time of the calling thread (``time.thread_time``; only with
            ``device="cpu"`` and ``threads=1``, where all work runs on that thread);
            ``"wall"``: ``time.perf_counter``; ``"auto"``: thread when allowed, else wall.
        max_spread: Largest acceptable spread of a timing: the passes are split into
            :data:`SPREAD_BLOCKS` consecutive blocks and ``(max - min) / median`` of the block
            medians must not exceed it (e.g. 0.05: the blocks agree within 5 %).
        retries: How often a timing whose spread exceeds ``max_spread`` is measured again.
        on_load: What to do when the CPU is busy with other processes or timings stay
            unrepeatable: ``"fallback"`` (default): measure at 1 thread with the thread clock
            instead of a multi-threaded or wall-clock setting, with a warning, and warn about
            entries still unrepeatable after the retries; ``"warn"``: keep the settings, warn;
            ``"raise"``: stop with :class:`LatencyLoadError`; ``"ignore"``: no checks.
        allocator: ``"cached"`` (default): time with the C library's allocator keeping freed
            memory, as a warmed-up serving process (or jemalloc, tcmalloc, ONNX Runtime's
            arena) does; without it every large activation is a fresh ``mmap`` whose page
            faults cost as much as a small conv and vary 2x from minute to minute
            (:mod:`~lightning_layermerge.tables.allocator`). ``"system"``: time the process as
            it is. glibc only; elsewhere both mean ``"system"``.
    """

    device: str = "cpu"
    batch_size: int | None = None
    dtype: str = "float32"
    warmup: int = 10
    repeats: int = 30
    threads: int | None = 1
    reference: bool = False
    context: bool = True
    runtime: str = "eager"
    memory_format: str = "contiguous"
    clock: str = "auto"
    max_spread: float = 0.05
    retries: int = 1
    on_load: str = "fallback"
    allocator: str = "cached"

    def __post_init__(self) -> None:
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {self.dtype!r}")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}") from None
        if dev.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda[:n]', got {self.device!r}")
        for name, minimum in (("batch_size", 1), ("warmup", 0), ("repeats", 1), ("threads", 1), ("retries", 0)):
            value = getattr(self, name)
            if value is not None or name not in ("batch_size", "threads"):  # None: the example's batch, all cores
                check_int(f"LatencySettings.{name}", value, minimum)
                object.__setattr__(self, name, int(value))  # a NumPy integer is stored as an int (cache keys are JSON)
        if not isinstance(self.reference, bool):
            raise TypeError(f"LatencySettings.reference must be a bool, got {type(self.reference).__name__}")
        if self.runtime not in RUNTIMES:
            raise ValueError(f"LatencySettings.runtime must be one of {list(RUNTIMES)}, got {self.runtime!r}")
        if self.memory_format not in MEMORY_FORMATS:
            raise ValueError(f"LatencySettings.memory_format must be one of {list(MEMORY_FORMATS)}, "
                             f"got {self.memory_format!r}")
        if self.runtime == "onnxruntime" and self.memory_format != "contiguous":
            raise ValueError("memory_format='channels_last' applies to runtime='eager' and 'torchscript'; "
                             "ONNX Runtime chooses its own layouts")
        if self.clock not in CLOCKS:
            raise ValueError(f"LatencySettings.clock must be one of {list(CLOCKS)}, got {self.clock!r}")
        if self.clock == "thread" and not self._thread_clock_valid():
            raise ValueError("LatencySettings(clock='thread') counts the calling thread's CPU time only, which is the "
                             "whole forward only with device='cpu' and threads=1; pass threads=1 or clock='wall'")
        if isinstance(self.max_spread, bool) or not isinstance(self.max_spread, (int, float)) or not (
                self.max_spread > 0):
            raise ValueError(f"LatencySettings.max_spread must be a positive number, got {self.max_spread!r}")
        if self.on_load not in ON_LOAD:
            raise ValueError(f"LatencySettings.on_load must be one of {list(ON_LOAD)}, got {self.on_load!r}")
        if self.allocator not in ALLOCATORS:
            raise ValueError(f"LatencySettings.allocator must be one of {list(ALLOCATORS)}, got {self.allocator!r}")
        if self.reference and self.runtime != "eager":
            raise ValueError("LatencySettings(reference=True) times the network node by node, which needs "
                             "runtime='eager'; with another runtime use threads=1 (thread CPU time) instead")

    @property
    def torch_dtype(self) -> torch.dtype:
        """The ``torch.dtype`` named by :attr:`dtype`."""
        return _DTYPES[self.dtype]

    @property
    def torch_device(self) -> torch.device:
        """The ``torch.device`` named by :attr:`device`."""
        return torch.device(self.device)

    @property
    def threads_used(self) -> int:
        """The thread count measurements run with (``threads``, or torch's current setting)."""
        return self.threads if self.threads is not None else torch.get_num_threads()

    def _thread_clock_valid(self) -> bool:
        return self.torch_device.type == "cpu" and self.threads == 1

    @property
    def clock_used(self) -> str:
        """``"thread"`` or ``"wall"``: the clock :attr:`clock` resolves to."""
        if self.clock == "auto":
            return "thread" if self._thread_clock_valid() else "wall"
        return self.clock

    def robust(self) -> LatencySettings:
        """These settings at 1 thread with the thread CPU clock (what ``on_load="fallback"`` switches to)."""
        return replace(self, threads=1, clock="thread")
