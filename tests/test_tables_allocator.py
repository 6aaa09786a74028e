"""The allocator regime latency is timed in (glibc: freed memory kept while timing)."""

from __future__ import annotations

import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_layermerge.planning.tables.allocator import ALLOCATORS, allocator_regime
from lightning_layermerge.planning.tables.latency import LatencySettings

GLIBC = allocator_regime("cached") == "cached"


def minor_faults_per_allocation(numel: int, rounds: int = 8) -> float:
    """Mean minor page faults of allocating and filling a fresh float tensor of ``numel`` elements."""
    torch.empty(numel).fill_(1.0)  # the first one may grow the heap
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(rounds):
        torch.empty(numel).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / rounds


# Run in a fresh process: after the rest of the suite (pytest -n 0), this process's heap can already
# hold a free chunk large enough for a 96 MB tensor, which then takes no page fault in any regime.
FAULTS_SCRIPT = """
from test_tables_allocator import minor_faults_per_allocation

from lightning_layermerge.planning.tables.allocator import cached_allocator
numel = 24 * 1024 * 1024
before = minor_faults_per_allocation(numel)
with cached_allocator():
    with cached_allocator():  # nesting is harmless
        inside = minor_faults_per_allocation(numel)
print(before, inside, minor_faults_per_allocation(numel))
"""


@pytest.mark.skipif(not GLIBC, reason="the cached regime needs glibc's mallopt; elsewhere it is a documented no-op")
def test_cached_allocator_stops_page_faults_on_large_tensors() -> None:
    numel = 24 * 1024 * 1024  # 96 MB: above any mmap threshold glibc uses on its own
    pages = numel * 4 / resource.getpagesize()
    out = subprocess.run([sys.executable, "-c", FAULTS_SCRIPT], capture_output=True, text=True, timeout=300,
                         cwd=Path(__file__).parent)  # tests/: the script imports this module
    assert out.returncode == 0, out.stderr[-3000:]
    before, inside, after = map(float, out.stdout.split())
    assert before > 0.5 * pages  # a fresh mmap, faulted in page by page
    assert inside < 0.01 * pages  # reused heap memory
    assert after > 0.5 * pages  # back to mmap for huge tensors afterwards


def test_allocator_setting_is_validated_and_reported() -> None:
    assert ALLOCATORS == ("cached", "system")
    assert LatencySettings().allocator == "cached"  # the repeatable regime is the default
    assert allocator_regime("system") == "system"
    assert allocator_regime("cached") in ("cached", "system (no glibc)")
    with pytest.raises(ValueError, match="allocator must be one of"):
        LatencySettings(allocator="jemalloc")
    with pytest.raises(ValueError, match="allocator must be one of"):
        allocator_regime("jemalloc")
