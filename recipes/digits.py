"""Real data that ships with scikit-learn: ``load_digits`` (1797 8x8 digits) as a Lightning
DataModule, and a small ResNet-style classifier for it. Used by ``quickstart.py`` and the
LightningCLI example in ``cli/``.
"""

from __future__ import annotations

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


class SplitDataModule(L.LightningDataModule):
    """Loaders over ``train_set`` / ``val_set`` / ``test_set`` that a subclass's ``setup`` fills."""

    batch_size: int
    train_set: Dataset | None = None
    val_set: Dataset | None = None
    test_set: Dataset | None = None

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=256)


class DigitsDataModule(SplitDataModule):
    """``sklearn.datasets.load_digits`` split into train / val / test with a fixed seed.

    Args:
        image_size: The 8x8 images are upsampled (bilinear) to this size; 16 gives the
            convolutions enough spatial extent to make merging worthwhile.
        batch_size: Batch size of all loaders.
        val_fraction / test_fraction: Shares of the 1797 images held out.
        seed: Seed of the split.
    """

    def __init__(self, image_size: int = 16, batch_size: int = 64, val_fraction: float = 0.15,
                 test_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__()
        self.image_size = image_size
        self.batch_size = batch_size
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.seed = seed
        self.train_set = self.val_set = self.test_set = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        digits = load_digits()
        x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
        if self.image_size != 8:
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = (x - x.mean()) / x.std()
        y = torch.tensor(digits.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        n_test, n_val = round(self.test_fraction * len(y)), round(self.val_fraction * len(y))
        test, val, train = perm[:n_test], perm[n_test:n_test + n_val], perm[n_test + n_val:]
        self.train_set = TensorDataset(x[train], y[train])
        self.val_set = TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(x[test], y[test])



class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN + shortcut (identity, or 1x1 conv-BN when the shape changes), ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU()
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return self.relu(y + self.shortcut(x))


class DigitsResNet(nn.Module):
    """A small ResNet: stem conv, stages of BasicBlocks (width, then 2x width at stride 2, ...).

    ``in_channels=3`` runs the same network on colour images (``benchmarks/compare.py`` on CIFAR-10).
    """

    def __init__(self, width: int = 32, blocks: tuple[int, ...] = (2, 2), num_classes: int = 10,
                 in_channels: int = 1) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU())
        layers: list[nn.Module] = []
        cin = width
        for stage, count in enumerate(blocks):
            cout = width * 2**stage
            for b in range(count):
                layers.append(BasicBlock(cin, cout, stride=2 if stage > 0 and b == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


class Classifier(L.LightningModule):
    """Cross-entropy classifier around ``model``; SGD (Nesterov) + one-cycle cosine schedule.

    Logs ``val_loss`` (the Perf metric of the importance table), ``val_acc`` and ``test_acc``.

    Args:
        model: The network (``self.model``, the callback's default target).
        lr: Peak learning rate.
        weight_decay: SGD weight decay.
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, weight_decay: float = 5e-4) -> None:
        super().__init__()
        self.model = model
        self.lr = lr
        self.weight_decay = weight_decay

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}_loss", F.cross_entropy(logits, y), prog_bar=True)
        self.log(f"{prefix}_acc", (logits.argmax(1) == y).float().mean(), prog_bar=True)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> dict:
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9, nesterov=True,
                              weight_decay=self.weight_decay)
        steps = max(int(self.trainer.estimated_stepping_batches), 1)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=self.lr, total_steps=steps, pct_start=0.15)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class DigitsClassifier(Classifier):
    """:class:`Classifier` around a :class:`DigitsResNet` (the quickstart and CLI network).

    Args:
        width: Channels of the first stage.
        blocks: BasicBlocks per stage.
        lr: Peak learning rate (cosine-decayed over the run).
        weight_decay: SGD weight decay.
        weights: Optional state_dict file to load (the trained network to compress).
    """

    def __init__(self, width: int = 32, blocks: tuple[int, int] = (2, 2), lr: float = 0.1,
                 weight_decay: float = 5e-4, weights: str | None = None) -> None:
        super().__init__(DigitsResNet(width, tuple(blocks)), lr, weight_decay)
        self.save_hyperparameters()
        if weights is not None:  # start from trained weights (a state_dict file, e.g. from quickstart.py)
            self.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
