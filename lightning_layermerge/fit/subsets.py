"""The random data subsets of the importance sub-runs: a fine-tuning subset and a disjoint scoring
subset per entry, drawn by index from the training (and validation) data."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset

from .importance_settings import ImportanceSettings

__all__ = ["Subsets", "check_loader", "draw_subsets", "indexable", "subset_indices"]


def subset_indices(size: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Two disjoint random index lists of ``round(fraction * size)`` items each (at least 1)."""
    n = max(1, round(fraction * size))
    if 2 * n > size:
        raise ValueError(
            f"the training set has {size} samples: too few for two disjoint importance subsets of {n}; "
            "lower ImportanceSettings.fraction"
        )
    perm = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    return perm[:n], perm[n:2 * n]


@dataclass(frozen=True)
class Subsets:
    """Where each importance entry is fine-tuned and scored (indices into the datasets).

    Attributes:
        train: Indices of the fine-tuning subset (training set).
        score: Indices of the scoring subset (validation set if ``on_val``, else training
            set, disjoint from ``train``).
        pool: The indices scoring subsets are drawn from (another draw per noise repeat).
        on_val: Whether scoring uses the validation set.
    """

    train: list[int]
    score: list[int]
    pool: list[int]
    on_val: bool

    def score_draw(self, repeat: int, seed: int) -> list[int]:
        """The scoring subset of noise repeat ``repeat`` (repeat 0: the table's own)."""
        if repeat == 0 or len(self.score) >= len(self.pool):
            return self.score
        g = torch.Generator().manual_seed(seed * 7919 + repeat)
        order = torch.randperm(len(self.pool), generator=g).tolist()
        return [self.pool[i] for i in order[:len(self.score)]]


def draw_subsets(train_size: int, val_size: int | None, settings: ImportanceSettings, batch_size: int) -> Subsets:
    """The fine-tuning and scoring subsets, with the floors of ``settings`` applied.

    ``fraction`` of the training set is the starting size of both subsets. The scoring
    subset is raised to ``min_score_samples`` (capped by the validation set, or by half of
    the training set when scoring on held-out training samples); the fine-tuning
    subset to ``min_steps * batch_size`` samples (capped likewise), so the floor of steps
    sees distinct samples when the data has them (the head probe's features too), and to
    ``bn_batch_count * batch_size`` samples
    for the BatchNorm re-estimation.

    Args:
        train_size: Samples in the training set.
        val_size: Samples in the validation set (``None``: no usable validation set, or
            ``settings.score_on == "train"``: then scoring uses held-out training samples).
        settings: The importance settings.
        batch_size: Batch size of the sub-runs.

    Raises:
        ValueError: The training set is too small for two disjoint subsets.
    """
    g = torch.Generator().manual_seed(settings.seed)
    n = max(1, round(settings.fraction * train_size))
    want_train = max(n, settings.min_steps * batch_size if settings.steps is None else 0,
                     settings.bn_batch_count * batch_size)
    if val_size:
        score_n = min(val_size, max(n, settings.min_score_samples))
        pool = list(range(val_size))
        score = pool if score_n == val_size else torch.randperm(val_size, generator=g).tolist()[:score_n]
        perm = torch.randperm(train_size, generator=g).tolist()
        return Subsets(train=perm[:min(train_size, want_train)], score=score, pool=pool, on_val=True)
    if 2 * n > train_size:
        raise ValueError(
            f"the training set has {train_size} samples: too few for two disjoint importance subsets of {n}; "
            "lower ImportanceSettings.fraction"
        )
    perm = torch.randperm(train_size, generator=g).tolist()
    # Held-out scoring samples first (the floor, at most half of the training set), the
    # fine-tuning subset from the rest.
    score_n = max(n, min(settings.min_score_samples, train_size // 2))
    train_n = min(want_train, train_size - score_n)
    return Subsets(train=perm[score_n:score_n + train_n], score=perm[:score_n],
                   pool=perm[:score_n] + perm[score_n + train_n:], on_val=False)


def indexable(loader: Any) -> bool:
    """Whether subsets can be drawn from ``loader`` by index (a DataLoader over a map-style dataset)."""
    return isinstance(loader, DataLoader) and not isinstance(loader.dataset, IterableDataset) \
        and hasattr(loader.dataset, "__len__") and len(loader.dataset) > 0


def check_loader(loader: Any) -> DataLoader:
    """The training loader, if subsets can be drawn from it; else a ``TypeError`` saying what to do."""
    if not isinstance(loader, DataLoader):
        raise TypeError(
            f"LayerMergeCallback draws its importance subsets from the training DataLoader, but the "
            f"train dataloader is a {type(loader).__name__}; use a single torch DataLoader over a map-style "
            "dataset, or pass plan= to skip the importance table"
        )
    if isinstance(loader.dataset, IterableDataset):
        raise TypeError(
            "LayerMergeCallback draws random importance subsets by index, which an IterableDataset does not "
            "support; use a map-style dataset or pass plan= to skip the importance table"
        )
    return loader
