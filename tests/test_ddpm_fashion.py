"""recipes/ddpm/fashion.py's EMA callback: the average is what LayerMergeCallback merges."""

from __future__ import annotations

import copy
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from helpers import load_recipe
from lightning.pytorch.callbacks import Callback
from lm_helpers import one_thread, quiet_trainer, tiny_diffusion_fit


RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "ddpm"
diffusion = load_recipe(RECIPE / "diffusion.py")
fashion = load_recipe(RECIPE / "fashion.py")

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


class Record(Callback):
    """The target's weights at the start and after every step, and the network left at the end of training."""

    def __init__(self) -> None:
        self.states: list[dict] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.states = [copy.deepcopy(pl_module.unet.state_dict())]

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        self.states.append(copy.deepcopy(pl_module.unet.state_dict()))

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.final = copy.deepcopy(pl_module.unet)


def test_ema_of_the_pruned_unet_is_merged(tmp_path: Path) -> None:
    train, val, module, cb = tiny_diffusion_fit(diffusion, tmp_path, lr=1e-2)
    record = Record()
    # Hooks run in list order: the recorder's on_train_end sees what the EMA left.
    trainer = quiet_trainer(max_steps=4, callbacks=[cb, fashion.EMA(decay=0.5), record], limit_val_batches=1)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)

    expected = {k: v.clone() for k, v in record.states[0].items()}
    for n, state in enumerate(record.states[1:], start=1):
        decay = min(0.5, (1 + n) / (10 + n))
        for k, v in state.items():
            expected[k] = expected[k].lerp(v, 1 - decay) if v.dtype.is_floating_point else v
    final = record.final.state_dict()
    last = record.states[-1]
    assert any(not torch.equal(final[k], last[k]) for k in final)  # the average, not the last step
    for k, v in expected.items():
        torch.testing.assert_close(final[k], v, rtol=1e-5, atol=1e-6)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 7, 23, 49])
    with torch.no_grad():
        want, got = record.final.eval()(x, t).sample, module.unet(x, t).sample
    assert cb.report.merged
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
