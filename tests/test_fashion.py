"""The Fashion-MNIST recipe (recipes/fashion.py) and its benchmark (recipes/benchmarks/compare_fashion.py).

Every test writes its own tiny IDX files: nothing here needs the Debian package
``dataset-fashion-mnist``, and nothing changes when it is installed.
"""

from __future__ import annotations

import csv
import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import load_recipe
from lm_helpers import one_thread

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
fashion = load_recipe(RECIPES / "fashion.py")

one_thread = pytest.fixture(autouse=True)(one_thread)


def write_idx(path: Path, array: np.ndarray, gz: bool = True) -> None:
    """``array`` (uint8) as an IDX file: magic 0x0000 08 <ndim>, big-endian dims, the bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    with (gzip.open(path, "wb") if gz else open(path, "wb")) as f:
        f.write(data)


def write_fashion(root: Path, train: int = 40, test: int = 20, size: int = 28, gz: bool = True) -> Path:
    """The four Fashion-MNIST files with ``train`` / ``test`` images whose brightness follows the label."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("t10k", test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.clip(labels[:, None, None] * 25 + rng.integers(0, 30, (n, size, size)), 0, 255)
        suffix = ".gz" if gz else ""
        write_idx(root / f"{split}-images-idx3-ubyte{suffix}", images, gz)
        write_idx(root / f"{split}-labels-idx1-ubyte{suffix}", labels, gz)
    return root


@pytest.mark.parametrize("gz", [True, False])
def test_read_idx_round_trip(tmp_path: Path, gz: bool) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    path = tmp_path / ("a.idx.gz" if gz else "a.idx")
    write_idx(path, array, gz)
    assert np.array_equal(fashion.read_idx(path), array)
    path.write_bytes(b"\x08\x03\x00\x00junk")
    with pytest.raises(ValueError, match="not an IDX file"):
        fashion.read_idx(path)


def test_datamodule_splits_and_normalises(tmp_path: Path) -> None:
    root = write_fashion(tmp_path / "fm", train=40, test=20)
    dm = fashion.FashionMNISTDataModule(str(root), batch_size=8, val_size=10, seed=0)
    dm.prepare_data()
    dm.setup("fit")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (30, 10, 20)
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (8, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    # Same seed, same split; the test set is t10k in file order.
    again = fashion.FashionMNISTDataModule(str(root), val_size=10, seed=0)
    again.setup()
    assert torch.equal(again.val_set.tensors[1], dm.val_set.tensors[1])
    assert dm.test_set.tensors[1].tolist() == [i % 10 for i in range(20)]
    expected = (torch.from_numpy(fashion.read_idx(root / "t10k-images-idx3-ubyte.gz").copy()).float() / 255
                - fashion.MEAN) / fashion.STD
    assert torch.allclose(dm.test_set.tensors[0][:, 0], expected)
    limited = fashion.FashionMNISTDataModule(str(root), val_size=10, train_limit=5)
    limited.setup()
    assert len(limited.train_set) == 5
    plain = write_fashion(tmp_path / "plain", train=12, test=4, gz=False)  # uncompressed files are read too
    dm = fashion.FashionMNISTDataModule(str(plain), val_size=2)
    dm.setup()
    assert len(dm.train_set) == 10


def test_missing_files_name_the_install_command(tmp_path: Path) -> None:
    dm = fashion.FashionMNISTDataModule(str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        dm.prepare_data()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        dm.setup()


def test_benchmark_smoke(tmp_path: Path) -> None:
    """compare_fashion.py end to end on tiny data: train, control, width pruning (ratio search,
    KD fine-tuning, latency in a separate process), CSV row, resume, report."""
    pytest.importorskip("torch_pruning")
    bench = load_recipe(RECIPES / "benchmarks" / "compare_fashion.py")
    root = write_fashion(tmp_path / "fm", train=80, test=20)
    out = tmp_path / "res.csv"
    args = ["--data-dir", str(root), "--nets", "mobilenetv2", "--methods", "width", "--budgets", "0.8",
            "--seeds", "0", "--train-epochs", "1", "--finetune-epochs", "1", "--val-size", "16", "--batch-size", "16", "--timing-scale", "0.05",
            "--work", str(tmp_path / "work"), "--csv", str(out)]
    bench.main(args)
    rows = list(csv.DictReader(out.open()))
    assert [(r["method"], r["budget"], r["status"]) for r in rows] == [("control", "1.00", "ok"), ("width", "0.80", "ok")]
    width = rows[1]
    assert 0 < float(width["width_ratio"]) < 0.95 and 0 <= float(width["test_acc"]) <= 1
    for key in ("ratio_b1", "ratio_b64", "ms_b1", "orig_ms_b64"):
        assert float(width[key]) > 0
    assert float(rows[0]["params"]) > float(width["params"])
    bench.main(args)  # resumes: nothing re-run
    assert len(list(csv.DictReader(out.open()))) == 2
    text = out.with_suffix(".md").read_text()
    assert "| 0.80 |" in text and "<!-- notes -->" in text and out.with_suffix(".png").exists()


def test_verdicts_compare_at_equal_latency() -> None:
    """The benchmark's plain statement: a win needs more than one sd at equal or lower latency,
    a loss more than one sd less at equal or higher latency; otherwise a tie or a trade-off."""
    bench = load_recipe(RECIPES / "benchmarks" / "compare_fashion.py")
    P = bench.Point
    lm = P(b1=0.8, b64=0.50, acc=90.0, sd=0.1, n=3)
    assert bench.verdict(lm, P(0.6, 0.51, 89.5, 0.2, 3)).startswith("wins, +0.50 points (sd 0.20)")
    assert bench.verdict(lm, P(0.6, 0.50, 90.5, 0.2, 3)).startswith("loses, -0.50")
    assert bench.verdict(lm, P(0.6, 0.505, 90.05, 0.2, 3)).startswith("ties, -0.05")
    assert bench.verdict(lm, P(0.6, 0.60, 90.5, 0.2, 3)).startswith("trade-off")  # less accurate but 17 % faster
    assert bench.verdict(lm, P(0.6, 0.40, 89.0, 0.2, 3)).startswith("trade-off")  # more accurate but slower
    assert bench.verdict(lm, P(0.6, 0.51, 89.5, 0.2, 3), "b1").startswith("trade-off")  # slower at batch 1
    row = {"status": "ok", "test_acc": "0.9", "ratio_b1": "0.8", "ratio_b64": "0.5", "segments": "(0,3]k3",
           "kept_convs": "5", "kept_acts": "3"}
    groups = {("n", "layermerge", "0.50"): [row], ("n", "depth", "0.50"): [dict(row, ratio_b64="0.52")],
              ("n", "layeronly", "0.50"): [dict(row, segments="-", test_acc="0.8")]}
    (line,) = bench.verdict_lines(groups, "n", [0.5, 0.7], ["layermerge", "layeronly", "depth"])
    assert "vs depth: the same plan" in line and "vs layeronly: batch 64 wins, +10.00" in line
