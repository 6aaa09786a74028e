"""Time the LayerMerge DP solver on a synthetic MobileNetV2-shaped table.

The table mimics MobileNetV2-1.0 (L = 52 conv layers, ~400 entries as in the paper's 391):
segments of up to 7 layers, 1-3 merged kernel sizes each, latencies and importances drawn
with a fixed seed. Every method is timed at resolution 1000 and 10000 (median of 5 runs,
single thread) and the markdown table is printed and written to ``results/solver.md``.

Usage::

    python recipes/benchmarks/bench_solver.py
"""

from __future__ import annotations

import os

# Single thread, set before numpy loads its BLAS (the DP itself uses elementwise ops only).
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import platform  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from lightning_layermerge import solve  # noqa: E402

NUM_LAYERS = 52
MAX_SEGMENT = 7
SEED = 0
RUNS = 5
RESOLUTIONS = (1000, 10000)
# Budget as a fraction of the original latency. Depth keeps every conv, so on this table it
# cannot go below ~82 % of the original latency and gets a looser budget.
BUDGET_FRACTION = {"layermerge": 0.5, "layeronly": 0.5, "depth": 0.9}
RESULTS = Path(__file__).parent / "results" / "solver.md"

Entry = tuple[int, int, int]


def synthetic_table(seed: int = SEED) -> tuple[dict[Entry, float], dict[Entry, float], float]:
    """Build a MobileNetV2-shaped table.

    Returns:
        ``(latency, importance, original_latency)``; the original latency is the sum of the
        kept single-layer entries (kernel 3, the network as it is).
    """
    rng = np.random.default_rng(seed)
    lat: dict[Entry, float] = {}
    imp: dict[Entry, float] = {}
    layer_ms = rng.uniform(0.05, 0.6, size=NUM_LAYERS)
    for i in range(NUM_LAYERS):
        for j in range(i + 1, min(NUM_LAYERS, i + MAX_SEGMENT) + 1):
            length = j - i
            if length > 1 and rng.random() > 0.8 / length ** 0.35:
                continue  # segment crosses a residual add / stride boundary: not legal
            kernels = [1, 3] if length == 1 else sorted(
                rng.choice([3, 5, 7, 9, 11], size=int(rng.integers(1, 4)), replace=False))
            for k in kernels:
                # Merged layers cost less than the sum of their parts, more for larger kernels.
                base = layer_ms[i:j].sum() * rng.uniform(0.35, 0.8) * (1 + 0.04 * k)
                lat[(i, j, int(k))] = float(base if k > 1 or length > 1 else 0.01)
                # I = exp(perf drop): 1 for the untouched layer, lower when a conv is removed.
                drop = 0.0 if (length, k) == (1, 3) else rng.uniform(0.02, 0.3) * length
                imp[(i, j, int(k))] = float(np.exp(-drop))
    original = float(sum(lat[(i, i + 1, 3)] for i in range(NUM_LAYERS)))
    return lat, imp, original


def time_solve(lat, imp, budget: float, method: str, resolution: int) -> tuple[float, object]:
    """Median wall time (ms) of ``RUNS`` calls, and the solution."""
    times = []
    sol = None
    for _ in range(RUNS):
        start = time.perf_counter()
        sol = solve(lat, imp, NUM_LAYERS, budget, method, resolution=resolution)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times), sol


def main() -> None:
    """Run the benchmark, print and save the markdown table."""
    lat, imp, original = synthetic_table()
    lines = [
        "# DP solver timing",
        "",
        f"Synthetic MobileNetV2-shaped table: L = {NUM_LAYERS}, {len(lat)} entries, "
        f"segments up to {MAX_SEGMENT} layers, seed {SEED}; original latency {original:.3f} ms "
        f"(synthetic; random numbers, so the chosen segments mean nothing, only the timing "
        f"does). Median of {RUNS} runs, "
        f"single thread, {platform.processor() or platform.machine()}, "
        f"Python {platform.python_version()}, numpy {np.__version__}.",
        "",
        "| method | budget (ms) | resolution | median time (ms) | segments | latency (ms) "
        "| importance |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method in ("layermerge", "layeronly", "depth"):
        budget = BUDGET_FRACTION[method] * original
        for resolution in RESOLUTIONS:
            ms, sol = time_solve(lat, imp, budget, method, resolution)
            lines.append(f"| {method} | {budget:.3f} | {resolution} | {ms:.1f} | {len(sol.segments)} | "
                         f"{sol.latency:.3f} | {sol.importance:.4f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
