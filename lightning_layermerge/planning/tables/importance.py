"""Importance lookup table I[i, j, k], the paper's Eq. 4 (torch only, no Lightning).

For every legal segment, the network with *only* that segment replaced (``Plan.replacing``)
is pruned, briefly fine-tuned by a caller-supplied function and scored by a caller-supplied
function (Perf, higher is better)::

    I[i, j, k] = exp(Perf(segment replaced, fine-tuned) - Perf(original))

Entries are independent, so a build can be split into shards ``(rank, world_size)``: shard
``r`` computes the entries whose index in the sorted key list is ``r`` modulo ``world_size``;
:func:`combine_shards` joins the results. Every entry is persisted through
:class:`~lightning_layermerge.planning.tables.cache.TableCache` as soon as it is known, so a build
that is interrupted resumes and a repeated build fine-tunes nothing.

An entry whose run fails is never chosen by the solver: a non-finite score gives ``-inf``
(cached: the run is deterministic and would diverge again), an exception in ``finetune`` or
``score`` gives ``-inf`` too but is not cached, so a transient failure (e.g. out of memory)
is retried on the next build. Both warn, naming the segment.
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ...surgery.graph import Chain, Segment
from ...surgery.plan import Plan
from ...surgery.prune import prune
from .cache import TableCache, fingerprint

__all__ = [
    "BASE_KEY",
    "FineTune",
    "ImportanceWarning",
    "Score",
    "build_importance_table",
    "combine_shards",
    "weights_fingerprint",
]

#: A fine-tuning run: trains the pruned network a little (in place, or returns a new one).
FineTune = Callable[[nn.Module, Segment], "nn.Module | None"]
#: Perf of a network: higher is better, deterministic.
Score = Callable[[nn.Module], float]

#: Reserved cache entry holding Perf(original) (no legal segment has a negative position).
BASE_KEY = (-1, -1, 0)

Key = tuple[int, int, int]


class ImportanceWarning(UserWarning):
    """An importance entry failed (non-finite score or an exception) and was set to -inf."""


def weights_fingerprint(model: nn.Module) -> str:
    """SHA-256 hex digest of ``model.state_dict()``: names, dtypes, shapes and tensor bytes, in order.

    Use it in ``cache_key`` so that importance entries computed for other weights are not reused.

    Args:
        model: Any module.

    Returns:
        64 lowercase hex characters.
    """
    digest = hashlib.sha256()
    for name, value in model.state_dict().items():
        digest.update(name.encode("utf-8"))
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous()
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            # Viewed as raw bytes, so every dtype (bfloat16 and bool included) hashes exactly.
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:  # extra state: hash its repr
            digest.update(repr(value).encode("utf-8"))
    return digest.hexdigest()


def _segment_keys(chain: Chain, segments: Iterable[Segment | Sequence[int]] | None) -> list[Key]:
    """Sorted table keys to build; checks that each one is a legal segment of ``chain``."""
    if segments is None:
        return sorted(s.key for s in chain.segments)
    keys = set()
    for seg in segments:
        key = seg.key if isinstance(seg, Segment) else tuple(int(v) for v in seg)
        chain.segment(*key)  # ValueError naming the legal kernels if it is not legal
        keys.add(key)
    return sorted(keys)


def _check_shard(shard: tuple[int, int]) -> tuple[int, int]:
    """Validate ``(rank, world_size)``."""
    try:
        rank, world = (int(v) for v in shard)
    except (TypeError, ValueError):
        raise TypeError(f"shard must be a (rank, world_size) pair of ints, got {shard!r}") from None
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"shard (rank, world_size) needs world_size >= 1 and 0 <= rank < world_size, got {shard!r}")
    return rank, world


def _activation_name(factory: Callable[[], nn.Module] | None) -> str | None:
    """A stable description of the bottleneck-activation factory for the cache key."""
    if factory is None:
        return None
    return f"{getattr(factory, '__module__', '')}.{getattr(factory, '__qualname__', type(factory).__name__)}"


def _open_cache(cache_dir: str | os.PathLike | None, cache_key: Mapping[str, Any] | None, chain: Chain,
                bottleneck_activation: Callable[[], nn.Module] | None, rank: int, world: int) -> TableCache | None:
    """One file per (architecture, settings, shard): parallel shards never share a writer."""
    if cache_dir is None:
        return None
    if cache_key is None:
        raise ValueError(
            "cache_dir needs a cache_key describing what the scores depend on, e.g. "
            "{'weights': weights_fingerprint(model), 'steps': 100, 'lr': 0.01, 'data': 'seed0'}; "
            "without it, entries computed for other weights or settings could be reused"
        )
    if not isinstance(cache_key, Mapping):
        raise TypeError(f"cache_key must be a mapping, got {type(cache_key).__name__}")
    key = {"table": "importance", "chain": chain.fingerprint,
           "bottleneck_activation": _activation_name(bottleneck_activation), "user": dict(cache_key)}
    name = f"importance-{chain.fingerprint}-{fingerprint(key)[:12]}-shard{rank}of{world}.json"
    return TableCache(Path(cache_dir) / name, key)


def _warn(key: Key, why: str) -> None:
    warnings.warn(f"importance entry for segment (i, j, k) = {key} {why}; setting it to -inf so "
                  "the solver never chooses it", ImportanceWarning, stacklevel=3)


def _entry(model: nn.Module, chain: Chain, key: Key, finetune: FineTune, score: Score, base: float,
           bottleneck_activation: Callable[[], nn.Module] | None) -> tuple[float, bool]:
    """Compute one entry; returns ``(value, cacheable)``."""
    seg = chain.segment(*key)
    pruned = prune(model, chain, Plan.replacing(chain, seg), bottleneck_activation=bottleneck_activation)
    try:
        trained = finetune(pruned, seg)
        perf = float(score(pruned if trained is None else trained))
    except Exception as err:  # noqa: BLE001 - any failure of the user's run marks the entry, not the build
        _warn(key, f"failed with {type(err).__name__}: {err} (not cached; retried on the next build)")
        return -math.inf, False
    if not math.isfinite(perf):
        _warn(key, f"has a non-finite score ({perf})")
        return -math.inf, True
    try:
        return math.exp(perf - base), True
    except OverflowError:
        _warn(key, f"has Perf {perf} - {base} too large for exp(); rescale the score")
        return -math.inf, True


def _base_score(model: nn.Module, score: Score, base_score: float | None, cache: TableCache | None) -> float:
    """Perf(original): given, cached, or computed once (and cached)."""
    if base_score is not None:
        base = float(base_score)
    elif cache is not None and BASE_KEY in cache:
        return float(cache.get(BASE_KEY))  # type: ignore[arg-type]
    else:
        base = float(score(model))
    if not math.isfinite(base):
        raise ValueError(f"the original network's score is {base}; importance needs a finite Perf(original)")
    if cache is not None and base_score is None:
        cache.put(BASE_KEY, base)
    return base


def build_importance_table(
    model: nn.Module,
    chain: Chain,
    finetune: FineTune,
    score: Score,
    *,
    segments: Iterable[Segment | Sequence[int]] | None = None,
    shard: tuple[int, int] = (0, 1),
    cache_dir: str | os.PathLike | None = None,
    cache_key: Mapping[str, Any] | None = None,
    progress: bool = True,
    base_score: float | None = None,
    bottleneck_activation: Callable[[], nn.Module] | None = None,
) -> dict[Key, float]:
    """Importance ``exp(Perf(segment replaced, fine-tuned) - Perf(original))`` per segment.

    Args:
        model: The trained network ``chain`` was traced from; it is not modified.
        chain: From :func:`~lightning_layermerge.trace`.
        finetune: ``finetune(pruned, segment)`` trains the pruned network a little, in place
            or returning the trained network.
        score: ``score(network) -> float``, Perf, higher is better, deterministic.
        segments: Segments (or ``(i, j, k)`` keys) to compute; default: every legal segment.
        shard: ``(rank, world_size)``: this call computes the entries whose index in the
            sorted key list is ``rank`` modulo ``world_size``.
        cache_dir: Directory of the on-disk cache (one file per shard); ``None``: no cache.
        cache_key: Required with ``cache_dir``: everything the scores depend on besides the
            architecture, e.g. ``{"weights": weights_fingerprint(model), "steps": ..., ...}``.
        progress: Show a progress bar.
        base_score: Perf(original) if already known (then ``score(model)`` is not called).
        bottleneck_activation: Passed to :func:`~lightning_layermerge.prune`.

    Returns:
        ``{(i, j, k): importance}`` for this shard's segments only; ``-inf`` for failed runs.

    Raises:
        TypeError: If ``finetune``/``score`` are not callable or ``shard``/``cache_key`` are malformed.
        ValueError: If a segment is not legal, the shard is out of range, ``cache_dir`` is given
            without ``cache_key``, or Perf(original) is not finite.
    """
    if not isinstance(chain, Chain):
        raise TypeError(f"chain must come from lightning_layermerge.trace(...), got {type(chain).__name__}")
    if not callable(finetune) or not callable(score):
        raise TypeError("finetune and score must be callables: finetune(module, segment), score(module) -> float")
    rank, world = _check_shard(shard)
    mine = _segment_keys(chain, segments)[rank::world]
    cache = _open_cache(cache_dir, cache_key, chain, bottleneck_activation, rank, world)
    cached = cache.items() if cache is not None else {}
    todo = [k for k in mine if k not in cached]
    table = {k: cached[k] for k in mine if k in cached}
    if todo:  # Perf(original) is only needed when something is left to compute
        base = _base_score(model, score, base_score, cache)
        desc = "importance table" + (f" [shard {rank}/{world}]" if world > 1 else "")
        for key in tqdm(todo, desc=desc, unit="entry", disable=not progress):
            value, cacheable = _entry(model, chain, key, finetune, score, base, bottleneck_activation)
            table[key] = value
            if cache is not None and cacheable:
                cache.put(key, value)
    return {k: table[k] for k in mine}


def combine_shards(shards: Iterable[Mapping[Key, float]]) -> dict[Key, float]:
    """Join the tables of several shards into one.

    Args:
        shards: The dictionaries returned by :func:`build_importance_table` for each rank.

    Returns:
        One dictionary holding every entry, sorted by key.

    Raises:
        ValueError: If two shards hold the same key (they were not built as disjoint shards).
    """
    combined: dict[Key, float] = {}
    for index, shard in enumerate(shards):
        overlap = sorted(set(combined) & set(shard))
        if overlap:
            raise ValueError(
                f"shard {index} repeats entries already given by an earlier shard (e.g. {overlap[:3]}); "
                "build shards with distinct ranks of the same world_size"
            )
        combined.update(shard)
    return dict(sorted(combined.items()))
