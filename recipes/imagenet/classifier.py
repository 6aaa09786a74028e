"""Image classification for the paper's ImageNet settings: a LightningModule and an ImageFolder DataModule.

* :class:`ImageClassifier`: a torchvision or timm classifier chosen by name (random
  initialisation, never a hub download), optionally loaded from a local checkpoint
  (``weights=path``), trained with SGD + linear warm-up + cosine decay (per step), optional
  label smoothing, no weight decay on BatchNorm and bias parameters if asked. Logs
  ``train_loss``, ``val_loss``, ``val_acc1`` and ``val_acc5`` (top-1 / top-5 accuracy **in
  percent**). The network is ``self.model``: the default target of ``LayerMergeCallback``.
* :class:`ImageFolderDataModule`: ``<data_dir>/train`` and ``<data_dir>/val`` in
  ``torchvision.datasets.ImageFolder`` layout (one folder per class), the standard ImageNet
  transforms (RandomResizedCrop + flip for training; resize + centre crop for validation).

Why accuracy in percent: the importance of a table entry is ``exp(Perf(entry) - Perf(original))``
(Eq. 4 of the paper), so the scale of Perf matters. With accuracies as fractions every entry
would be ``exp(-0.0x) ~ 1`` and the DP would barely tell a harmless merge from a harmful one;
the official implementation takes differences of accuracies in percent points.

Used by ``main.py`` (LightningCLI) and the configs in ``configs/``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from pathlib import Path

import lightning.pytorch as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

__all__ = ["ImageClassifier", "ImageFolderDataModule", "build_model", "load_weights"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_model(arch: str, num_classes: int = 1000) -> nn.Module:
    """A classifier by name, randomly initialised (weights come from :func:`load_weights`).

    Args:
        arch: ``"torchvision:<name>"``, ``"timm:<name>"``, or a bare name, looked up in
            torchvision first (``resnet34``, ``mobilenet_v2``, ...), then in timm
            (``mobilenetv2_100``, ``resnet10t``, ...).
        num_classes: Size of the classifier head.

    Raises:
        ValueError: If neither library knows the name.
    """
    import torchvision

    source, _, name = arch.rpartition(":")
    tv_names = set(torchvision.models.list_models(module=torchvision.models))
    if source in ("", "torchvision") and name in tv_names:
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    if source in ("", "timm"):
        import timm

        if timm.is_model(name):
            # pretrained=False: no download at run time; pass weights= for trained weights.
            return timm.create_model(name, pretrained=False, num_classes=num_classes)
    raise ValueError(
        f"ImageClassifier(arch={arch!r}): unknown model. Use a torchvision classification model name "
        "(e.g. 'resnet34', 'mobilenet_v2'), or 'timm:<name>' for a timm model (e.g. 'timm:mobilenetv2_100')"
    )


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Load a local checkpoint into ``model`` (strict).

    Accepts a plain ``state_dict`` file (torchvision / timm release files such as
    ``resnet34-b627a593.pth``), a dict holding it under ``"state_dict"`` or ``"model"``
    (Lightning checkpoints, many training scripts), with an optional ``"model."`` or
    ``"module."`` prefix on every key (Lightning modules, DDP wrappers).

    Raises:
        FileNotFoundError: If ``path`` does not exist (nothing is downloaded).
        RuntimeError: If the keys or shapes do not match the architecture.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"ImageClassifier(weights={str(path)!r}): no such file. Pass the path of a local "
                                "checkpoint (state_dict .pth); weights are never downloaded")
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    for prefix in ("model.", "module."):
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def _no_decay(name: str, param: nn.Parameter) -> bool:
    """BatchNorm weights/biases and conv/linear biases: every parameter with at most one dimension."""
    return param.ndim <= 1


class ImageClassifier(L.LightningModule):
    """Cross-entropy image classifier (torchvision / timm network by name).

    Args:
        arch: Model name (see :func:`build_model`).
        num_classes: Classes of the dataset.
        weights: Local checkpoint to start from (see :func:`load_weights`); ``None``: random.
        lr: Peak learning rate (after warm-up) for the global batch the config uses.
        momentum: SGD momentum.
        nesterov: Nesterov momentum.
        weight_decay: SGD weight decay.
        bn_weight_decay: Whether BatchNorm and bias parameters get weight decay too.
        warmup_epochs: Linear warm-up from 0, in epochs (then cosine decay to 0 at the end).
        label_smoothing: Cross-entropy label smoothing of the training loss.
        image_size: Side of the input images; sets ``example_input_array`` (one image), which
            the callback uses to trace the network without touching the data.
    """

    def __init__(self, arch: str = "resnet34", num_classes: int = 1000, weights: str | None = None,
                 lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 1e-4,
                 bn_weight_decay: bool = False, warmup_epochs: float = 0.0, label_smoothing: float = 0.0,
                 image_size: int = 224) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = build_model(arch, num_classes)
        if weights is not None:
            load_weights(self.model, weights)
        self.example_input_array = torch.zeros(1, 3, image_size, image_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y, label_smoothing=self.hparams.label_smoothing)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
        # sync_dist: under DDP every rank validates a shard; log the global mean.
        self.log("val_loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log("val_acc1", 100.0 * (top5[:, 0] == y).float().mean(), prog_bar=True, sync_dist=True)
        self.log("val_acc5", 100.0 * (top5 == y[:, None]).any(1).float().mean(), sync_dist=True)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self.validation_step(batch, batch_idx)

    def _param_groups(self) -> list[dict]:
        params: Iterable[tuple[str, nn.Parameter]] = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if self.hparams.bn_weight_decay:
            return [{"params": [p for _, p in params]}]
        decay = [p for n, p in params if not _no_decay(n, p)]
        no_decay = [p for n, p in params if _no_decay(n, p)]
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        opt = torch.optim.SGD(self._param_groups(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov,
                              weight_decay=hp.weight_decay)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        epochs = self.trainer.max_epochs
        # Short step-bounded runs (max_epochs=-1, e.g. importance sub-runs) get no warm-up.
        warmup = int(total * hp.warmup_epochs / epochs) if epochs and epochs > 0 else 0

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            progress = (step - warmup) / max(total - warmup, 1)
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class ImageFolderDataModule(L.LightningDataModule):
    """ImageNet-style folders: ``<data_dir>/<train_dir>/<class>/*.JPEG`` and the same for ``val_dir``.

    Args:
        data_dir: Root of the dataset.
        image_size: Training crop and validation centre-crop size.
        val_resize: Validation images are resized (shorter side) to this before the centre
            crop; ``None``: ``round(image_size / 0.875)`` (256 for 224).
        batch_size: Batch size **per device** (the global batch is ``batch_size x devices``).
        num_workers: DataLoader workers per device.
        train_dir / val_dir: Sub-folder names.
    """

    def __init__(self, data_dir: str, image_size: int = 224, val_resize: int | None = None, batch_size: int = 64,
                 num_workers: int = 8, train_dir: str = "train", val_dir: str = "val") -> None:
        super().__init__()
        self.data_dir = Path(data_dir).expanduser()
        self.image_size = image_size
        self.val_resize = val_resize or round(image_size / 0.875)
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.train_dir, self.val_dir = train_dir, val_dir
        self.train_set = self.val_set = None

    def _folder(self, name: str, train: bool):  # -> torchvision.datasets.ImageFolder
        from torchvision import datasets, transforms

        root = self.data_dir / name
        if not root.is_dir():
            raise FileNotFoundError(f"ImageFolderDataModule: {root} is not a directory; data_dir must hold "
                                    f"'{self.train_dir}/' and '{self.val_dir}/' with one sub-folder per class")
        norm = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        if train:
            tf = transforms.Compose([transforms.RandomResizedCrop(self.image_size), transforms.RandomHorizontalFlip(),
                                     transforms.ToTensor(), norm])
        else:
            tf = transforms.Compose([transforms.Resize(self.val_resize), transforms.CenterCrop(self.image_size),
                                     transforms.ToTensor(), norm])
        return datasets.ImageFolder(str(root), tf)

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            self.train_set = self._folder(self.train_dir, train=True)
            self.val_set = self._folder(self.val_dir, train=False)

    def _loader(self, dataset, shuffle: bool) -> DataLoader:
        # Lightning adds a DistributedSampler under DDP; the callback's importance sub-runs
        # draw their own subsets from ``train_set`` (a map-style dataset, as they need).
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, drop_last=shuffle,
                          num_workers=self.num_workers, pin_memory=torch.cuda.is_available(),
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)
