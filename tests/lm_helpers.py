"""Tiny Lightning modules and real digit data for the callback tests (fast on 2 CPU cores)."""

from __future__ import annotations

import tempfile

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_layermerge import ImportanceSettings, LatencySettings

#: A UNet2DModel config small enough for fast tests: attention down and up, a channel change
#: (8 -> 16: shortcut conv), GroupNorm with 4 groups.
TINY_UNET = {
    "sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": (8, 16), "norm_num_groups": 4,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"), "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}

#: Importance settings that keep a table build to a few seconds.
FAST_IMPORTANCE = ImportanceSettings(method="finetune", fraction=0.05, steps=2, batch_size=16, lr=0.01)
#: Latency settings that keep a table build to a few seconds (1 thread: stable numbers).
FAST_LATENCY = LatencySettings(batch_size=16, threads=1, warmup=2, repeats=5)


def digits(n: int | None = None) -> TensorDataset:
    """``load_digits`` as normalised 1x8x8 tensors (the first ``n`` images)."""
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(data.target, dtype=torch.long)
    if n is not None:
        x, y = x[:n], y[:n]
    return TensorDataset(x, y)


def loaders(batch_size: int = 32, n: int = 600) -> tuple[DataLoader, DataLoader]:
    """Train and validation loaders over disjoint parts of the first ``n`` digits."""
    ds = digits(n)
    cut = int(0.8 * n)
    train = TensorDataset(*ds[:cut])
    val = TensorDataset(*ds[cut:])
    return (DataLoader(train, batch_size=batch_size, shuffle=True, drop_last=True),
            DataLoader(val, batch_size=64))


class Block(nn.Module):
    """A residual block with an identity shortcut."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(y)) + x)


class TinyNet(nn.Module):
    """stem conv (irreducible) -> residual block -> conv -> pool -> linear. L = 4."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.block = Block(width)
        self.head = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.head(self.block(self.stem(x)))), 1))


class LitTiny(L.LightningModule):
    """Classifier with a training step only (no validation_step)."""

    def __init__(self, width: int = 8, lr: float = 0.05, example: bool = False, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.model = TinyNet(width)
        self.lr = lr
        if example:
            self.example_input_array = torch.randn(4, 1, 8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)


class LitTinyVal(LitTiny):
    """Classifier that also logs ``val_loss`` and ``val_acc``."""

    def validation_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("val_loss", F.cross_entropy(logits, y))
        self.log("val_acc", (logits.argmax(1) == y).float().mean())


def quiet_trainer(**kwargs) -> L.Trainer:
    """A CPU trainer without progress bars, summaries or checkpoints, writing into a temporary
    directory (overridable)."""
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                    enable_progress_bar=False, enable_model_summary=False, max_steps=3,
                    default_root_dir=tempfile.mkdtemp(prefix="layermerge-test-"))
    defaults.update(kwargs)
    return L.Trainer(**defaults)


def pretrained(module: L.LightningModule, steps: int = 30) -> L.LightningModule:
    """Train ``module`` briefly so importance scores mean something."""
    train, _ = loaders()
    quiet_trainer(max_steps=steps).fit(module, train_dataloaders=train)
    return module


def one_thread():
    """Run with one torch thread: on a shared 2-core machine two threads can be 10x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class LitEval(LitTinyVal):
    """Also has ``test_step`` and ``predict_step``, and rebuilds a compressed checkpoint's
    architecture in ``on_load_checkpoint`` (so ``load_from_checkpoint`` works)."""

    def test_step(self, batch: tuple, batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        self.log("test_loss", F.cross_entropy(logits, y))
        self.log("test_acc", (logits.argmax(1) == y).float().mean())

    def predict_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return self(batch[0])

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        from lightning_layermerge import rebuild_pruned

        rebuild_pruned(self, checkpoint)


class LitOneCycle(LitTiny):
    """The Lightning CIFAR-10 tutorial's optimizer: OneCycleLR over ``trainer.max_epochs`` epochs."""

    steps_per_epoch = 15

    def configure_optimizers(self) -> dict:
        optimizer = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, weight_decay=5e-4)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, 0.1, epochs=self.trainer.max_epochs,
                                                        steps_per_epoch=self.steps_per_epoch)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class LitNeedsDatamodule(LitTiny):
    """``configure_optimizers`` reads the trainer's datamodule, which sub-runs do not have."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        _ = self.trainer.datamodule.batch_size
        return super().configure_optimizers()


class LitManual(LitTinyVal):
    """Manual optimization (scored by its validation loss)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.automatic_optimization = False

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()
        return loss


def tiny_diffusion_fit(diffusion, tmp_path, lr: float) -> tuple:
    """A tiny DDPM fit on random 8x8 images: train and val loaders, the recipe's ``DiffusionModule``
    (``diffusion`` is the loaded ``recipes/ddpm/diffusion.py``) and a ``LayerMergeCallback`` at
    budget 0.95 with relative importance and distillation."""
    from lightning_layermerge import Distillation, LayerMergeCallback

    L.seed_everything(0)
    images = torch.rand(96, 1, 8, 8) * 2 - 1
    train = DataLoader(TensorDataset(images[:64]), batch_size=16, shuffle=True)
    val = DataLoader(TensorDataset(images[64:]), batch_size=16)
    module = diffusion.DiffusionModule(TINY_UNET, num_train_timesteps=50, lr=lr, example_batch=4)
    importance = ImportanceSettings(method="finetune", fraction=0.25, steps=2, batch_size=8, relative=True)
    cb = LayerMergeCallback(budget=0.95, target="unet", importance=importance, latency=FAST_LATENCY,
                            distill=Distillation(alpha=1.0), cache_dir=str(tmp_path / "cache"), verbose=False)
    return train, val, module, cb
