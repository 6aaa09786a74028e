"""Importance you can trust: floors of steps and scoring samples, BatchNorm re-estimation,
distillation in the sub-runs, and the measured noise level (issue 13)."""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import statistics
import warnings

import pytest
import torch
from lm_helpers import LitTinyVal, digits, loaders, one_thread, quiet_trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_layermerge import Plan, prune, trace
from lightning_layermerge.planning.bn_recalibration import batchnorm_layers, recalibrate_batchnorm
from lightning_layermerge.fit.importance_settings import MIN_SCORE_SAMPLES, MIN_STEPS, ImportanceSettings
from lightning_layermerge.fit.subruns import SubRunner
from lightning_layermerge.fit.subsets import draw_subsets
from lightning_layermerge.planning.tables.noise import (
    ImportanceNoiseWarning,
    measure_null_perfs,
    noise_level,
    pick_noise_entries,
    pooled_sigma,
    warn_if_noisy,
)

threads = pytest.fixture(autouse=True)(one_thread)


# ---------------------------------------------------------------------- floors


def test_floors_apply_whatever_fraction_says_on_small_data() -> None:
    settings = ImportanceSettings()  # fraction 0.04: 48 of 1,200 images, i.e. 1.5 batches of 32
    with_val = draw_subsets(1200, 270, settings, batch_size=32)
    assert with_val.on_val and with_val.score == list(range(270))  # the whole validation set
    assert len(with_val.train) == MIN_STEPS * 32 == 960  # the floor of steps sees distinct samples
    assert len(set(with_val.train)) == 960
    no_val = draw_subsets(1200, None, settings, batch_size=32)
    assert not no_val.on_val
    assert len(no_val.score) == 600  # min_score_samples (1000), capped at half of the training set
    assert len(no_val.train) == 600 and not set(no_val.train) & set(no_val.score)
    assert sorted(no_val.pool) == sorted(no_val.score)  # repeats draw from what is not trained on
    # Large data: fraction rules (4 % of 100,000 = 4,000 > both floors).
    big = draw_subsets(100_000, 50_000, settings, batch_size=32)
    assert len(big.score) == len(big.train) == 4000
    assert len(big.score_draw(1, 0)) == 4000 and big.score_draw(1, 0) != big.score
    assert (MIN_STEPS, MIN_SCORE_SAMPLES) == (settings.min_steps, settings.min_score_samples)


class CountingVal(LitTinyVal):
    """Counts training steps across the deep copies the sub-runs make (class attribute)."""

    calls: list[int] = []

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        CountingVal.calls.append(batch_idx)
        return super().training_step(batch, batch_idx)


def _runner(settings: ImportanceSettings, *, val: bool = True) -> SubRunner:
    train, val_loader = loaders(batch_size=32, n=600)  # 480 train / 120 val images
    return SubRunner(CountingVal(), "model", train, settings, val_loader=val_loader if val else None)


def test_subrun_trains_the_floor_of_steps_and_scores_on_the_validation_set() -> None:
    runner = _runner(ImportanceSettings(method="finetune", fraction=0.04, min_steps=12, batch_size=16, bn_batches=0))
    assert runner.steps == 12  # 4 % of 480 = 19 images would be one step
    assert len(runner.train_idx) == 12 * 16  # distinct samples for the floor
    assert runner.subsets.on_val and runner.score_samples == 120  # the whole validation set
    original = LitTinyVal().model
    CountingVal.calls.clear()
    trained = runner.finetune(copy.deepcopy(original))
    assert len(CountingVal.calls) == 12
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), original.parameters()))
    # An explicit steps wins over the floor; without a validation loader, held-out training data.
    explicit = _runner(ImportanceSettings(method="finetune", fraction=0.04, steps=3, batch_size=16), val=False)
    assert explicit.steps == 3 and not explicit.subsets.on_val
    assert explicit.score_samples == 240  # min(1000, 480 // 2)
    assert len(explicit.train_idx) == 19  # 4 % of 480: no floor of steps when steps is explicit
    with_bn = _runner(ImportanceSettings(method="finetune", fraction=0.04, steps=0, bn_batches=8, batch_size=16))
    assert len(with_bn.train_idx) == 8 * 16  # enough distinct samples for the BN batches


def test_settings_are_validated() -> None:
    for bad in ({"min_steps": -1}, {"min_score_samples": 0}, {"bn_batches": 1.5}, {"noise_repeats": 1},
                {"kd_alpha": -0.1}, {"kd_temperature": 0}, {"score_on": "test"}, {"steps": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ImportanceSettings(**bad)
    assert ImportanceSettings(method="finetune", steps=0).steps == 0  # BatchNorm re-estimation only


# ---------------------------------------------------------------------- BatchNorm re-estimation


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Dropout(0.5),
                                  nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.fc = nn.Linear(6, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.body(x).mean((2, 3)))


def _data(n: int = 256) -> TensorDataset:
    return TensorDataset(*digits(n)[:])


def test_bn_reestimation_leaves_eval_outputs_of_an_unpruned_net_unchanged() -> None:
    """A net whose running statistics already are its data's statistics is a fixed point."""
    torch.manual_seed(0)
    net = BNNet().eval()
    data = _data()
    whole = DataLoader(data, batch_size=len(data))
    assert recalibrate_batchnorm(net, whole, batches=1) == 1  # now: the exact stats of this data
    x = data.tensors[0]
    with torch.no_grad():
        before = net(x)
        state = copy.deepcopy(net.state_dict())
    assert recalibrate_batchnorm(net, whole, batches=5) == 1  # again, on the same data
    with torch.no_grad():
        after = net(x)
    torch.testing.assert_close(after, before, rtol=0, atol=0)
    for name, value in net.state_dict().items():
        assert torch.equal(value, state[name]), name
    # The statistics are the data's: eval-mode BN = train-mode BN (up to n/(n-1) of the variance).
    first = net.body[1]
    with torch.no_grad():
        inputs = net.body[0](x)
    torch.testing.assert_close(first.running_mean, inputs.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(first.running_var, inputs.var((0, 2, 3), unbiased=True), rtol=1e-5, atol=1e-6)
    # Mini-batches of the same data: same fixed point up to float rounding (first BN exactly the mean).
    recalibrate_batchnorm(net, DataLoader(data, batch_size=64), batches=4)
    torch.testing.assert_close(first.running_mean, inputs.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    assert not net.training and not any(m.training for m in net.modules())  # modes restored (dropout off)
    assert [bn.momentum for bn in batchnorm_layers(net)] == [0.1, 0.1]


def test_bn_reestimation_recovers_pruned_networks() -> None:
    """Real numbers: a briefly trained digits net, every single-segment replacement, before and after."""
    torch.manual_seed(0)
    module = LitTinyVal(lr=0.1)
    train, val = loaders(batch_size=32, n=600)
    quiet_trainer(max_steps=150, enable_progress_bar=False).fit(module, train_dataloaders=train)
    net = module.model.eval()
    chain = trace(net, torch.randn(2, 1, 8, 8))
    xs, ys = val.dataset.tensors

    def acc(m: nn.Module) -> float:
        with torch.no_grad():
            return float((m.eval()(xs).argmax(1) == ys).float().mean())

    gains = []
    for seg in chain.segments:
        pruned = prune(net, chain, Plan.replacing(chain, seg))
        stale = acc(pruned)
        weights = {k: v.clone() for k, v in pruned.state_dict().items()
                   if "running" not in k and "num_batches" not in k}
        recalibrate_batchnorm(pruned, train, batches=8)
        gains.append(acc(pruned) - stale)
        for k, v in weights.items():
            assert torch.equal(pruned.state_dict()[k], v), k  # forward only: no weight changes
    # Measured: mean accuracy over the 21 entries 0.240 -> 0.307; best entry 0.24 -> 0.58.
    assert statistics.mean(gains) > 0.04 and max(gains) > 0.25, gains


def test_bn_reestimation_failure_restores_the_statistics() -> None:
    net = BNNet()
    before = copy.deepcopy(net.state_dict())
    with pytest.raises(ValueError, match="no batch"):
        recalibrate_batchnorm(net, [], batches=3)
    with pytest.raises(RuntimeError):
        recalibrate_batchnorm(net, [torch.randn(2, 3, 8, 8)], batches=1)  # wrong channel count
    for name, value in net.state_dict().items():
        assert torch.equal(value, before[name]), name
    assert recalibrate_batchnorm(nn.Linear(2, 2), [torch.randn(1, 2)], batches=1) == 0
    with pytest.raises(ValueError, match="batches"):
        recalibrate_batchnorm(net, [], batches=0)


def test_subrun_reestimates_bn_only_when_steps_is_zero() -> None:
    runner = _runner(ImportanceSettings(method="finetune", steps=0, bn_batches=4, batch_size=16, noise_repeats=0))
    original = LitTinyVal().model
    trained = runner.finetune(copy.deepcopy(original))
    for (name, a), b in zip(trained.state_dict().items(), original.state_dict().values()):
        if "running" in name:
            assert not torch.equal(a, b), name  # statistics re-estimated
        elif "num_batches" not in name:
            assert torch.equal(a, b), name  # no optimizer step


def test_subrun_distillation_changes_the_fine_tune() -> None:
    base = dict(method="finetune", steps=3, batch_size=16, lr=0.05, bn_batches=0, noise_repeats=0)
    original = LitTinyVal().model
    plain = _runner(ImportanceSettings(**base)).finetune(copy.deepcopy(original))
    kd = _runner(ImportanceSettings(**base, kd_alpha=1.0)).finetune(copy.deepcopy(original))
    diff = max(float((a - b).abs().max()) for a, b in zip(plain.parameters(), kd.parameters()))
    assert diff > 1e-4


# ---------------------------------------------------------------------- noise level


def test_noise_level_on_a_synthetic_noisy_metric() -> None:
    true_perf, noise = -0.30, 0.05

    def noisy_score(net: nn.Module, repeat: int) -> float:
        return true_perf + random.Random(repeat).gauss(0.0, noise)

    trained: list[int] = []
    perfs = measure_null_perfs(nn.Linear(2, 2), lambda net, r: trained.append(r), noisy_score, repeats=3)
    assert trained == [0, 1, 2]
    assert perfs == [noisy_score(None, r) for r in range(3)]
    level = noise_level({(0, 1, 1): 1.0}, perfs)
    assert level.sigma == pytest.approx(statistics.stdev(perfs), rel=1e-12)
    assert 0.3 * noise < level.sigma < 3 * noise
    # 10 entries: 8 within 0.05 of the original (inside 2 sigma), 2 clearly worse, 1 failed.
    rng = random.Random(1)
    table = {(0, i, 1): math.exp(rng.choice((-1, 1)) * rng.uniform(0.1, 0.9) * level.sigma) for i in range(8)}
    table |= {(1, 2, 1): math.exp(-0.8), (1, 3, 1): math.exp(-1.5), (2, 3, 1): -math.inf}
    level = noise_level(table, perfs, steps_per_entry=30, score_samples=270, build_seconds=12.5)
    assert (level.entries, level.distinguishable) == (10, 2)
    assert level.share_distinguishable == pytest.approx(0.2)
    assert level.as_dict()["steps_per_entry"] == 30 and level.as_dict()["perfs"] == perfs
    with pytest.warns(ImportanceNoiseWarning, match=r"only 2 of 10 entries.*min_score_samples.*min_steps"):
        assert warn_if_noisy(level)
    probe = dataclasses.replace(level, method="probe")  # the head probe: nothing to lengthen but the data
    with pytest.warns(ImportanceNoiseWarning, match=r"only 2 of 10 entries.*min_score_samples.*bn_batches, or pass "
                                                    r"ImportanceSettings\(method='finetune'\)"):
        assert warn_if_noisy(probe)
    # Damaged networks are noisier than the intact one: the entries' pooled spread decides.
    noisy_entries = {(1, 2, 1): [-2.00, -0.60, -1.30], (1, 3, 1): [-1.80, -1.20, -1.50]}
    level = noise_level(table, perfs, entry_perfs=noisy_entries)
    expected = math.sqrt((0.49 + 0.09) / 2)  # the two groups' sample variances
    assert level.sigma_entries == pytest.approx(expected, rel=1e-12) and level.sigma == level.sigma_entries
    assert level.sigma_original == pytest.approx(statistics.stdev(perfs), rel=1e-12)
    assert (level.entries, level.distinguishable) == (10, 1)  # only ln I = -1.5 is beyond 2 x 0.539
    assert level.as_dict()["entry_perfs"] == {"(1, 2, 1)": [-2.0, -0.6, -1.3], "(1, 3, 1)": [-1.8, -1.2, -1.5]}
    # A quiet metric: every changed entry stands out, no warning.
    quiet = noise_level(table, [true_perf, true_perf + 1e-6, true_perf - 1e-6])
    assert quiet.distinguishable == 10
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert not warn_if_noisy(quiet)


def test_noise_entries_are_spread_over_the_changed_entries() -> None:
    table = {(0, i, 1): math.exp(-0.1 * i) for i in range(10)}  # (0, 0, 1) = 1.0: unchanged network
    table[(5, 6, 1)] = -math.inf
    assert pick_noise_entries(table, 2) == [(0, 3, 1), (0, 6, 1)]  # 9 changed entries, at 1/3 and 2/3
    assert pick_noise_entries(table, 0) == [] and pick_noise_entries({(0, 1, 1): 1.0}, 2) == []
    assert pooled_sigma([[1.0]]) is None and pooled_sigma([[1.0, 3.0], [0.0, 0.0]]) == pytest.approx(1.0)


def test_subrunner_null_perfs_vary_with_the_repeat() -> None:
    runner = _runner(ImportanceSettings(method="finetune",
                                        fraction=0.1, steps=2, batch_size=16, lr=0.05, noise_repeats=3,
                                        min_score_samples=40))
    original = LitTinyVal().model
    runner.resolve_monitor(original, None, "min")
    perfs = runner.null_perfs(original)
    assert len(perfs) == 3 and len(set(perfs)) == 3 and all(math.isfinite(p) for p in perfs)
    assert runner.score_samples == 48 and runner.subsets.on_val  # max(10 % of 480, 40) of the 120 val images


def test_report_shows_the_noise_level_steps_and_build_time() -> None:
    from lightning_layermerge import LayerMergeReport

    level = noise_level({(0, 1, 1): math.exp(-0.5), (0, 2, 1): math.exp(-0.001)}, [-0.30, -0.31, -0.29],
                        entry_perfs={(0, 2, 1): [-0.301, -0.303]}, steps_per_entry=30, score_samples=270,
                        build_seconds=123.4)
    report = LayerMergeReport(budget=0.7, method="layermerge", target="model", num_layers=2, layer_names=["a", "b"],
                              segments=[(0, 2, 1)], kept_activations=[], kept_convs=[1], irreducible=[1],
                              importance=level.as_dict())
    text = str(report)
    assert ("importance table : 2 entries, 30 steps each, scored on 270 samples, built in 123 s; "
            "noise sigma 0.01 of Perf (3 repeats; unmodified 0.01, 1 entries 0.00141), "
            "1 entries beyond 2 sigma") in text
    assert "read relative to" not in text  # no paired_offset recorded
    paired = dataclasses.replace(report, importance={**level.as_dict(), "paired_offset": -0.0054})
    assert ("1 entries beyond 2 sigma; read relative to the unmodified network through the same protocol "
            "(ln I offset -0.0054)") in str(paired)
    metrics = report.metrics()
    assert metrics["layermerge/importance_sigma"] == pytest.approx(0.01)
    assert metrics["layermerge/importance_distinguishable"] == 1.0
    assert metrics["layermerge/importance_build_seconds"] == pytest.approx(123.4)
    assert "not built here" in str(LayerMergeReport(budget=0.7, method="layermerge", target="model", num_layers=2,
                                                    layer_names=["a", "b"], segments=[(0, 2, 1)],
                                                    kept_activations=[], kept_convs=[1], irreducible=[1]))


def test_subrun_trains_a_target_given_in_eval_mode() -> None:
    """Lightning keeps module modes at fit start; a sub-run must still train BatchNorm normally."""
    runner = _runner(ImportanceSettings(method="finetune",
                                        steps=3, batch_size=16, lr=0.05, bn_batches=0, noise_repeats=0))
    original = LitTinyVal().model.eval()
    trained = runner.finetune(copy.deepcopy(original))
    bn = trained.stem[1]
    assert int(bn.num_batches_tracked) == 3  # statistics updated by the 3 training steps
    assert not torch.equal(bn.running_mean, original.stem[1].running_mean)


def test_runner_recalibrate_for_the_users_fine_tuning() -> None:
    runner = _runner(ImportanceSettings(bn_batches=3, batch_size=16))
    target = LitTinyVal().model.eval()
    before = target.stem[1].running_mean.clone()
    assert runner.recalibrate(target) == 3
    assert int(target.stem[1].num_batches_tracked) == 3 and not torch.equal(target.stem[1].running_mean, before)
    assert not target.training  # mode kept


def test_callback_records_the_noise_level_in_its_state(tmp_path) -> None:
    """End to end: the planner measures sigma (cached with the table) and hands it to the state."""
    import dataclasses

    from lm_helpers import FAST_IMPORTANCE, FAST_LATENCY, pretrained

    from lightning_layermerge import LayerMergeCallback

    settings = dataclasses.replace(FAST_IMPORTANCE, noise_repeats=2)
    state = pretrained(LitTinyVal(), steps=30).state_dict()
    train, val = loaders()
    records = []
    for _ in range(2):
        module = LitTinyVal()
        module.load_state_dict(state)
        cb = LayerMergeCallback(budget=0.8, importance=settings, latency=FAST_LATENCY, cache_dir=str(tmp_path),
                                verbose=False)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quiet_trainer(max_steps=1, callbacks=[cb]).fit(module, train_dataloaders=train, val_dataloaders=val)
        records.append(cb.state_dict()["importance"])
    first = records[0]
    assert first["entries"] == sum(1 for v in cb.importance_table.values() if v > 0)
    assert first["steps_per_entry"] == 2 and first["score_samples"] == 120  # the whole validation set
    assert len(first["perfs"]) == 2 and first["sigma_original"] == pytest.approx(statistics.stdev(first["perfs"]))
    assert first["build_seconds"] > 0 and 0 <= first["distinguishable"] <= first["entries"]
    assert len(first["entry_perfs"]) == 2 and all(len(v) == 2 for v in first["entry_perfs"].values())
    assert first["sigma"] == pytest.approx(max(first["sigma_original"], first["sigma_entries"]))
    assert records[1]["perfs"] == first["perfs"]  # the repeats come from the cache the second time
    assert records[1]["entry_perfs"] == first["entry_perfs"]
    assert len(list(tmp_path.glob("importance-noise-*.json"))) == 1
