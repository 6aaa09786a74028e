"""Small networks, data and a classifier module for ``compare.py`` (digits at 16 px, or CIFAR-10).

* ``build_net("resnet")``: the quickstart's ``digits.DigitsResNet`` (stem conv + BasicBlock
  stages, identity / 1x1-projection shortcuts), 1-channel for digits or 3-channel for CIFAR-10.
* :class:`SmallMobileNetV2`: a MobileNetV2 in miniature: stem conv, inverted-residual blocks
  (1x1 expansion + ReLU6, 3x3 depthwise + ReLU6, linear 1x1 projection, identity shortcut when
  the shape is kept), a final 1x1 conv + ReLU6, global pooling, linear classifier. Same block
  structure as torchvision's ``mobilenet_v2``, so the chain (depthwise convs, linear
  bottlenecks, skips ending on the projection) is the one the paper compresses.
* ``Classifier`` (from ``digits.py``): cross-entropy training with SGD + one-cycle cosine,
  logging ``val_loss`` / ``val_acc`` / ``test_acc``, for any network.
* :class:`Cifar10DataModule`: CIFAR-10 from a local copy in torchvision's format (never
  downloaded), same train / val / test interface as ``digits.DigitsDataModule``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import TensorDataset

# The digits models and data come from the recipes folder above this one.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from digits import Classifier, DigitsDataModule, DigitsResNet, SplitDataModule  # noqa: E402

__all__ = ["Cifar10DataModule", "Classifier", "DigitsDataModule", "SmallMobileNetV2", "build_net"]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                               nn.BatchNorm2d(cout)]
    if act:
        layers.append(nn.ReLU6())
    return nn.Sequential(*layers)


class InvertedResidual(nn.Module):
    """MobileNetV2 block: [1x1 expand + ReLU6] -> 3x3 depthwise + ReLU6 -> 1x1 linear projection (+ x)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        layers: list[nn.Module] = []
        if expand != 1:
            layers.append(_conv_bn(cin, hidden, 1))
        layers += [_conv_bn(hidden, hidden, 3, stride, groups=hidden), _conv_bn(hidden, cout, 1, act=False)]
        self.conv = nn.Sequential(*layers)
        self.use_res = stride == 1 and cin == cout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class SmallMobileNetV2(nn.Module):
    """A MobileNetV2 in miniature (torchvision's block structure, fewer and narrower blocks).

    Args:
        in_channels: Image channels.
        settings: ``(expand t, channels c, repeats n, first stride s)`` per stage, as in the
            MobileNetV2 paper's table.
        stem: Channels of the stem conv (stride 1: the images are small).
        last: Channels of the final 1x1 conv.
        num_classes: Classifier outputs.
    """

    def __init__(self, in_channels: int = 1,
                 settings: tuple[tuple[int, int, int, int], ...] = ((1, 8, 1, 1), (4, 16, 2, 2), (4, 24, 2, 2)),
                 stem: int = 16, last: int = 96, num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = [_conv_bn(in_channels, stem, 3)]
        cin = stem
        for t, c, n, s in settings:
            for b in range(n):
                layers.append(InvertedResidual(cin, c, s if b == 0 else 1, t))
                cin = c
        layers.append(_conv_bn(cin, last, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def build_net(name: str, in_channels: int) -> nn.Module:
    """``"resnet"`` or ``"mobilenetv2"``: the two networks of the comparison (fixed sizes)."""
    if name == "resnet":
        # The quickstart's network: 9 chain convs (stem + 4 BasicBlocks), 2 stages.
        return DigitsResNet(width=16, blocks=(2, 2), in_channels=in_channels)
    if name == "mobilenetv2":
        # 1 stem + 2 (t=1 block) + 4 x 3 (expanded blocks) + 1 final = 16 chain convs.
        return SmallMobileNetV2(in_channels)
    raise ValueError(f"unknown network {name!r}; use 'resnet' or 'mobilenetv2'")


class Cifar10DataModule(SplitDataModule):
    """CIFAR-10 from a local torchvision-format copy (``cifar-10-batches-py`` under ``root``).

    The 50,000 training images are split into train / val (``val_size``, fixed seed); the
    10,000 official test images are the test set. Images are held as normalised tensors
    (no augmentation: every method gets the same data, and the comparison is between
    methods, not about the best CIFAR accuracy).

    Args:
        root: Directory given to ``torchvision.datasets.CIFAR10(root, download=False)``.
        batch_size: Batch size of the training loader.
        val_size: Training images held out for validation.
        seed: Seed of the split.
    """

    MEAN = (0.4914, 0.4822, 0.4465)
    STD = (0.2470, 0.2435, 0.2616)

    def __init__(self, root: str, batch_size: int = 64, val_size: int = 5000, seed: int = 0) -> None:
        super().__init__()
        self.root, self.batch_size, self.val_size, self.seed = root, batch_size, val_size, seed
        self.train_set = self.val_set = self.test_set = None

    def _tensors(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        from torchvision.datasets import CIFAR10

        ds = CIFAR10(self.root, train=train, download=False)  # raises RuntimeError if the copy is missing
        x = torch.tensor(ds.data).permute(0, 3, 1, 2).float() / 255.0
        x = (x - torch.tensor(self.MEAN).view(1, 3, 1, 1)) / torch.tensor(self.STD).view(1, 3, 1, 1)
        return x, torch.tensor(ds.targets, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self._tensors(train=True)
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        val, train = perm[:self.val_size], perm[self.val_size:]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(*self._tensors(train=False))

