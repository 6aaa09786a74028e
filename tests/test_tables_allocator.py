"""The allocator regime latency is timed in (glibc: freed memory kept while timing)."""

from __future__ import annotations

import resource
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_layermerge.planning.tables.allocator import ALLOCATORS, allocator_regime
from lightning_layermerge.planning.tables.latency import LatencySettings

GLIBC = allocator_regime("cached") == "cached"


def minor_faults_per_allocation(numel: int, rounds: int = 8) -> float:
    """Median minor page faults of allocating and filling a fresh float tensor of ``numel`` elements.

    Two untimed allocations first (the heap may grow on them); the median of the rounds, since
    the kernel occasionally faults one round's pages in again (e.g. after reclaiming them).
    """
    for _ in range(2):
        torch.empty(numel).fill_(1.0)
    faults = []
    for _ in range(rounds):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        torch.empty(numel).fill_(1.0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return float(statistics.median(faults))


# Run in a fresh process: after the rest of the suite (pytest -n 0), this process's heap can already
# hold a free chunk large enough for a 96 MB tensor, which then takes no page fault in any regime.
FAULTS_SCRIPT = """
import ctypes

from test_tables_allocator import minor_faults_per_allocation

from lightning_layermerge.planning.tables.allocator import cached_allocator
# glibc's default start: tensors above 128 kB are mmapped (its dynamic rule may already have moved
# the threshold in this process, depending on what importing torch allocated and freed).
ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)
numel = 24 * 1024 * 1024
before = minor_faults_per_allocation(numel)
with cached_allocator():
    with cached_allocator():  # nesting is harmless
        inside = minor_faults_per_allocation(numel)
print(before, inside, minor_faults_per_allocation(numel))
"""


@pytest.mark.skipif(not GLIBC, reason="the cached regime needs glibc's mallopt; elsewhere it is a documented no-op")
def test_cached_allocator_stops_page_faults_on_large_tensors() -> None:
    numel = 24 * 1024 * 1024  # 96 MB: above the 32 MB mmap threshold the cached block leaves behind
    pages = numel * 4 / resource.getpagesize()
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)  # tests/: the script imports this module
    assert out.returncode == 0, out.stderr[-3000:]
    before, inside, _after = map(float, out.stdout.split())
    # A fresh mmap faults page by page (or per 2 MB huge page where the kernel backs it with them).
    huge_pages = numel * 4 / (2 * 1024 * 1024)
    assert before >= huge_pages
    assert inside < 0.01 * pages and inside < before  # reused heap memory: no faults
    # Not asserted: afterwards glibc's thresholds are 32 MB mmap / 64 MB trim, but a freed 96 MB
    # heap chunk kept from the block may still serve the next tensor (0 faults) or not (all pages).


def test_allocator_setting_is_validated_and_reported() -> None:
    assert ALLOCATORS == ("cached", "system")
    assert LatencySettings().allocator == "cached"  # the repeatable regime is the default
    assert allocator_regime("system") == "system"
    assert allocator_regime("cached") in ("cached", "system (no glibc)")
    with pytest.raises(ValueError, match="allocator must be one of"):
        LatencySettings(allocator="jemalloc")
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocator_regime("jemalloc")
