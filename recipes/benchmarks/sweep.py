"""trace / prune / merge over every torchvision classifier and a broad list of timm models.

For each model (random weights, BatchNorm statistics calibrated on random data, batch 1, the
smallest input resolution from ``RESOLUTIONS`` the model accepts):

* ``trace``: does it trace, or the first line of the reason why not;
* the chain: L, forced boundaries (barriers), legal segments;
* exactness in float64 for the keep-all plan, the remove-all plan and ``--random-plans``
  random plans: ``merge(prune(model))`` against ``prune(model)``, max relative error
  (``max |a - b| / max |a|``). Above 1e-9, the pruned network's own float64 sensitivity
  (its output change under one-ulp weight noise, ``lightning_layermerge.surgery.testing.float_sensitivity``)
  decides: within 10x of it the difference is rounding ("rounding"), beyond it the merge
  is wrong ("NO");
* CPU latency, float32, one thread, batch 1: the remove-all merged network against the
  original with BatchNorm folded (``merge`` of the keep-all plan, as the latency table's
  ``total_ms``), interleaved pass by pass, median of repeats.

Every model runs in its own forked process with a wall-time limit, so one model can neither
hang nor crash the sweep. Models above ``--max-params`` parameters are skipped (counted on
the meta device, without allocating them): their float64 copies do not fit this machine.

Usage::

    python recipes/benchmarks/sweep.py                       # everything (~1 h on one core)
    python recipes/benchmarks/sweep.py --models tv:resnet18,mixnet_s --quick
    python recipes/benchmarks/sweep.py --list

Writes ``recipes/benchmarks/results/sweep.md`` and ``sweep.csv``; a run on a subset updates
the rows of those models and keeps the others (``--fresh`` starts over).
"""

from __future__ import annotations

import argparse
import copy
import csv
import gc
import multiprocessing as mp
import random
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from lightning_layermerge import Plan, merge, prune, trace
from lightning_layermerge.planning.tables.latency import LatencySettings, time_interleaved
from lightning_layermerge.surgery.testing import calibrate_batchnorm, float_sensitivity, rel_err

RESULTS = Path(__file__).parent / "results"
RESOLUTIONS = (64, 96, 128, 160, 224, 299)
EXACT = 1e-9  # float64 relative error accepted without further question
ROUNDING_FACTOR = 10.0  # merged error allowed relative to the pruned net's own sensitivity

# A diverse list of timm CNNs: plain, residual, grouped, depthwise + SE, multi-branch,
# dense concat, reparameterisable, hybrid (attention) and "same"-padding variants.
TIMM_MODELS = [
    "resnet18", "resnet50d", "resnet26t", "resnetblur18", "resnext50_32x4d", "seresnext26d_32x4d",
    "ecaresnet26t", "skresnet18", "res2net50_26w_4s", "regnetx_002", "regnety_004", "regnetz_b16",
    "mobilenetv2_100", "mobilenetv3_large_100", "mobilenetv3_small_100", "efficientnet_b0",
    "efficientnet_lite0", "tf_efficientnet_b0", "mixnet_s", "ghostnet_100", "repvgg_a2",
    "mobileone_s0", "densenet121", "dla34", "dpn68", "convnext_atto", "vgg11_bn", "inception_v3",
    "xception41", "hrnet_w18_small", "rexnet_100", "tinynet_a", "lcnet_050", "fbnetc_100",
    "mnasnet_100", "semnasnet_100", "spnasnet_100", "hardcorenas_a", "cspresnet50", "cspdarknet53",
    "darknet53", "selecsls42b", "ese_vovnet19b_dw", "gernet_s", "nf_resnet26", "mobilevit_xs",
    "fastvit_t8",
]

COLUMNS = ["model", "status", "reason", "resolution", "params_m", "L", "barriers", "segments",
           "plans", "exact", "max_rel_err", "max_err_over_sensitivity", "removeall_segments",
           "removeall_convs", "folded_ms", "removeall_ms", "speedup", "seconds"]


# ----------------------------------------------------------------------------- models
def torchvision_models() -> list[str]:
    """Every classification model torchvision registers, as ``tv:name``."""
    import torchvision

    return [f"tv:{n}" for n in torchvision.models.list_models(module=torchvision.models)]


def all_models() -> list[str]:
    """The full sweep: torchvision classifiers, then ``TIMM_MODELS`` as ``timm:name``."""
    return torchvision_models() + [f"timm:{n}" for n in TIMM_MODELS]


def build(spec: str) -> torch.nn.Module:
    """The model named ``tv:name`` or ``timm:name`` with random weights."""
    source, name = spec.split(":", 1)
    if source == "tv":
        import torchvision

        return torchvision.models.get_model(name, weights=None)
    import timm

    return timm.create_model(name, pretrained=False)


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(all parameters, Conv2d weights) of ``model``."""
    convs = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    return sum(p.numel() for p in model.parameters()), convs


def meta_param_counts(spec: str) -> tuple[int, int] | None:
    """:func:`param_counts` built on the meta device (no memory, no initialisation cost);
    ``None`` for a model whose constructor computes with tensors (torchvision's RegNets)."""
    try:
        with torch.device("meta"):
            return param_counts(build(spec))
    except Exception:
        return None


def too_large(counts: tuple[int, int], args: argparse.Namespace) -> str:
    """Why a model with these parameter counts is skipped ("" if it is not)."""
    total, convs = counts
    if total > args.max_params * 1e6:
        return f"{total / 1e6:.0f}M parameters > --max-params {args.max_params:g}M (float64 copies do not fit)"
    if convs > args.max_conv_params * 1e6:
        return (f"{convs / 1e6:.0f}M conv weights > --max-conv-params {args.max_conv_params:g}M "
                "(float64 merging would exceed the time limit)")
    return ""


def resolve(requested: list[str]) -> list[str]:
    """``--models`` entries to specs; a bare name matches torchvision and timm."""
    known = all_models()
    out: list[str] = []
    for item in requested:
        if ":" in item:
            out.append(item)
            continue
        hits = [m for m in known if m.split(":", 1)[1] == item]
        out += hits or [f"timm:{item}"]
    return out


# ----------------------------------------------------------------------------- one model
def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def _smallest_input(model: torch.nn.Module) -> torch.Tensor:
    """Batch-1 input at the smallest resolution in ``RESOLUTIONS`` that the model accepts."""
    last: BaseException | None = None
    for size in RESOLUTIONS:
        x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        try:
            with torch.no_grad():
                model(x)
            return x
        except Exception as err:  # models reject inputs with all sorts of errors
            last = err
    raise ValueError(f"no resolution in {RESOLUTIONS} accepted: {_first_line(last)}")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``rel_err``, but 0 for identical outputs (a zero-initialised head makes max |a| = 0)."""
    return 0.0 if torch.equal(a, b) else rel_err(a, b)


def _exactness(pruned: torch.nn.Module, merged: torch.nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(relative error, error / own sensitivity) of the merged network in float64.

    The ratio is computed only above ``EXACT`` (it costs three more forwards); 0 otherwise.
    """
    with torch.no_grad():
        exact = pruned(x)
        err = _rel(exact, merged(x))
    if not err <= EXACT:  # also catches NaN
        own = float_sensitivity(pruned, x)
        return err, (err / own if own > 0 else float("inf"))
    return err, 0.0


def run_model(spec: str, args: argparse.Namespace, report: Any) -> None:
    """Sweep one model, sending the partial record through ``report`` after every stage."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    start = time.perf_counter()
    rec: dict[str, Any] = {"model": spec, "status": "error", "reason": ""}

    def send(**fields: Any) -> None:
        rec.update(fields, seconds=round(time.perf_counter() - start, 1))
        report.send(dict(rec))

    stage = "build"
    try:
        model32 = build(spec).eval()
        counts = param_counts(model32)
        rec["params_m"] = round(counts[0] / 1e6, 2)
        if too_large(counts, args):  # only when the meta-device count was impossible
            send(status="skipped", reason=too_large(counts, args))
            return
        stage = "input"
        x32 = _smallest_input(model32)
        rec["resolution"] = x32.shape[-1]
        calibrate_batchnorm(model32, x32.expand(4, *x32.shape[1:]).contiguous())  # batch 1 cannot train BN
        model = copy.deepcopy(model32).double().eval()
        x = x32.double()
        stage = "trace"
        try:
            chain = trace(model, x)
        except Exception as err:
            send(status="untraced", reason=_first_line(err))
            return
        send(status="traced", L=chain.num_layers, barriers=len(chain.forced) - 2, segments=len(chain.segments))
        stage = "plans"
        rng = random.Random(0)
        plans = {"keep-all": Plan.keep_all(chain), "remove-all": Plan.remove_all(chain)}
        plans.update({f"random {n}": Plan.random(chain, rng) for n in range(args.random_plans)})
        rec["removeall_segments"] = len(plans["remove-all"].segments)
        rec["removeall_convs"] = f"{len(plans['remove-all'].kept_convs)}/{chain.num_layers}"
        worst, worst_ratio, bad = 0.0, 0.0, []
        merged_of: dict[str, torch.nn.Module] = {}
        for n, (name, plan) in enumerate(plans.items()):
            stage = f"{name} plan"
            pruned = prune(model, chain, plan).eval()
            merged = merge(pruned)
            err, ratio = _exactness(pruned, merged, x)
            if name == "keep-all":
                with torch.no_grad():
                    err = max(err, _rel(model(x), pruned(x)))  # keep-all must be the model itself
            worst, worst_ratio = max(worst, err), max(worst_ratio, ratio)
            if not err <= EXACT and not ratio <= ROUNDING_FACTOR:
                bad.append(f"{name} {err:.1e}")
            if name in ("keep-all", "remove-all"):
                merged_of[name] = merged
            del pruned
            gc.collect()
            verdict = "NO" if bad else ("rounding" if worst > EXACT else "yes")
            send(plans=n + 1, exact=verdict, max_rel_err=f"{worst:.1e}",
                 max_err_over_sensitivity=f"{worst_ratio:.2f}" if worst_ratio else "",
                 reason="; ".join(bad))
        stage = "timing"
        settings = LatencySettings(dtype="float32", threads=1, warmup=args.warmup, repeats=args.repeats)
        folded_ms, removeall_ms = time_interleaved(
            [(merged_of["keep-all"], x32), (merged_of["remove-all"], x32)], settings)
        send(folded_ms=f"{folded_ms:.3f}", removeall_ms=f"{removeall_ms:.3f}",
             speedup=f"{folded_ms / removeall_ms:.2f}")
    except Exception as err:
        where = traceback.extract_tb(err.__traceback__)[-1]
        if stage.endswith(" plan"):  # prune or merge raised on a legal plan: a bug, like a wrong merge
            rec["exact"] = "failed"
        send(status="traced" if "L" in rec else "error",
             reason=(rec.get("reason") + "; " if rec.get("reason") else "")
             + f"{stage} failed: {_first_line(err)} ({Path(where.filename).name}:{where.lineno})")


# ----------------------------------------------------------------------------- driver
def sweep_one(spec: str, args: argparse.Namespace, log: Any) -> dict[str, Any]:
    """Run ``spec`` in a forked child with a time limit; the last record it sent wins."""
    counts = meta_param_counts(spec)
    if counts is not None and too_large(counts, args):
        return {"model": spec, "status": "skipped", "params_m": round(counts[0] / 1e6, 2),
                "reason": too_large(counts, args), "seconds": 0.0}
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_model, args=(spec, args, send), daemon=True)
    start = time.perf_counter()
    proc.start()
    send.close()
    rec: dict[str, Any] = {"model": spec, "status": "error", "reason": "no result"}
    deadline = start + args.timeout
    while True:
        left = deadline - time.perf_counter()
        if left <= 0 or not recv.poll(min(left, 5.0)):
            if left <= 0:
                proc.kill()
                proc.join()
                earlier = rec.get("reason") if rec.get("reason") not in ("", "no result") else ""
                rec["reason"] = (earlier + "; " if earlier else "") + f"time limit {args.timeout:.0f}s reached"
                if rec["status"] == "error":
                    rec["status"] = "timeout"
                break
            if not proc.is_alive():
                break
            continue
        try:
            rec = recv.recv()
        except EOFError:
            break
        print(f"    {spec}: {rec.get('status')} {rec.get('exact', '')} {rec.get('seconds', '')}s", file=log, flush=True)
    proc.join(timeout=10)
    if proc.exitcode not in (0, None) and proc.exitcode < 0 and "time limit" not in rec.get("reason", ""):
        rec["reason"] = (rec.get("reason", "") + "; " if rec.get("reason") else "") + \
            f"worker killed by signal {-proc.exitcode} (out of memory?)"
    rec["seconds"] = round(time.perf_counter() - start, 1)
    return rec


def _load(path: Path) -> dict[str, dict[str, Any]]:
    if not path.exists():
        return {}
    with path.open() as f:
        return {row["model"]: row for row in csv.DictReader(f)}


def write_results(rows: list[dict[str, Any]], args: argparse.Namespace, wall: float | None) -> None:
    """<out>.csv (one row per model) and <out>.md (summary counts and the table)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    with (RESULTS / f"{args.out}.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in COLUMNS})
    status = [r.get("status") for r in rows]
    traced = [r for r in rows if r.get("status") == "traced"]
    exact = [r for r in traced if r.get("exact") == "yes"]
    rounding = [r for r in traced if r.get("exact") == "rounding"]
    wrong = [r for r in traced if r.get("exact") in ("NO", "failed")]
    speedups = [float(r["speedup"]) for r in traced if r.get("speedup")]
    lines = [
        "# trace / prune / merge sweep: torchvision classifiers and timm CNNs",
        "",
        f"Random weights (BatchNorm statistics calibrated on random data), batch 1, smallest of "
        f"{list(RESOLUTIONS)} the model accepts, CPU, torch {torch.__version__}. Exactness in float64 "
        f"for the keep-all, remove-all and {args.random_plans} random plans: `yes` = relative error <= 1e-9 "
        f"for all; `rounding` = above 1e-9 but within {ROUNDING_FACTOR:.0f}x of the pruned network's own "
        "float64 sensitivity (output change under one-ulp weight noise); `NO` = a wrong merge; "
        "`failed` = prune or merge raised. Speed-up: "
        "remove-all merged network vs the original with BatchNorm folded (keep-all plan merged), float32, "
        f"1 thread, interleaved, median of {args.repeats} passes, on a CPU shared with other jobs. "
        f"Per-model time limit {args.timeout:.0f}s; models above {args.max_params:g}M parameters or "
        f"{args.max_conv_params:g}M conv weights skipped.",
        "",
        f"Command: `python {' '.join(['recipes/benchmarks/sweep.py', *sys.argv[1:]])}`"
        + (f" (this run: {wall / 60:.1f} min wall)." if wall is not None else "; the rows come from earlier runs, "
           "whose settings may differ from the above (the plans column counts each model's checked plans; "
           f"total of the per-model times: {sum(float(r.get('seconds') or 0) for r in rows) / 60:.0f} min)."),
        "",
        "## Summary",
        "",
        f"- models: {len(rows)} ({sum(r['model'].startswith('tv:') for r in rows)} torchvision, "
        f"{sum(r['model'].startswith('timm:') for r in rows)} timm)",
        f"- traced: {len(traced)}; untraced: {status.count('untraced')}; skipped (size): "
        f"{status.count('skipped')}; timed out: {status.count('timeout')}; other errors: {status.count('error')}",
        f"- exact (<= 1e-9): {len(exact)}; within float64 rounding: {len(rounding)}; inexact or failed: {len(wrong)}"
        + (f" ({', '.join(r['model'] for r in wrong)})" if wrong else ""),
    ]
    if speedups:
        lines.append(f"- remove-all speed-up over the BN-folded original: median {statistics.median(speedups):.2f}x, "
                     f"range {min(speedups):.2f}x-{max(speedups):.2f}x over {len(speedups)} models")
    lines += [
        "",
        "## Per model",
        "",
        "| model | status | res | params (M) | L | barriers | segments | plans | exact | max rel err "
        "| err/sens. | remove-all segs | convs kept | folded ms | remove-all ms | speed-up | s | reason |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cells = [r.get(k, "") for k in ("model", "status", "resolution", "params_m", "L", "barriers", "segments",
                                         "plans", "exact", "max_rel_err", "max_err_over_sensitivity",
                                         "removeall_segments", "removeall_convs", "folded_ms", "removeall_ms",
                                         "speedup", "seconds")]
        reason = str(r.get("reason", "")).replace("|", "\\|").replace("\n", " ")
        lines.append("| " + " | ".join(str(c) for c in cells) + f" | {reason} |")
    (RESULTS / f"{args.out}.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", help="comma-separated subset: tv:name, timm:name or a bare name")
    parser.add_argument("--quick", action="store_true", help="1 random plan, 3 warm-up + 5 timed passes")
    parser.add_argument("--random-plans", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="timed passes per network")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=100.0, help="seconds per model")
    parser.add_argument("--max-params", type=float, default=100.0, help="skip models above this (millions)")
    parser.add_argument("--max-conv-params", type=float, default=28.0,
                        help="skip models with more conv weights than this (millions)")
    parser.add_argument("--fresh", action="store_true", help="discard rows of earlier runs")
    parser.add_argument("--list", action="store_true", help="print the model list and exit")
    parser.add_argument("--out", default="sweep", help="results/<out>.csv and .md (default: sweep)")
    parser.add_argument("--report-only", action="store_true", help="rewrite <out>.md from <out>.csv and exit")
    args = parser.parse_args()
    if args.quick:
        args.random_plans, args.warmup, args.repeats = 1, 3, 5
    torch.set_num_threads(1)
    specs = resolve(args.models.split(",")) if args.models else all_models()
    if args.list:
        print("\n".join(specs))
        return
    order = all_models()
    rows = {} if args.fresh else _load(RESULTS / f"{args.out}.csv")
    if args.report_only:
        rank = {m: n for n, m in enumerate(order)}
        write_results(sorted(rows.values(), key=lambda r: rank.get(r["model"], len(order))), args, None)
        return
    start = time.perf_counter()
    for n, spec in enumerate(specs, 1):
        print(f"[{n}/{len(specs)}] {spec} ...", flush=True)
        rec = sweep_one(spec, args, sys.stdout)
        rows[spec] = rec
        print(f"[{n}/{len(specs)}] {spec}: {rec.get('status')} L={rec.get('L', '')} exact={rec.get('exact', '')} "
              f"err={rec.get('max_rel_err', '')} speedup={rec.get('speedup', '')} {rec.get('seconds')}s "
              f"{rec.get('reason', '')}", flush=True)
        ranked = sorted(rows.values(), key=lambda r: order.index(r["model"]) if r["model"] in order else len(order))
        write_results(ranked, args, time.perf_counter() - start)


if __name__ == "__main__":
    main()
