"""Tests of the importance table (lightning_layermerge.tables.importance)."""

from __future__ import annotations

import copy
import math
import warnings
from pathlib import Path

import pytest
import torch
from helpers import randomize_batchnorm
from torch import nn

from lightning_layermerge import Plan, trace
from lightning_layermerge.planning.tables.importance import (
    ImportanceWarning,
    build_importance_table,
    combine_shards,
    weights_fingerprint,
)


class SmallNet(nn.Module):
    """conv-BN-ReLU stem, a residual block, a strided conv and a 1x1 conv."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.c1, self.b1 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.c2, self.b2 = nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.down = nn.Sequential(nn.Conv2d(6, 8, 3, stride=2, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c3 = nn.Conv2d(8, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(x + self.b2(self.c2(y)))
        return self.c3(self.down(x))


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize_batchnorm(SmallNet(), seed=0).eval()
    data = torch.randn(4, 3, 10, 10)
    chain = trace(model, data[:2])
    with torch.no_grad():
        reference = model(data)

    def score(net: nn.Module) -> float:
        """Perf = negative MSE to the original network's output on fixed data."""
        net.eval()
        with torch.no_grad():
            return -float(((net(data) - reference) ** 2).mean())

    return model, chain, score


class Recorder:
    """Deterministic no-op fine-tune that records which segments it was called for."""

    def __init__(self, fail_on: tuple | None = None, interrupt_after: int | None = None) -> None:
        self.calls: list[tuple[int, int, int]] = []
        self.fail_on, self.interrupt_after = fail_on, interrupt_after

    def __call__(self, net: nn.Module, seg) -> None:
        if self.interrupt_after is not None and len(self.calls) >= self.interrupt_after:
            raise KeyboardInterrupt  # not an Exception: ends the build, like a real Ctrl-C
        self.calls.append(seg.key)
        if seg.key == self.fail_on:
            raise RuntimeError("CUDA out of memory (simulated)")


def keep_all_equivalent(chain) -> set[tuple[int, int, int]]:
    """Single-layer segments that keep their conv: replacing them changes nothing."""
    return {s.key for s in chain.segments if s.j == s.i + 1 and s.convs == (s.j,)}


@pytest.fixture(scope="module")
def full(setup):
    """The whole table with a no-op fine-tune, and the segments the fine-tune was called for."""
    model, chain, score = setup
    finetune = Recorder()
    return build_importance_table(model, chain, finetune, score, progress=False), finetune.calls


def test_importance_is_exp_of_the_score_difference(setup, full) -> None:
    model, chain, score = setup
    table, calls = full
    assert set(table) == {s.key for s in chain.segments}
    assert sorted(calls) == sorted(table)  # one fine-tune per entry
    same = keep_all_equivalent(chain)
    assert len(same) == chain.num_layers
    for key, value in table.items():
        if key in same:
            assert value == 1.0  # exp(0) exactly: the network is unchanged
        else:
            assert 0.0 < value < 1.0, key  # every other replacement changes the function
    # An entry by hand: exp(Perf(replaced) - Perf(original)), Perf(original) = 0.
    from lightning_layermerge import prune
    seg = max(chain.segments, key=lambda s: (s.j - s.i, s.k))
    expected = math.exp(score(prune(model, chain, Plan.replacing(chain, seg))))
    assert table[seg.key] == pytest.approx(expected, rel=1e-12)


def test_finetune_result_is_scored(setup) -> None:
    model, chain, score = setup
    seg = next(s for s in chain.segments if s.key not in keep_all_equivalent(chain))

    def replace_by_original(net: nn.Module, segment) -> nn.Module:
        return copy.deepcopy(model)  # "training" recovers the original function

    table = build_importance_table(model, chain, replace_by_original, score, segments=[seg.key], progress=False)
    assert table == {seg.key: 1.0}


def test_nan_score_and_failed_finetune_give_minus_inf_with_a_warning(setup, tmp_path: Path) -> None:
    model, chain, score = setup
    keys = sorted(s.key for s in chain.segments)[::3]  # a subset keeps the test quick
    nan_key, fail_key = keys[3], keys[5]

    class Tagging(Recorder):
        def __call__(self, net, seg):
            super().__call__(net, seg)
            net.tag = seg.key

    def nan_for_one(net: nn.Module) -> float:
        return math.nan if getattr(net, "tag", None) == nan_key else score(net)

    finetune = Tagging(fail_on=fail_key)
    with pytest.warns(ImportanceWarning) as record:
        table = build_importance_table(model, chain, finetune, nan_for_one, segments=keys, cache_dir=tmp_path,
                                       cache_key={"weights": weights_fingerprint(model)}, progress=False)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert f"{nan_key}" in messages[0 if keys.index(nan_key) < keys.index(fail_key) else 1]
    assert any(f"{fail_key}" in m and "RuntimeError" in m for m in messages)
    assert table[nan_key] == -math.inf and table[fail_key] == -math.inf
    assert all(math.isfinite(v) for k, v in table.items() if k not in (nan_key, fail_key))
    # The NaN is cached (deterministic), the exception is not: only the failed entry reruns.
    again = Tagging()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        table2 = build_importance_table(model, chain, again, nan_for_one, segments=keys, cache_dir=tmp_path,
                                        cache_key={"weights": weights_fingerprint(model)}, progress=False)
    assert again.calls == [fail_key]
    assert table2[nan_key] == -math.inf and 0 < table2[fail_key] <= 1.0


def test_shards_are_disjoint_and_combine_to_the_full_table(setup, full) -> None:
    model, chain, score = setup
    full, _ = full
    first = build_importance_table(model, chain, Recorder(), score, shard=(0, 2), progress=False)
    second = build_importance_table(model, chain, Recorder(), score, shard=(1, 2), progress=False)
    assert first and second and not set(first) & set(second)
    assert abs(len(first) - len(second)) <= 1
    assert combine_shards([first, second]) == full
    assert list(combine_shards([second, first])) == sorted(full)
    with pytest.raises(ValueError, match="repeats entries"):
        combine_shards([first, first])


def test_second_build_fine_tunes_nothing_and_interrupted_build_resumes(setup, tmp_path: Path) -> None:
    model, chain, score = setup
    key = {"weights": weights_fingerprint(model), "steps": 0}
    keys = sorted(s.key for s in chain.segments)[::2]  # a subset keeps the test quick
    n = len(keys)
    interrupted = Recorder(interrupt_after=n // 3)
    with pytest.raises(KeyboardInterrupt):
        build_importance_table(model, chain, interrupted, score, segments=keys, cache_dir=tmp_path, cache_key=key,
                               progress=False)
    resumed = Recorder()
    table = build_importance_table(model, chain, resumed, score, segments=keys, cache_dir=tmp_path, cache_key=key,
                                   progress=False)
    assert sorted(table) == keys
    assert len(resumed.calls) == n - n // 3 and not set(resumed.calls) & set(interrupted.calls)
    scores: list[nn.Module] = []
    again = build_importance_table(model, chain, Recorder(interrupt_after=0), lambda m: scores.append(m) or 0.0,
                                   segments=keys, cache_dir=tmp_path, cache_key=key, progress=False)
    assert again == table and scores == []  # no fine-tune and not even the base score
    # Other scoring settings are another table.
    with pytest.raises(KeyboardInterrupt):
        build_importance_table(model, chain, Recorder(interrupt_after=0), score, segments=keys, cache_dir=tmp_path,
                               cache_key={**key, "steps": 10}, progress=False)


def test_arguments_are_validated(setup, tmp_path: Path) -> None:
    model, chain, score = setup
    with pytest.raises(ValueError, match="cache_key"):
        build_importance_table(model, chain, Recorder(), score, cache_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="world_size"):
        build_importance_table(model, chain, Recorder(), score, shard=(2, 2), progress=False)
    with pytest.raises(ValueError, match="not a legal segment"):
        build_importance_table(model, chain, Recorder(), score, segments=[(0, 1, 99)], progress=False)
    with pytest.raises(ValueError, match="finite"):
        build_importance_table(model, chain, Recorder(), lambda m: math.nan, progress=False)
    with pytest.raises(TypeError, match="callables"):
        build_importance_table(model, chain, None, score, progress=False)


def test_base_score_given_is_not_recomputed(setup) -> None:
    model, chain, score = setup
    seen: list[nn.Module] = []

    def spy(net: nn.Module) -> float:
        seen.append(net)
        return score(net)

    seg = chain.segments[0]
    table = build_importance_table(model, chain, Recorder(), spy, segments=[seg], base_score=-0.5, progress=False)
    assert len(seen) == 1 and seen[0] is not model
    assert table[seg.key] == pytest.approx(math.exp(score(seen[0]) + 0.5), rel=1e-12)


def test_weights_fingerprint() -> None:
    torch.manual_seed(0)
    model = SmallNet()
    digest = weights_fingerprint(model)
    assert len(digest) == 64 and digest == weights_fingerprint(copy.deepcopy(model))
    with torch.no_grad():
        model.c3.bias[0] += 1e-6
    assert weights_fingerprint(model) != digest
    assert weights_fingerprint(model.to(torch.bfloat16)) != weights_fingerprint(model.float())
