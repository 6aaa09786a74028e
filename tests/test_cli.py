"""LightningCLI: the callback, with nested settings, configured from YAML under trainer.callbacks."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from helpers import load_recipe
from lm_helpers import one_thread
from torch import fx

from lightning_layermerge import Distillation, ImportanceSettings, LatencySettings, LayerMergeCallback

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
main = load_recipe(RECIPES / "cli" / "main.py").main

one_thread = pytest.fixture(autouse=True)(one_thread)


def the_callback(cli) -> LayerMergeCallback:
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, LayerMergeCallback)]
    assert len(found) == 1
    return found[0]


def test_recipe_yaml_builds_the_callback() -> None:
    cli = main(["--config", str(RECIPES / "cli" / "compress.yaml"), "--model.weights=null"], run=False)
    cb = the_callback(cli)
    assert (cb.budget, cb.target, cb.method, cb.monitor, cb.mode) == (0.6, "model", "layermerge", "val_loss", "min")
    assert cb.importance_settings == ImportanceSettings(method="finetune",
                                                        fraction=0.15, steps=20, batch_size=32, lr=0.02)
    assert cb.latency_settings == LatencySettings(device="cpu", batch_size=64, threads=1, warmup=10, repeats=30,
                                                 reference=True)
    assert cb.distill == Distillation(alpha=1.0, temperature=4.0)
    assert cb.cache_dir == "runs/cli/cache"


def test_cli_override_is_validated() -> None:
    with pytest.raises(ValueError, match=r"LayerMergeCallback\(budget=1.5\) must be in \(0, 1\]"):
        main(["--config", str(RECIPES / "cli" / "compress.yaml"), "--model.weights=null",
              "--trainer.callbacks.init_args.budget=1.5"], run=False)


def test_cli_fit_compresses(tmp_path: Path) -> None:
    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "devices": 1, "max_steps": 2, "limit_val_batches": 1, "num_sanity_val_steps": 0,
            "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False,
            "default_root_dir": str(tmp_path), "logger": False,
            "callbacks": [{
                "class_path": "lightning_layermerge.callback.LayerMergeCallback",
                "init_args": {
                    "budget": 0.8, "method": "layermerge", "verbose": False, "cache_dir": False,
                    "importance": {"method": "finetune", "fraction": 0.05, "steps": 2, "batch_size": 16, "lr": 0.01},
                    "latency": {"batch_size": 16, "threads": 1, "warmup": 2, "repeats": 5},
                    "distill": {"alpha": 0.5, "temperature": 2.0},
                },
            }],
        },
        "model": {"width": 4, "blocks": [1, 1], "lr": 0.01},
        "data": {"image_size": 8, "batch_size": 32},
    }
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = main(["fit", "--config", str(path)])
    cb = the_callback(cli)
    assert cb.distill == Distillation(alpha=0.5, temperature=2.0)
    assert isinstance(cli.model.model, fx.GraphModule) and cli.model.model.meta["layermerge"]["merged"]
    assert cb.report is not None and cb.report.merged
    assert cb.report.monitor == "val_loss"  # the digits module logs a validation loss
    assert (tmp_path / "layermerge_report.png").exists()
