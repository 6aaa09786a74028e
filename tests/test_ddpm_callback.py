"""LayerMergeCallback inside a diffusion training loop: a tiny diffusers UNet, end to end."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import load_recipe
from lightning.pytorch.callbacks import Callback
from lm_helpers import one_thread, quiet_trainer, tiny_diffusion_fit


diffusion = load_recipe(Path(__file__).resolve().parents[1] / "recipes" / "ddpm" / "diffusion.py")
DiffusionModule, sample = diffusion.DiffusionModule, diffusion.sample

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)



class KeepPruned(Callback):
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pruned = copy.deepcopy(pl_module.unet)


def test_callback_compresses_a_unet_in_a_diffusion_loop(tmp_path: Path) -> None:
    train, val, module, cb = tiny_diffusion_fit(diffusion, tmp_path, lr=1e-3)
    original = copy.deepcopy(module.unet).eval()
    keep = KeepPruned()
    trainer = quiet_trainer(max_steps=3, callbacks=[cb, keep], limit_val_batches=1)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)

    report = cb.report
    assert report.monitor == "val_loss" and report.merged
    assert trainer.callback_metrics["layermerge/kd_loss"] > 0  # MSE to the teacher's predicted noise
    assert set(cb.importance_table) == {s.key for s in cb.chain.segments}
    merged = module.unet
    # Same call signature and output type as the UNet; equal to the fine-tuned pruned network.
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 7, 23, 49])
    with torch.no_grad():
        want, got = keep.pruned.eval()(x, t).sample, merged(x, t).sample
        ref = original(x, t)
    assert type(merged(x, t)) is type(ref)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    # One conv per segment (plus a 1x1 conv on the (N, C, 1, 1) time embedding where a block's temb add was merged).
    def spatial_convs(net):
        return sum(isinstance(m, torch.nn.Conv2d) and "_bias" not in n for n, m in net.named_modules())

    folded = sum(len(cb.chain.segment(*k).convs) - 1 for k in cb.plan.keys if cb.chain.segment(*k).convs)
    assert spatial_convs(merged) == spatial_convs(keep.pruned) - folded
    # A DDPMPipeline-style sampling loop runs on the merged UNet.
    out = sample(merged, 50, (2, 1, 8, 8), steps=5)
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()


def test_default_importance_falls_back_to_the_fine_tune_on_a_unet(tmp_path: Path) -> None:
    """A UNet has no classifier head: the default head probe warns, then each entry is fine-tuned."""
    import dataclasses

    from lightning_layermerge import ImportanceSettings

    train, val, module, cb = tiny_diffusion_fit(diffusion, tmp_path, lr=1e-3)
    cb.importance_settings = dataclasses.replace(ImportanceSettings(), fraction=0.25, batch_size=8, min_steps=2)
    with pytest.warns(UserWarning, match=r"method='probe'\) does not apply to DiffusionModule: the network's "
                                         r"output does not come straight from an nn.Linear.*fine-tuned instead "
                                         r"\(\d+ steps\)"):
        quiet_trainer(max_steps=1, callbacks=[cb], limit_val_batches=1).fit(module, train_dataloaders=train,
                                                                           val_dataloaders=val)
    assert cb.report.merged and cb.state_dict()["importance"]["method"] == "finetune"
