"""Where a latency table's numbers live: the cache key, the reserved entries, the build's store (torch only).

A table's numbers depend on the chain, the hardware and every setting that changes a timing;
:func:`_cache_key` names them all, so a cache file is only reused for the same measurement.
"""

from __future__ import annotations

import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ...surgery.graph import Chain
from .allocator import allocator_regime
from .cache import TableCache, fingerprint
from .latency_settings import LatencySettings

#: Reserved cache entry holding ``total_ms`` (no legal segment has a negative position).
TOTAL_KEY = (-1, -1, 0)
#: Reserved cache entry holding the reference module's latency (``settings.reference``).
REFERENCE_KEY = (-2, -2, 0)
#: Reserved cache entries ``(IN_PLACE, l, 0)``: chain layer ``l`` (conv + activation) timed in
#: place in the BN-folded original (``settings.context``); ``(IN_PLACE, 0, 0)`` marks them done.
IN_PLACE = -3
#: Reserved cache entries ``(IN_PLACE_SKIP, s, 0)``: residual addition ``chain.skips[s]`` with its
#: shortcut, timed in place (``settings.context``).
IN_PLACE_SKIP = -4

#: Bumped whenever the measurement method changes, so old cache files are not reused.
_METHOD_VERSION = 7

Key = tuple[int, int, int]


def _batched(shape: Sequence[int], batch: int | None) -> tuple[int, ...]:
    """``shape`` with its batch dimension replaced by ``batch`` (kept when None)."""
    return tuple(shape) if batch is None else (batch, *tuple(shape)[1:])


def _uses_context(settings: LatencySettings) -> bool:
    """Whether entries are scaled to in-place prices (needs per-operation times: eager, or ONNX
    Runtime's profiler; TorchScript has neither)."""
    return settings.context and settings.runtime in ("eager", "onnxruntime")


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
        "threads": settings.threads_used,
        "warmup": settings.warmup,
        "repeats": settings.repeats,
        "reference": settings.reference,
        "runtime": _runtime_version(settings.runtime),
        "memory_format": settings.memory_format,
        "clock": settings.clock_used,
        "context": _uses_context(settings),
        "allocator": allocator_regime(settings.allocator),
    }


def _runtime_version(runtime: str) -> str:
    """The runtime and, for ONNX Runtime, its version (numbers change between releases)."""
    if runtime != "onnxruntime":
        return runtime
    try:
        import onnxruntime
    except ImportError:
        return runtime
    return f"onnxruntime {onnxruntime.__version__}"


def _open_cache(cache_dir: str | os.PathLike | None, chain: Chain, key: dict[str, Any]) -> TableCache | None:
    """The cache file for these settings (one file per architecture and settings)."""
    if cache_dir is None:
        return None
    path = Path(cache_dir) / f"latency-{chain.fingerprint}-{fingerprint(key)[:12]}.json"
    return TableCache(path, key)


def spread_key(key: Key) -> Key:
    """Where the cache file keeps the spread of entry ``key``: ``(i, j, -1 - k)``.

    Real entries have ``k >= 0``, so a negative ``k`` never collides with them (nor with the
    reserved :data:`TOTAL_KEY` / :data:`REFERENCE_KEY`, whose own spreads map to ``k = -1``).
    """
    i, j, k = key
    return (i, j, -1 - k)


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

    def spread(self, key: Key) -> float:
        """The stored spread of ``key`` (``nan`` if none)."""
        return self.values.get(spread_key(key), math.nan)

    def put_timing(self, key: Key, ms: float, spread_: float) -> None:
        """Store an entry and its spread (the spread first: a stored entry always has one)."""
        self.put(spread_key(key), spread_)
        self.put(key, ms)


def _complete(store: _Store, chain: Chain) -> bool:
    """Whether the cache already holds every entry, the total and (context) the in-place layers."""
    return (store.get(TOTAL_KEY) is not None and all(store.get(s.key) is not None for s in chain.segments)
            and (store.get((IN_PLACE, 0, 0)) is not None or not _uses_context_key(store)))


def _uses_context_key(store: _Store) -> bool:
    """Whether the store's cache key asks for in-place layers (memory-only stores: assume so)."""
    return store.cache is None or bool(store.cache.key.get("context", True))
