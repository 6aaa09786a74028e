"""The networks of the latency-fidelity checks (``latency_diagnose.py``, ``latency_check.py --matrix``).

Each entry builds a network with random weights and randomised BatchNorm statistics and its
example input, in the setting the issue names (input size and batch):

* ``digits-resnet`` / ``digits-mbv2``: the digits networks of ``compare.py`` (16 px, batch 64);
* ``resnet18-s16`` / ``resnet18-s32``: torchvision resnet18 with a 3x3 stride-1 stem, 1 input
  channel (digits-like), at 16 and 32 px, batch 32;
* ``mobilenet_v2-224`` / ``resnet18-224``: torchvision, 224 px, batch 1;
* ``efficientnet_b0-64``: timm efficientnet_b0, 64 px, batch 8;
* ``ddpm-cifar10``: the DDPM CIFAR-10 UNet configuration (diffusers), 32 px, batch 8.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torchvision
from torch import nn

from nets import build_net

from lightning_layermerge.surgery.testing import randomize_batchnorm

# The DDPM UNet comes from the sibling recipe folder recipes/ddpm (``diffusion``).
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ddpm"))

__all__ = ["MODELS", "build"]


def _resnet18_small_stem() -> nn.Module:
    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
    return model


def _efficientnet_b0() -> nn.Module:
    import timm

    return timm.create_model("efficientnet_b0", pretrained=False, num_classes=10)


def _ddpm() -> nn.Module:
    from diffusion import DDPM_CIFAR10_UNET, build_unet

    return build_unet(DDPM_CIFAR10_UNET)


def _images(batch: int, channels: int, size: int) -> Callable[[], tuple]:
    return lambda: (torch.randn(batch, channels, size, size),)


#: name -> (network builder, example-input builder)
MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], tuple]]] = {
    "digits-resnet": (lambda: build_net("resnet", 1), _images(64, 1, 16)),
    "digits-mbv2": (lambda: build_net("mobilenetv2", 1), _images(64, 1, 16)),
    "resnet18-s16": (_resnet18_small_stem, _images(32, 1, 16)),
    "resnet18-s32": (_resnet18_small_stem, _images(32, 1, 32)),
    "mobilenet_v2-224": (lambda: torchvision.models.mobilenet_v2(), _images(1, 3, 224)),
    "resnet18-224": (lambda: torchvision.models.resnet18(), _images(1, 3, 224)),
    "efficientnet_b0-64": (_efficientnet_b0, _images(8, 3, 64)),
    "ddpm-cifar10": (_ddpm, lambda: (torch.randn(8, 3, 32, 32), torch.randint(0, 1000, (8,)))),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, tuple]:
    """The network ``name`` (eval mode, random weights and BatchNorm statistics) and its example input."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)}")
    torch.manual_seed(seed)
    make_model, make_input = MODELS[name]
    model = randomize_batchnorm(make_model(), seed).eval()
    return model, make_input()
