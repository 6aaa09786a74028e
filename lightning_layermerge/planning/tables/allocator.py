"""The memory-allocator regime latency is measured in (torch only, no Lightning).

PyTorch's CPU tensors come from the C library's ``malloc``. With glibc's defaults every large
activation (above a threshold that glibc adjusts as the process runs) is a fresh ``mmap``, and
the kernel then zero-fills it page by page on first touch: about 1,000 minor page faults per
4 MB tensor. Measured on the 2-core development machine (1 thread, thread CPU clock), a
64-channel 3x3 conv at batch 64, 16 px took 7.4 ms median with those faults, with single passes
up to 12.7 ms, and 5.6-6.3 ms (max within 10 % of the median) without them; whole-network
timings of a small ResNet moved between 3.6 and 9 ms from one process to the next. The faults'
cost depends on the kernel's memory state at that moment, not on the network, so a table
timed with them is not comparable with a network timed minutes later.

A serving process stops paying them after warm-up (jemalloc, tcmalloc, ONNX Runtime's arena and
PyTorch's CUDA allocator all keep freed memory for reuse), so :func:`cached_allocator` times in
that regime: while it is active, glibc serves every allocation from its heap and keeps freed
memory (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` at its maximum). On exit it leaves glibc with
the thresholds its own dynamic rule converges to for large tensors (``M_MMAP_THRESHOLD`` 32 MB,
``M_TRIM_THRESHOLD`` 64 MB), not the 128 kB start values, so training afterwards does not pay
page faults on every large tensor either (setting any threshold turns glibc's dynamic rule off,
so the old state cannot be restored exactly). Elsewhere than glibc (macOS, Windows, musl) it
does nothing and :func:`allocator_regime` says so.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import platform
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

__all__ = ["ALLOCATORS", "allocator_regime", "cached_allocator"]

#: Values of ``LatencySettings.allocator``.
ALLOCATORS = ("cached", "system")

# mallopt parameters (glibc <malloc.h>).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# What glibc's dynamic rule converges to for tensors of 32 MB and more (DEFAULT_MMAP_THRESHOLD_MAX
# on 64-bit, trim threshold twice the mmap threshold), and its default mmap count.
_AFTER_MMAP_THRESHOLD = 32 * 1024 * 1024
_AFTER_TRIM_THRESHOLD = 2 * _AFTER_MMAP_THRESHOLD
_DEFAULT_MMAP_MAX = 65536
_KEEP_ALL = 2**31 - 1  # largest int mallopt accepts: never give the heap top back

_lock = threading.Lock()
_depth = 0  # nesting of cached_allocator blocks (only the outermost one switches)


@functools.lru_cache(maxsize=1)
def _mallopt() -> "ctypes._CFuncPtr | None":
    """glibc's ``mallopt``, or None where the C library is not glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.mallopt
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return fn


def allocator_regime(allocator: str) -> str:
    """What ``allocator`` really means on this machine (for reports and cache keys).

    Args:
        allocator: ``"cached"`` or ``"system"`` (``LatencySettings.allocator``).

    Returns:
        ``"cached"`` (glibc keeps freed memory while timing), ``"system"`` (as the process
        runs, with its page faults) or ``"system (no glibc)"`` when ``"cached"`` was asked
        for but the C library is not glibc.
    """
    if allocator not in ALLOCATORS:
        raise ValueError(f"allocator must be one of {list(ALLOCATORS)}, got {allocator!r}")
    if allocator == "system":
        return "system"
    return "cached" if _mallopt() is not None else "system (no glibc)"


@contextmanager
def cached_allocator(enabled: bool = True) -> Iterator[None]:
    """Serve every allocation from the heap and keep freed memory while the block runs.

    Nested blocks are fine (only the outermost one switches). Does nothing when ``enabled``
    is False or the C library is not glibc.
    """
    global _depth
    mallopt = _mallopt() if enabled else None
    if mallopt is None:
        yield
        return
    with _lock:
        _depth += 1
        if _depth == 1:
            mallopt(_M_TRIM_THRESHOLD, _KEEP_ALL)
            mallopt(_M_MMAP_MAX, 0)
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0:
                mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
                mallopt(_M_MMAP_THRESHOLD, _AFTER_MMAP_THRESHOLD)
                mallopt(_M_TRIM_THRESHOLD, _AFTER_TRIM_THRESHOLD)
