"""Run LayerMergeCallback under ``strategy="ddp"`` with 2 CPU (gloo) processes.

Used by ``test_callback.py::test_ddp_two_processes_get_the_same_plan`` as a subprocess (DDP
inside the pytest process would re-run pytest in the child). Every rank writes
``<out>/rank<r>.json`` with its plan, importance shard, gathered table and final weights.

    python tests/ddp_script.py OUT_DIR            # strategy="ddp": must work
    python tests/ddp_script.py OUT_DIR --spawn    # strategy="ddp_spawn": must be refused
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import lightning.pytorch as L
import torch
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from lm_helpers import FAST_IMPORTANCE, FAST_LATENCY, LitTiny, loaders

from lightning_layermerge import LayerMergeCallback


def main(out: Path) -> None:
    torch.set_num_threads(1)
    L.seed_everything(0)
    module = LitTiny(seed=0)
    train, _ = loaders()
    callback = LayerMergeCallback(budget=0.7, importance=FAST_IMPORTANCE, latency=FAST_LATENCY, cache_dir=False,
                                  verbose=False)
    trainer = L.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_steps=2, logger=False, callbacks=[callback],
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=str(out))
    trainer.fit(module, train_dataloaders=train)
    weights = hashlib.sha256()
    for name, value in module.model.state_dict().items():
        weights.update(name.encode())
        weights.update(value.detach().contiguous().numpy().tobytes())
    report = callback.report
    result = {
        "rank": trainer.global_rank,
        "plan": callback.plan.to_dict(),
        "shard": [list(k) for k in callback.importance_shard],
        "importance": [[list(k), v] for k, v in sorted(callback.importance_table.items())],
        "architecture": [[k, list(v.shape)] for k, v in module.model.state_dict().items()],
        "weights": weights.hexdigest(),
        "merged": bool(report.merged),
        "measured": report.measured_ms is not None,
        "rank_zero_only": rank_zero_only.rank,
    }
    (out / f"rank{trainer.global_rank}.json").write_text(json.dumps(result))


def spawn(out: Path) -> None:
    """strategy='ddp_spawn' must be refused before any training; the parent's model stays as it was."""
    module = LitTiny(seed=0)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    callback = LayerMergeCallback(budget=0.7, importance=FAST_IMPORTANCE, latency=FAST_LATENCY, cache_dir=False,
                                  verbose=False)
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, max_steps=2, logger=False,
                        callbacks=[callback], enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(out))
    try:
        trainer.fit(module, train_dataloaders=loaders()[0])
    except Exception as err:  # the worker's ValueError arrives wrapped by torch.multiprocessing
        after = module.state_dict()
        untouched = after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
        (out / "spawn.json").write_text(json.dumps({"error": str(err), "untouched": untouched,
                                                    "steps": trainer.global_step}))
        return
    raise SystemExit("ddp_spawn was not refused")


if __name__ == "__main__":
    if sys.argv[2:] == ["--spawn"]:
        spawn(Path(sys.argv[1]))
    else:
        main(Path(sys.argv[1]))
