"""The ImageNet recipes (recipes/imagenet): configs parse, and one runs end to end through LightningCLI.

The end-to-end test takes the ResNet-34 LayerMerge-71 % config as shipped and shrinks only
what a CPU test must: a tiny ImageFolder written to ``tmp_path`` (2 classes, 32x32 PNGs),
timm resnet10t instead of resnet34 (also exercises the timm path; 20 table entries instead of
resnet18's 84), CPU / 1 device instead of 8 GPUs with DDP, budget 1.0, two fine-tuning steps,
one-step importance entries and a short latency protocol. The callback, its method,
monitor, distillation and the module's optimizer / scheduler / label smoothing come from
the recipe file itself.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from helpers import load_recipe
from lm_helpers import one_thread
from PIL import Image
from torch import fx

from lightning_layermerge import Distillation, LayerMergeCallback

RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "imagenet"
main = load_recipe(RECIPE / "main.py").main
from classifier import build_model, load_weights  # noqa: E402  (load_recipe put its folder on sys.path)

one_thread = pytest.fixture(autouse=True)(one_thread)

CONFIGS = {
    "resnet34_lm071.yaml": ("resnet34", 0.71, 90),
    "resnet34_lm050.yaml": ("resnet34", 0.50, 90),
    "mobilenetv2_lm055.yaml": ("timm:mobilenetv2_100", 0.55, 180),
    "mobilenetv2_lm033.yaml": ("timm:mobilenetv2_100", 0.33, 180),
}

#: What a GPU/DDP recipe must change to be built on a CPU-only machine.
CPU = ["--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.strategy=auto",
       "--trainer.precision=32-true"]


def the_callback(cli) -> LayerMergeCallback:
    found = [cb for cb in cli.trainer.callbacks if isinstance(cb, LayerMergeCallback)]
    assert len(found) == 1
    return found[0]


def write_image_folder(root: Path, classes: int = 2, train: int = 16, val: int = 4, size: int = 32) -> Path:
    """``root/{train,val}/class<c>/<i>.png``: noisy images whose mean colour depends on the class."""
    rng = np.random.default_rng(0)
    for split, count in (("train", train), ("val", val)):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(count):
                base = np.array([200, 60, 60] if c == 0 else [60, 60, 200], dtype=np.float64)
                img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(img).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_recipe_configs_parse(name: str) -> None:
    """Every paper setting builds: right network, budget, epochs, KD, DDP, cache dir."""
    arch, budget, epochs = CONFIGS[name]
    raw = yaml.safe_load((RECIPE / "configs" / name).read_text())
    assert raw["trainer"]["strategy"] == "ddp" and raw["trainer"]["devices"] > 1
    cli = main(["--config", str(RECIPE / "configs" / name), *CPU], run=False)
    cb = the_callback(cli)
    assert (cb.budget, cb.method, cb.monitor, cb.mode) == (budget, "layermerge", "val_acc1", "max")
    assert cb.distill == Distillation(alpha=0.3, temperature=4.0)
    assert cb.cache_dir and cb.latency_settings.batch_size == 128 and cb.importance_settings.fraction == 0.04
    assert cli.model.hparams.arch == arch and cli.trainer.max_epochs == epochs


def test_load_weights_accepts_lightning_and_plain_state_dicts(tmp_path: Path) -> None:
    source = build_model("resnet18", 3)
    plain, wrapped = tmp_path / "plain.pth", tmp_path / "wrapped.ckpt"
    torch.save(source.state_dict(), plain)
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()}}, wrapped)
    for path in (plain, wrapped):
        target = build_model("resnet18", 3)
        load_weights(target, path)
        assert all(torch.equal(a, b) for a, b in zip(source.state_dict().values(), target.state_dict().values()))
    with pytest.raises(FileNotFoundError, match="never downloaded"):
        load_weights(build_model("resnet18", 3), tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown model"):
        build_model("no_such_net")


def test_resnet_recipe_fits_and_compresses(tmp_path: Path) -> None:
    """resnet34_lm071.yaml through LightningCLI fit (shrunk to CPU scale): merged model + report."""
    data = write_image_folder(tmp_path / "data")
    weights = tmp_path / "resnet10t.pth"
    torch.save(build_model("timm:resnet10t", 2).state_dict(), weights)  # the local-checkpoint path, as in real use
    config = yaml.safe_load((RECIPE / "configs" / "resnet34_lm071.yaml").read_text())
    trainer = config["trainer"]
    lm = next(c for c in trainer["callbacks"] if c["class_path"].endswith("LayerMergeCallback"))
    # budget 1.0: at 32 px and batch 4 on a shared CPU the per-op overhead dominates and the
    # timings swing by 2x between builds, so any budget below 1 can be unreachable by chance
    # (the budget check then rightly refuses). This test is about the recipe, not timing.
    lm["init_args"].update(
        budget=1.0, verbose=False, cache_dir=str(tmp_path / "cache"),
        importance={**lm["init_args"]["importance"], "fraction": 0.25, "steps": 1, "batch_size": 4},
        latency={"device": "cpu", "batch_size": 4, "threads": 1, "warmup": 2, "repeats": 5, "reference": True},
    )
    trainer.update(accelerator="cpu", devices=1, strategy="auto", precision="32-true", max_epochs=1, max_steps=2,
                   limit_val_batches=1, num_sanity_val_steps=0, enable_checkpointing=False, logger=False,
                   enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path / "run"),
                   callbacks=[lm])  # ModelCheckpoint left out: checkpointing is off in this test
    config["model"].update(arch="timm:resnet10t", num_classes=2, image_size=32, weights=str(weights))
    config["data"].update(data_dir=str(data), image_size=32, batch_size=4, num_workers=0)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))

    cli = main(["fit", "--config", str(path)])

    cb = the_callback(cli)
    assert cb.method == "layermerge" and cb.distill == Distillation(alpha=0.3, temperature=4.0)
    model = cli.model.model
    assert isinstance(model, fx.GraphModule) and model.meta["layermerge"]["merged"]
    report = cb.report
    assert report is not None and report.merged and report.monitor == "val_acc1"
    assert cb.latency_table is not None and len(cb.importance_table) == len(cb.chain.segments)
    assert report.measured_ms is not None and report.measured_original_ms is not None
    assert (tmp_path / "run" / "layermerge_report.png").exists()
    out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 2) and torch.isfinite(out).all()
