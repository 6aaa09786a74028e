"""Does this machine's parallel speed-up come and go? (issue 12, ONNX Runtime at more than one thread)

For ``--seconds``, alternately: the BN-folded network (``latency_models.py``) timed in ONNX Runtime
at ``--threads`` threads (median of 200 passes), and the library's parallel-state sentinel
(``planning.tables.parallel_gate``: its multi-thread / single-thread time ratio). Prints one line
per round and a summary: how many rounds ran in the slow state (network slower than 1.3x its
fastest round), and the sentinel's ratio in either state. On a machine without the problem
every round is fast.

    python recipes/benchmarks/parallel_state.py --model digits-mbv2 --seconds 120

Measured on the 2-vCPU cloud VM of this project (nothing else running), see
``results/latency_causes.md`` section 9.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="digits-mbv2")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=60.0)
    args = p.parse_args()
    warnings.simplefilter("ignore")
    from latency_models import build

    from lightning_layermerge import fold_batchnorm, trace
    from lightning_layermerge.planning.tables import LatencySettings
    from lightning_layermerge.planning.tables.parallel_gate import ParallelGate
    from lightning_layermerge.planning.tables.runtime import prepare_call

    torch.set_num_threads(1)  # torch only exports here; its idle OpenMP workers must not share ONNX Runtime's cores
    model, example = build(args.model)
    folded = fold_batchnorm(model, trace(model, example))
    settings = LatencySettings(runtime="onnxruntime", threads=args.threads, batch_size=example[0].shape[0])
    call = prepare_call(folded, example, runtime="onnxruntime", memory_format="contiguous",
                        device=torch.device("cpu"), dtype=torch.float32, threads=args.threads)
    gate = ParallelGate(settings)
    rounds: list[tuple[float, float]] = []
    end = time.time() + args.seconds
    while time.time() < end:
        for _ in range(10):
            call()
        times = []
        for _ in range(200):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) * 1e3)
        rounds.append((statistics.median(times), gate.ratio()))
        print(f"{time.strftime('%H:%M:%S')} network {rounds[-1][0]:.3f} ms  sentinel ratio {rounds[-1][1]:.2f}", flush=True)
    fastest = min(ms for ms, _ in rounds)
    slow = [r for r in rounds if r[0] > 1.3 * fastest]
    fast = [r for r in rounds if r[0] <= 1.3 * fastest]

    def describe(group: list[tuple[float, float]]) -> str:
        if not group:
            return "none"
        ms, ratio = zip(*group)
        return (f"{len(group)} rounds, network {min(ms):.3f}-{max(ms):.3f} ms, "
                f"sentinel ratio {min(ratio):.2f}-{max(ratio):.2f} (median {statistics.median(ratio):.2f})")

    print(f"fast: {describe(fast)}\nslow (> 1.3x the fastest round): {describe(slow)}")


if __name__ == "__main__":
    main()
