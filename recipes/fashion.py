"""Fashion-MNIST (70,000 28x28 grey-scale product photos, 10 classes) as a Lightning DataModule.

Read from the four IDX ``.gz`` files that the Debian package ``dataset-fashion-mnist`` installs
(``apt-get install dataset-fashion-mnist``; ``dpkg -L dataset-fashion-mnist`` shows where:
``/usr/share/datasets/fashion-mnist``), or from any directory holding the same four files
(the layout of the original release: ``train-images-idx3-ubyte.gz`` ...; uncompressed copies
without ``.gz`` are read too). Nothing is downloaded.

The 60,000 training images are split into train / val (``val_size`` images, fixed seed); the
10,000 ``t10k`` images are the test set. Images are held as normalised float tensors (no
augmentation: every method of a comparison sees the same data).
"""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

from digits import SplitDataModule

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
FILES = {
    ("train", "images"): "train-images-idx3-ubyte",
    ("train", "labels"): "train-labels-idx1-ubyte",
    ("test", "images"): "t10k-images-idx3-ubyte",
    ("test", "labels"): "t10k-labels-idx1-ubyte",
}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
           "Ankle boot")
MEAN, STD = 0.2860, 0.3530  # of the 60,000 training images (pixel values in [0, 1])

#: IDX type codes (the third byte of the magic number) -> numpy big-endian dtypes.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (``.gz`` or plain) as a numpy array of its stored shape.

    Raises:
        ValueError: The file is not IDX (bad magic number) or is truncated.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except gzip.BadGzipFile as err:
        raise ValueError(f"{path} is not an IDX file (not gzip-compressed: {err})") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic {data[:4].hex()})")
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    count = int(np.prod(shape))
    offset = 4 + 4 * ndim
    if len(data) - offset < count * dtype.itemsize:
        raise ValueError(f"{path} is truncated: {len(data) - offset} bytes for shape {shape}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)


def find_file(data_dir: str | os.PathLike, split: str, kind: str) -> Path:
    """``<data_dir>/<name>.gz`` (or the uncompressed ``<name>``) of one of the four files.

    Raises:
        FileNotFoundError: Neither exists; the message names the install command.
    """
    name = FILES[(split, kind)]
    for candidate in (Path(data_dir) / f"{name}.gz", Path(data_dir) / name):
        if candidate.exists():
            return candidate
    raise FileNotFoundError(
        f"Fashion-MNIST file {name}.gz not found in {data_dir}. Install the Debian package with "
        "`apt-get install dataset-fashion-mnist` (it puts the four IDX files in "
        f"{DEFAULT_DIR}), or pass data_dir= a directory holding them; nothing is downloaded.")


def load_split(data_dir: str | os.PathLike, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised images ``(N, 1, 28, 28)`` float32 and labels ``(N,)`` int64 of ``train`` or ``test``."""
    images = read_idx(find_file(data_dir, split, "images"))
    labels = read_idx(find_file(data_dir, split, "labels"))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{data_dir}: {split} images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.astype(np.float32) / 255.0).unsqueeze(1)
    return (x - MEAN) / STD, torch.from_numpy(labels.astype(np.int64))


class FashionMNISTDataModule(SplitDataModule):
    """Fashion-MNIST train / val / test from the local IDX files.

    Args:
        data_dir: Directory of the four IDX files (default: the Debian package's location).
        batch_size: Batch size of the training loader.
        val_size: Training images held out for validation (the rest is the training set).
        seed: Seed of the train / val split.
        train_limit: Use only the first ``train_limit`` images of the (shuffled) training
            split (``None``: all of them); for quick experiments and tests.
    """

    def __init__(self, data_dir: str = DEFAULT_DIR, batch_size: int = 128, val_size: int = 5000, seed: int = 0,
                 train_limit: int | None = None) -> None:
        super().__init__()
        self.data_dir, self.batch_size, self.val_size, self.seed = data_dir, batch_size, val_size, seed
        self.train_limit = train_limit
        self.train_set = self.val_set = self.test_set = None

    def prepare_data(self) -> None:
        for key in FILES:
            find_file(self.data_dir, *key)  # fail early, with the install command, when missing

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = load_split(self.data_dir, "train")
        if not 0 <= self.val_size < len(y):
            raise ValueError(f"val_size must be in [0, {len(y)}), got {self.val_size}")
        perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(self.seed))
        val, train = perm[:self.val_size], perm[self.val_size:]
        if self.train_limit is not None:
            train = train[:self.train_limit]
        self.train_set, self.val_set = TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])
        self.test_set = TensorDataset(*load_split(self.data_dir, "test"))
