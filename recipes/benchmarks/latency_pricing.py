"""Which in-context pricing model predicts merged networks best? (issue 12, quiet machine, 1 thread)

A latency table times every segment alone; inside the network the same layer runs slower
(its weights are cold, its output lands in fresh memory). The table moves the alone times to
"in context" with one pass over the BN-folded original timed operation by operation. This
recipe compares four ways of doing that on the same measured tables and plans:

* ``factor`` (the eager default): entry x in-place / alone time of the layers it replaces;
* ``additive`` (the ONNX Runtime default): each replaced layer's excess split between its
  input and output; a segment gets the input part of its first layer and the output part of
  its last;
* ``bytes``: excess = a x weight bytes + b x activation bytes, a and b fitted (least squares,
  >= 0) on the keep-all layers; ``bytes_exact`` keeps the keep-all layers at their in-place
  times.

For each model of ``latency_models.py``: the table (default ``LatencySettings()``), the DP
plans at budgets 0.4-0.9 (L1 stand-in importance) and ``--random-plans`` random merge plans
(``latency_check.random_merge_plan``); each plan measured against the BN-folded original with
``planning.side_by_side.side_by_side`` three times (median), then predicted by every model.
Time it on a quiet machine: nothing else may run.

    python recipes/benchmarks/latency_pricing.py --models digits-resnet digits-mbv2 resnet18-s16
    python recipes/benchmarks/latency_pricing.py --report-only

Appends rows to ``results/latency_pricing.jsonl``; writes ``results/latency_pricing.md``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
JSONL = HERE / "results" / "latency_pricing.jsonl"
MODELS = ("factor", "additive", "bytes", "bytes_exact")
NOTES = ("<!-- notes -->", "<!-- /notes -->")


def measure(name: str, random_plans: int) -> list[dict]:
    """Table, plans, measurements and every model's prediction for one network."""
    import numpy as np
    from latency_check import default_table, measured_plans, predicted_ratio

    from lightning_layermerge import Plan
    from lightning_layermerge.planning.tables.pricing import in_context, in_context_additive, with_skip_costs

    base = default_table(name)
    model, example, chain, table = base.model, base.example, base.chain, base.table
    in_place, costs = base.in_place, base.skip_costs
    alone, segs = dict(table.alone), {s.key: s for s in chain.segments}
    keep = {s.j: s for s in Plan.keep_all(chain).segments}

    def wbytes(s) -> float:
        return 0.0 if s.identity else s.out_shape[1] * (s.in_shape[1] // s.groups) * s.kernel * s.kernel * 4.0

    def abytes(s) -> float:
        return (math.prod(s.in_shape) + math.prod(s.out_shape)) * 4.0

    fit = [(wbytes(keep[l]), abytes(keep[l]), in_place[l] - alone[keep[l].key]) for l in in_place if not keep[l].identity]
    coef = np.maximum(np.linalg.lstsq(np.array([f[:2] for f in fit]), np.array([f[2] for f in fit]), rcond=None)[0], 0)
    factor = in_context(chain, alone, in_place)

    def bytes_model(exact_keep: bool) -> dict:
        out = {}
        for k, ms in alone.items():
            s = segs[k]
            if s.identity or ms <= 0:
                out[k] = factor[k]
            elif exact_keep and keep[s.j].key == k:
                out[k] = in_place.get(s.j, ms)
            else:
                out[k] = ms + coef[0] * wbytes(s) + coef[1] * abytes(s)
        return out

    entries = {"factor": with_skip_costs(chain, factor, costs),
               "additive": with_skip_costs(chain, in_context_additive(chain, alone, in_place), costs),
               "bytes": with_skip_costs(chain, bytes_model(False), costs),
               "bytes_exact": with_skip_costs(chain, bytes_model(True), costs)}

    rows = []
    for label, plan, measured in measured_plans(model, chain, table, example, random_plans, label=name):
        row = {"model": name, "plan": label, "measured": measured,
               "merges": sum(len(s.convs) > 1 for s in plan.segments), **{m: predicted_ratio(table, chain, entries[m], plan) for m in MODELS}}
        print(label, f"measured {measured:.3f}", " ".join(f"{m} {row[m]:.3f}" for m in MODELS), flush=True)
        rows.append(row)
    return rows


def report(rows: list[dict], command: str) -> str:
    """Per model and pricing: rows within 5 % / 10 %, worst error; then every row."""
    def err(r: dict, m: str) -> float:
        return (r["measured"] - r[m]) / r[m]

    nets = list(dict.fromkeys(r["model"] for r in rows))
    lines = ["# In-context pricing models vs measured plans (issue 12)", "",
             f"Command: `{command}` (quiet machine, 1 thread, thread CPU clock, default `LatencySettings()`). "
             "Error = (measured - predicted) / predicted of the latency ratio to the BN-folded original.", "",
             "| network | plans | " + " | ".join(f"{m}: ≤5 % / ≤10 % / worst" for m in MODELS) + " |",
             "|---|---:|" + "---|" * len(MODELS)]
    for net in nets + ["all"]:
        sel = [r for r in rows if net in ("all", r["model"])]
        cells = []
        for m in MODELS:
            e = [abs(err(r, m)) for r in sel]
            cells.append(f"{sum(x <= 0.05 for x in e)} / {sum(x <= 0.10 for x in e)} / {max(e):.1%}")
        lines.append(f"| {net} | {len(sel)} | " + " | ".join(cells) + " |")
    lines += ["", "| network | plan | merges | measured | " + " | ".join(MODELS) + " |",
              "|---|---|---:|---:|" + "---:|" * len(MODELS)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['plan']} | {r['merges']} | {r['measured']:.3f} | "
                     + " | ".join(f"{r[m]:.3f} ({err(r, m):+.1%})" for m in MODELS) + " |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["digits-resnet", "digits-mbv2", "resnet18-s16"])
    p.add_argument("--random-plans", type=int, default=6)
    p.add_argument("--report-only", action="store_true")
    a = p.parse_args()
    if not a.report_only:
        for name in a.models:
            with JSONL.open("a") as f:
                for row in measure(name, a.random_plans):
                    f.write(json.dumps(row) + "\n")
    rows = [json.loads(line) for line in JSONL.read_text().splitlines() if line.strip()]
    command = ("python recipes/benchmarks/latency_pricing.py --models digits-resnet digits-mbv2 resnet18-s16; "
               "then --models resnet18-224 mobilenet_v2-224 efficientnet_b0-64 --random-plans 5")
    out = HERE / "results" / "latency_pricing.md"
    text = report(rows, command)
    old = out.read_text() if out.exists() else ""
    if NOTES[0] in old and NOTES[1] in old:  # keep the human-written reading
        notes = old[old.index(NOTES[0]):old.index(NOTES[1]) + len(NOTES[1])]
        title, body = text.split("\n\n", 1)
        text = f"{title}\n\n{notes}\n\n{body}"
    out.write_text(text)
    print(f"wrote {HERE / 'results' / 'latency_pricing.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
