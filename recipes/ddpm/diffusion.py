"""A DDPM LightningModule around a diffusers ``UNet2DModel`` and ``DDPMScheduler``, and data.

Nothing here knows about LayerMerge: it is an ordinary diffusion training module that
``LayerMergeCallback`` compresses from the outside (``target="unet"``). Three choices make it
a good citizen for the callback:

* ``example_input_array`` is the UNet's positional arguments ``(sample, timestep)``, so the
  callback traces and times the UNet with real shapes.
* ``validation_step`` logs ``val_loss``, the denoising MSE with noise and timesteps drawn
  from torch's global generator. The callback scores every importance entry under the same
  seed on the same held-out batches, so every entry sees the *same* noise and timesteps
  (Perf = negative denoising loss, as in the paper).
* The loss reads ``self.unet(noisy, t).sample``: a merged UNet keeps the UNet's signature and
  output type, so the module and the sampling loop are unchanged after compression.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset


def build_unet(unet: dict[str, Any] | str) -> UNet2DModel:
    """A ``UNet2DModel`` from a config dict (random weights) or a local ``from_pretrained`` directory."""
    if isinstance(unet, (str, Path)):
        path = Path(unet)
        if not path.is_dir():
            raise FileNotFoundError(
                f"UNet directory {str(path)!r} does not exist; pass a local directory written by "
                "UNet2DModel.save_pretrained (or a config dict for random weights)"
            )
        return UNet2DModel.from_pretrained(path)
    return UNet2DModel(**unet)


class DiffusionModule(L.LightningModule):
    """Epsilon-prediction DDPM training (Ho et al. 2020) with a diffusers UNet.

    Args:
        unet: ``UNet2DModel`` keyword arguments (random weights) or a local directory for
            ``UNet2DModel.from_pretrained`` (e.g. a converted ``google/ddpm-cifar10-32``).
        num_train_timesteps: Diffusion steps of the ``DDPMScheduler`` (1000 as in DDPM).
        lr: Adam learning rate (the paper fine-tunes the compressed DDPM at 4e-4).
        warmup_steps: Linear learning-rate warm-up (DDPM uses 5000 steps on CIFAR-10).
        example_batch: Batch size of ``example_input_array``.
    """

    def __init__(self, unet: dict[str, Any] | str, num_train_timesteps: int = 1000, lr: float = 2e-4,
                 warmup_steps: int = 0, example_batch: int = 8) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.unet = build_unet(unet)
        self.scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
        self.lr, self.warmup_steps = lr, warmup_steps
        cfg = self.unet.config
        size = cfg.sample_size if isinstance(cfg.sample_size, int) else cfg.sample_size[0]
        self.example_input_array = (torch.randn(example_batch, cfg.in_channels, size, size),
                                    torch.linspace(0, num_train_timesteps - 1, example_batch).long())

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> Any:
        return self.unet(sample, timestep)

    def denoising_loss(self, images: torch.Tensor) -> torch.Tensor:
        """MSE between the true and the predicted noise at uniformly drawn timesteps."""
        noise = torch.randn_like(images)
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device)
        noisy = self.scheduler.add_noise(images, noise, t)
        return F.mse_loss(self.unet(noisy, t).sample, noise)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.denoising_loss(_images(batch))
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val_loss", self.denoising_loss(_images(batch)), prog_bar=True)

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.unet.parameters(), lr=self.lr)
        if not self.warmup_steps:
            return opt
        warm = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / self.warmup_steps))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": warm, "interval": "step"}}


def _images(batch: Any) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def sample(unet: nn.Module, num_train_timesteps: int, shape: tuple[int, ...], *, steps: int | None = None,
           seed: int = 0) -> torch.Tensor:
    """Ancestral DDPM sampling (as ``DDPMPipeline``) with any module called ``unet(x, t).sample``.

    Works with the original ``UNet2DModel`` and with the merged network the callback returns
    (a ``LayerMergeUNet2DModel``, which diffusers' ``DDPMPipeline`` also accepts). ``steps`` < ``num_train_timesteps``
    uses the scheduler's strided schedule. Returns images in [-1, 1] (clamped).
    """
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps)
    scheduler.set_timesteps(steps or num_train_timesteps)
    device = next(unet.parameters()).device
    generator = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(shape, generator=generator).to(device)
    was_training = unet.training
    unet.eval()
    for t in scheduler.timesteps:
        eps = unet(x, t.expand(shape[0]).to(device)).sample
        x = scheduler.step(eps, t, x, generator=generator).prev_sample
    unet.train(was_training)
    return x.clamp(-1, 1)


class DigitsImages(L.LightningDataModule):
    """``sklearn.datasets.load_digits`` as images in [-1, 1], upsampled to ``image_size`` (real, offline data).

    Args:
        image_size: Side length after bilinear upsampling of the 8x8 digits.
        batch_size: Batch size of both loaders.
        val_fraction: Share of the 1797 images held out for ``val_loss``.
    """

    def __init__(self, image_size: int = 16, batch_size: int = 64, val_fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.image_size, self.batch_size, self.val_fraction, self.seed = image_size, batch_size, val_fraction, seed
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
        x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = x.clamp(0, 1) * 2 - 1
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(self.seed))
        n_val = round(self.val_fraction * len(x))
        self.val_set, self.train_set = TensorDataset(x[perm[:n_val]]), TensorDataset(x[perm[n_val:]])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class ImageFolderImages(L.LightningDataModule):
    """Images from a local folder (e.g. CIFAR-10 exported as PNGs) in [-1, 1], for the paper's setting.

    Args:
        root: Directory read by ``torchvision.datasets.ImageFolder`` (class subfolders; labels unused).
        image_size: Images are resized to this size (32 for CIFAR-10).
        batch_size: Batch size (128 in DDPM's CIFAR-10 training).
        val_images: Images held out for ``val_loss`` (also the importance scoring pool).
        num_workers: DataLoader workers.
    """

    def __init__(self, root: str, image_size: int = 32, batch_size: int = 128, val_images: int = 1000,
                 num_workers: int = 4) -> None:
        super().__init__()
        self.root, self.image_size, self.batch_size = root, image_size, batch_size
        self.val_images, self.num_workers = val_images, num_workers
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None

    def setup(self, stage: str | None = None) -> None:
        from torchvision import datasets, transforms

        if not Path(self.root).is_dir():
            raise FileNotFoundError(f"data root {self.root!r} is not a directory of class folders of images")
        tf = transforms.Compose([transforms.Resize(self.image_size), transforms.CenterCrop(self.image_size),
                                 transforms.RandomHorizontalFlip(), transforms.ToTensor(),
                                 transforms.Normalize([0.5] * 3, [0.5] * 3)])
        full = datasets.ImageFolder(self.root, transform=tf)
        perm = torch.randperm(len(full), generator=torch.Generator().manual_seed(0)).tolist()
        self.val_set = torch.utils.data.Subset(full, perm[:self.val_images])
        self.train_set = torch.utils.data.Subset(full, perm[self.val_images:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, drop_last=True,
                          num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size, num_workers=self.num_workers)


#: ``google/ddpm-cifar10-32`` architecture (35.7 M parameters), for random-weight experiments.
DDPM_CIFAR10_UNET: dict[str, Any] = {
    "sample_size": 32, "in_channels": 3, "out_channels": 3, "layers_per_block": 2,
    "block_out_channels": (128, 256, 256, 256),
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    "dropout": 0.1, "downsample_padding": 0, "flip_sin_to_cos": False, "freq_shift": 1, "norm_eps": 1e-6,
    "attention_head_dim": None,
}

#: The small UNet of the digits demo (16x16, one attention level, channel changes; 0.18 M
#: parameters: one training step of batch 32 is ~0.15 s on one CPU core).
DIGITS_UNET: dict[str, Any] = {
    "sample_size": 16, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
    "block_out_channels": (16, 32), "norm_num_groups": 4,
    "down_block_types": ("DownBlock2D", "AttnDownBlock2D"),
    "up_block_types": ("AttnUpBlock2D", "UpBlock2D"),
}
