"""LayerMergeCallback inside real (tiny) Lightning fits on real digit data."""

from __future__ import annotations

import dataclasses

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import lightning.pytorch as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lm_helpers import (FAST_IMPORTANCE, FAST_LATENCY, LitTiny, LitTinyVal, TinyNet, loaders, one_thread, pretrained,
                        quiet_trainer)
from torch import fx

from lightning_layermerge import (Distillation, ImportanceSettings, LayerMergeCallback, LayerMergeReport, Plan,
                                  build_latency_table, merge, prune, restore_pruned, trace)
from lightning_layermerge.fit.importance_settings import TRAIN_LOSS_KEY
from lightning_layermerge.fit.planner import Planner
from lightning_layermerge.fit.subruns import SubRunner

TESTS = Path(__file__).parent


one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


class KeepPruned(Callback):
    """Remembers the fine-tuned pruned target (before the merge in on_fit_end)."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.pruned = copy.deepcopy(pl_module.model)


@pytest.fixture(scope="module")
def trained_state() -> dict:
    """Weights of a briefly trained LitTiny, shared so the table caches can be reused."""
    return pretrained(LitTinyVal(), steps=30).state_dict()


def make(cls=LitTinyVal, state=None, **kwargs) -> L.LightningModule:
    module = cls(**kwargs)
    if state is not None:
        module.load_state_dict(state)
    return module


def callback(cache_dir, **kwargs) -> LayerMergeCallback:
    defaults = dict(budget=0.7, importance=FAST_IMPORTANCE, latency=FAST_LATENCY, cache_dir=str(cache_dir),
                    verbose=False)
    defaults.update(kwargs)
    return LayerMergeCallback(**defaults)


class CountFinetunes:
    """Counts importance sub-runs, calibration timings and table-cache writes (to prove nothing was
    measured): ``counting(callback)`` gives the callback a planner subclass that counts."""

    def __init__(self, cache_dir: Path | None = None) -> None:
        self.finetunes = self.calibrations = 0
        self.cache_dir = cache_dir
        self.before = self.snapshot()
        counts = self

        class Runner(SubRunner):
            def finetune(self, *args, **kwargs):
                counts.finetunes += 1
                return super().finetune(*args, **kwargs)

        class CountingPlanner(Planner):
            runner_type = Runner

            def calibrate(self, *args, **kwargs):
                counts.calibrations += 1
                return super().calibrate(*args, **kwargs)

        self.planner_type = CountingPlanner

    def counting(self, cb: LayerMergeCallback) -> LayerMergeCallback:
        cb.planner_type = self.planner_type
        return cb

    def snapshot(self) -> dict[str, bytes]:
        if self.cache_dir is None or not self.cache_dir.exists():
            return {}
        return {p.name: p.read_bytes() for p in self.cache_dir.iterdir()}

    @property
    def cache_unchanged(self) -> bool:
        return self.snapshot() == self.before


def assert_merged_equals_pruned(module: L.LightningModule, keep: KeepPruned) -> None:
    merged = module.model
    assert isinstance(merged, fx.GraphModule) and merged.meta["layermerge"]["merged"]
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        want = keep.pruned.eval()(x)
        got = merged(x)
    assert torch.allclose(want, got, rtol=1e-4, atol=1e-5), float((want - got).abs().max())


# --------------------------------------------------------------------------- end-to-end


def test_module_without_validation_step_uses_training_loss(tmp_path: Path, trained_state: dict) -> None:
    module = make(LitTiny, trained_state)
    original = copy.deepcopy(module.model)
    cb, keep = callback(tmp_path / "cache"), KeepPruned()
    train, _ = loaders()
    logger = CSVLogger(tmp_path, name="logs")
    quiet_trainer(max_steps=3, callbacks=[cb, keep], logger=logger).fit(module, train_dataloaders=train)

    report = cb.report
    assert isinstance(report, LayerMergeReport)
    assert report.monitor == TRAIN_LOSS_KEY and report.mode == "min"
    assert report.merged and report.merge_max_error < 1e-5
    assert_merged_equals_pruned(module, keep)
    # The plan is the DP's answer at the table budget it was solved for (calibration may move that budget
    # away from 0.7 x table total after timing candidates); the report's numbers are consistent with the plan.
    table = cb.latency_table
    assert report.predicted_ms == pytest.approx(table.predicted_ms(cb.plan.keys))
    solved_at = [c["table_budget_ms"] for c in cb.calibration if tuple(c["segments"]) == tuple(cb.plan.keys)]
    chain_budget = solved_at[0] if solved_at else table.budget_for(0.7)
    assert report.predicted_ms - table.outside_ms <= chain_budget * (1 + 1e-9)
    assert report.measured_ms > 0 and report.measured_original_ms > 0
    assert report.table_unreliable == len(table.unreliable)  # the table's flag reaches the report
    assert report.segments == cb.plan.keys
    assert report.params_before == sum(p.numel() for p in original.parameters())
    assert report.params_after == sum(p.numel() for p in module.model.parameters())
    assert math.isfinite(report.metric_before) and math.isfinite(report.metric_after)
    # Importance entries are exp(Perf - Perf_original) for every legal segment.
    assert set(cb.importance_table) == {s.key for s in cb.chain.segments}
    assert all(v > 0 for v in cb.importance_table.values())
    # Logged to the trainer's logger; PNG + JSON in the log directory.
    log_dir = Path(logger.log_dir)
    logged = (log_dir / "metrics.csv").read_text()
    for name in ("layermerge/predicted_speedup", "layermerge/measured_speedup", "layermerge/metric_after"):
        assert name in logged, name
    assert (log_dir / "layermerge_report.png").stat().st_size > 1000
    assert json.loads((log_dir / "layermerge_report.json").read_text())["segments"] == [list(k) for k in cb.plan.keys]
    # The module is clean again: no patched hooks left on the instance.
    assert "training_step" not in vars(module) and "on_load_checkpoint" not in vars(module)


def test_example_input_array_validation_loss_and_distillation(tmp_path: Path, trained_state: dict) -> None:
    module = make(LitTinyVal, trained_state, example=True)
    teacher_weights = copy.deepcopy(module.model.state_dict())
    distill = Distillation(alpha=0.5, temperature=2.0)
    cb, keep = callback(tmp_path / "cache", distill=distill), KeepPruned()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    seen = {}

    class GrabTeacher(Callback):
        def on_train_end(self, trainer, pl_module):
            seen["teacher"] = cb._teacher
            seen["in_module"] = any(m is cb._teacher for m in pl_module.modules())

    train, val = loaders()
    trainer = quiet_trainer(max_steps=3, callbacks=[cb, keep, ckpt, GrabTeacher()], enable_checkpointing=True,
                            default_root_dir=tmp_path, limit_val_batches=1)
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)

    # Traced with example_input_array (batch 4), not with a training batch (batch 32).
    assert cb.chain.input_shapes[0] == (4, 1, 8, 8)
    assert cb.report.monitor == "val_loss"
    assert_merged_equals_pruned(module, keep)
    # The KD term was added and logged; the teacher was never trained and is not in checkpoints.
    assert trainer.callback_metrics["layermerge/kd_loss"] > 0
    teacher = seen["teacher"]
    assert not seen["in_module"] and not teacher.training  # not a submodule: no optimizer, DDP or checkpoint
    assert all(not p.requires_grad for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_weights[name]), name
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    n_student = sum(1 for k in saved["state_dict"] if k.startswith("model."))
    assert n_student == len(keep.pruned.state_dict())  # only the student's tensors
    assert saved["layermerge"]["plan"] == cb.plan.to_dict()
    assert "training_step" not in vars(module)


def test_distillation_changes_the_loss_by_alpha_times_kd(tmp_path: Path, trained_state: dict) -> None:
    """The loss Lightning back-propagates is the user's loss + alpha * KD (checked on one step)."""
    seen = {}

    class Spy(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if batch_idx == 0:
                seen["loss"] = float(outputs["loss"])
                seen["kd"] = float(trainer.callback_metrics["layermerge/kd_loss"])
                seen["train"] = float(trainer.callback_metrics["train_loss"])

    module = make(LitTiny, trained_state)
    cb = callback(tmp_path / "cache", distill=Distillation(alpha=2.0, temperature=3.0))
    train, _ = loaders()
    quiet_trainer(max_steps=1, callbacks=[cb, Spy()], default_root_dir=tmp_path).fit(module, train_dataloaders=train)
    assert seen["kd"] > 0
    assert seen["loss"] == pytest.approx(seen["train"] + 2.0 * seen["kd"], rel=1e-5)


@pytest.mark.parametrize("method", ["layermerge", "layeronly", "depth"])
def test_methods(method: str, tmp_path_factory: pytest.TempPathFactory, trained_state: dict) -> None:
    cache = tmp_path_factory.getbasetemp() / "shared-cache"  # tables do not depend on the method
    module = make(LitTiny, trained_state)
    cb, keep = callback(cache, method=method, budget=0.8), KeepPruned()
    train, _ = loaders()
    quiet_trainer(max_steps=2, callbacks=[cb, keep]).fit(module, train_dataloaders=train)
    plan, chain = cb.plan, cb.chain
    L_ = chain.num_layers
    if method == "layeronly":  # activations untouched
        assert plan.kept_activations == frozenset(range(1, L_))
    if method == "depth":  # every conv kept
        assert plan.kept_convs == frozenset(range(1, L_ + 1))
    assert cb.report.method == method
    assert_merged_equals_pruned(module, keep)


def test_relative_importance_divides_perf_by_the_original(tmp_path_factory: pytest.TempPathFactory,
                                                           trained_state: dict) -> None:
    """ImportanceSettings(relative=True): log I = (Perf - Perf0) / |Perf0| (the official DDPM table)."""
    import dataclasses

    cache = tmp_path_factory.getbasetemp() / "shared-cache"
    train, _ = loaders()
    tables = {}
    for relative in (False, True):
        cb = callback(cache, budget=0.8, importance=dataclasses.replace(FAST_IMPORTANCE, relative=relative))
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(make(LitTiny, trained_state), train_dataloaders=train)
        tables[relative], loss0 = cb.importance_table, cb.report.metric_before
    finite = [k for k, v in tables[False].items() if v > 0]
    assert len(finite) > 5
    for k in finite:
        assert math.log(tables[True][k]) == pytest.approx(math.log(tables[False][k]) / loss0, rel=1e-6, abs=1e-9)
    with pytest.raises(ValueError, match="relative must be True or False"):
        ImportanceSettings(relative="yes")
    with pytest.raises(ValueError, match="paired must be True or False"):
        ImportanceSettings(paired=1)


def test_objectives_share_one_importance_table_and_solve_their_own_sum(tmp_path: Path, trained_state: dict) -> None:
    """objective="exp" (the paper's sum of I) and "log" (sum of ln I) read the same cached table."""
    from lightning_layermerge.planning import dp_values, solve
    from lightning_layermerge.planning.objective import trivial_keys

    train, _ = loaders()
    cache, plans = tmp_path / "cache", {}
    for objective in ("exp", "log"):
        counts = CountFinetunes(cache)
        cb = counts.counting(callback(cache, budget=0.8, calibrate=False,
                                      importance=dataclasses.replace(FAST_IMPORTANCE, objective=objective)))
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(make(LitTiny, trained_state), train_dataloaders=train)
        plans[objective] = cb.plan
        if objective == "log":
            assert counts.finetunes == 0  # the table built for "exp" was reused
        table, importance = cb.latency_table, cb.importance_table
        # ImportanceSettings(paired=True), the default: entries read relative to the trivial ones.
        values = dp_values(importance, objective, trivial=trivial_keys(cb.chain))
        expected = solve(table.entries, values, cb.chain.num_layers, table.budget_for(0.8))
        assert sorted(cb.plan.keys) == sorted(expected.segments)


def test_merge_check_falls_back_to_the_pruned_network() -> None:
    from lightning_layermerge.fit.target import merge_checked

    model = TinyNet().eval()
    x = torch.randn(4, 1, 8, 8)
    chain = trace(model, x)
    pruned = prune(model, chain, Plan.from_segments(chain, [(0, 1, 3), (1, 3, 5), (3, 4, 3)]))
    final, merged, error = merge_checked(pruned, (x,))
    assert merged and error < 1e-5 and final is not pruned

    def broken_merge(net, **kwargs):
        out = merge(net)  # a copy: the mutation below must not reach the pruned network
        with torch.no_grad():
            next(m for m in out.modules() if isinstance(m, torch.nn.Conv2d)).weight.mul_(1.5)
        return out

    with pytest.warns(UserWarning, match="differs from the pruned one.*keeping the pruned network"):
        final, merged, error = merge_checked(pruned, (x,), merge_fn=broken_merge)
    assert final is pruned and not merged and error > 1e-3

    def failing_merge(net, **kwargs):
        raise ValueError("cannot merge this")

    with pytest.warns(UserWarning, match="merging failed.*cannot merge this"):
        final, merged, error = merge_checked(pruned, (x,), merge_fn=failing_merge)
    assert final is pruned and not merged and math.isnan(error)


# --------------------------------------------------------------------------- resume


def test_resume_mid_finetuning_rebuilds_the_pruned_architecture(tmp_path: Path, trained_state: dict) -> None:
    train, _ = loaders()
    cache = tmp_path / "cache"
    first = make(LitTiny, trained_state)
    cb1 = callback(cache)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=2, save_top_k=-1)

    class Interrupt(Callback):
        def on_train_batch_start(self, trainer, *args):
            if trainer.global_step == 2:  # after the step-2 checkpoint
                raise RuntimeError("simulated crash")

    with pytest.raises(RuntimeError, match="simulated crash"):
        quiet_trainer(max_steps=6, callbacks=[cb1, ckpt, Interrupt()], enable_checkpointing=True).fit(
            first, train_dataloaders=train)
    path = next((tmp_path / "ckpt").glob("*step=2*.ckpt"))
    saved = torch.load(path, weights_only=True)

    counts = CountFinetunes(cache)
    assert counts.before  # latency and importance tables are cached
    second = make(LitTiny, trained_state)
    cb2, keep = counts.counting(callback(cache)), KeepPruned()
    trainer = quiet_trainer(max_steps=4, callbacks=[cb2, keep])
    trainer.fit(second, train_dataloaders=train, ckpt_path=str(path))
    assert counts.finetunes == 0 and counts.calibrations == 0 and counts.cache_unchanged  # nothing measured again
    assert any(p.name.startswith("plan-") for p in cache.iterdir())  # the calibrated plan was re-used
    assert trainer.global_step == 4  # continued from step 2
    assert cb2.plan.to_dict() == saved["layermerge"]["plan"]
    assert_merged_equals_pruned(second, keep)


def test_resume_applies_the_checkpoint_plan_even_if_the_new_plan_differs(tmp_path: Path, trained_state: dict) -> None:
    train, _ = loaders()
    first = make(LitTiny, trained_state)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb1 = callback(tmp_path / "cache", budget=0.75)
    quiet_trainer(max_steps=2, callbacks=[cb1, ckpt], enable_checkpointing=True).fit(first, train_dataloaders=train)
    saved = torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=True)
    # setup applies another plan (keep everything); the checkpoint's plan must win before the strict load.
    second = make(LitTiny, trained_state)
    keep_all = Plan.keep_all(trace(second.model, torch.randn(32, 1, 8, 8))).to_dict()
    assert keep_all["segments"] != saved["layermerge"]["plan"]["segments"]
    cb2 = callback(tmp_path / "cache", plan=keep_all)
    trainer = quiet_trainer(max_steps=3, callbacks=[cb2])
    trainer.fit(second, train_dataloaders=train, ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert cb2.plan.to_dict() == saved["layermerge"]["plan"]
    assert trainer.global_step == 3


def test_plan_from_checkpoint_skips_profiling_and_restore_pruned(tmp_path: Path, trained_state: dict) -> None:
    train, _ = loaders()
    first = make(LitTiny, trained_state)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    cb1 = callback(tmp_path / "cache")
    quiet_trainer(max_steps=2, callbacks=[cb1, ckpt], enable_checkpointing=True).fit(first, train_dataloaders=train)
    last = tmp_path / "ckpt" / "last.ckpt"

    # load_from_checkpoint-style users: rebuild the pruned module and load the weights strictly.
    fresh = restore_pruned(LitTiny(), last)
    saved = torch.load(last, weights_only=True)
    for name, value in fresh.state_dict().items():
        assert torch.equal(value, saved["state_dict"][name]), name

    counts = CountFinetunes(tmp_path / "other-cache")
    second = make(LitTiny, trained_state)
    cb2 = counts.counting(callback(tmp_path / "other-cache", plan=str(last)))
    quiet_trainer(max_steps=1, callbacks=[cb2]).fit(second, train_dataloaders=train)
    assert counts.finetunes == counts.calibrations == 0 and not (tmp_path / "other-cache").exists()  # no table
    assert cb2.latency_table is None and cb2.plan.keys == cb1.plan.keys
    assert cb2.report.measured_ms > 0 and cb2.report.predicted_ms == pytest.approx(cb1.report.predicted_ms)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("budget", [0, -0.5, 1.01, float("nan")])
def test_bad_budget_is_rejected_at_construction(budget: float) -> None:
    with pytest.raises((ValueError, TypeError), match=r"budget"):
        LayerMergeCallback(budget=budget)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"method": "prune"}, "method='prune'"),
    ({"mode": "up"}, "mode='up'"),
    ({"importance": {"fraction": 0.1}}, "ImportanceSettings"),
    ({"latency": "cpu"}, "LatencySettings"),
    ({"distill": 0.5}, "Distillation"),
    ({"plan": {"segments": []}}, "plan"),
    ({"plan": "/no/such/file.ckpt"}, "no such checkpoint"),
    ({"target": ".model"}, "attribute path"),
])
def test_bad_arguments_are_rejected_at_construction(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        LayerMergeCallback(budget=0.5, **kwargs)


def assert_fit_fails_untouched(module: L.LightningModule, cb: LayerMergeCallback, message: str,
                               **fit_kwargs) -> None:
    counts = CountFinetunes()
    counts.counting(cb)
    before_obj, before = module.model, copy.deepcopy(module.state_dict())
    train, val = loaders()
    trainer = quiet_trainer(max_steps=2, callbacks=[cb])
    with pytest.raises(ValueError, match=message):
        trainer.fit(module, train_dataloaders=train, **fit_kwargs)
    assert trainer.global_step == 0 and counts.finetunes == 0
    assert module.model is before_obj
    after = module.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert "training_step" not in vars(module) and "on_load_checkpoint" not in vars(module)


def test_missing_target(tmp_path: Path) -> None:
    assert_fit_fails_untouched(LitTiny(), callback(tmp_path, target="backbone"),
                               r"no submodule 'backbone'.*children are \['model'\]")


def test_target_without_conv(tmp_path: Path) -> None:
    assert_fit_fails_untouched(LitTiny(), callback(tmp_path, target="model.fc"), "holds no nn.Conv2d")


def test_monitor_never_logged(tmp_path: Path) -> None:
    assert_fit_fails_untouched(LitTinyVal(), callback(tmp_path, monitor="val_accuracy", mode="max"),
                               r"monitor='val_accuracy'.*never logged.*'val_acc'")


def test_budget_below_smallest_achievable_latency(tmp_path: Path) -> None:
    module = LitTiny()
    x = torch.randn(32, 1, 8, 8)
    chain = trace(module.model, x)
    table = build_latency_table(module.model, chain, FAST_LATENCY, cache_dir=tmp_path, progress=False)
    # The depth method keeps every conv, so its floor is high: pick a budget just under it.
    keys = {k: -v for k, v in table.entries.items()}
    from lightning_layermerge import solve
    floor = solve(table.entries, keys, chain.num_layers, sum(table.entries.values()) + 1, "depth").latency
    budget = (table.outside_ms + 0.9 * floor) / table.total_ms
    assert 0 < budget < 1
    cb = callback(tmp_path, budget=round(budget, 4), method="depth")
    assert_fit_fails_untouched(module, cb, r"below the smallest latency method 'depth' can reach.*Raise budget to "
                               r"at least")


def test_ddp_spawn_is_refused_before_anything_runs(tmp_path: Path) -> None:
    trainer = L.Trainer(strategy="ddp_spawn", accelerator="cpu", devices=2, logger=False)
    module = LitTiny()
    cb = callback(tmp_path)
    with pytest.raises(ValueError, match=r"ddp_spawn.*Use strategy='ddp'"):
        cb.setup(trainer, module, "fit")
    assert isinstance(module.model, torch.nn.Module) and not isinstance(module.model, fx.GraphModule)


def test_default_target_and_already_compressed(tmp_path: Path, trained_state: dict) -> None:
    module = make(LitTiny, trained_state)
    cb = callback(tmp_path / "cache", target=None)
    train, _ = loaders()
    quiet_trainer(max_steps=1, callbacks=[cb]).fit(module, train_dataloaders=train)
    assert cb.report.target == "model"
    merged = module.model
    # A second fit on the compressed module fine-tunes it as it is (no second compression).
    cb2 = callback(tmp_path / "cache")
    with pytest.warns(UserWarning, match="already compressed"):
        quiet_trainer(max_steps=1, callbacks=[cb2]).fit(module, train_dataloaders=train)
    assert module.model is merged and cb2.report is None


# --------------------------------------------------------------------------- DDP


def test_ddp_two_processes_get_the_same_plan(tmp_path: Path) -> None:
    """Importance entries are split across 2 gloo ranks and gathered; both ranks solve the same plan."""
    proc = subprocess.run([sys.executable, str(TESTS / "ddp_script.py"), str(tmp_path)], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert ranks[0]["plan"] == ranks[1]["plan"]
    assert ranks[0]["architecture"] == ranks[1]["architecture"]
    assert ranks[0]["weights"] == ranks[1]["weights"]  # DDP kept the fine-tuned weights in sync
    assert ranks[0]["importance"] == ranks[1]["importance"]  # every rank holds the gathered table
    shard0, shard1 = (set(map(tuple, r["shard"])) for r in ranks)
    assert shard0 and shard1 and not shard0 & shard1  # the work was split
    assert shard0 | shard1 == set(map(tuple, map(tuple, (k for k, _ in ranks[0]["importance"]))))
    assert ranks[0]["merged"] and ranks[1]["merged"]
    assert ranks[0]["measured"] and not ranks[1]["measured"]  # latency measured once, on rank 0
    assert ranks[1]["rank_zero_only"] == 1  # the quiet sub-trainers did not reset rank-zero logging


@pytest.mark.slow
def test_real_ddp_spawn_run_is_refused(tmp_path: Path) -> None:
    """The same refusal as above, in a real 2-process ddp_spawn fit (slow: spawns two interpreters)."""
    proc = subprocess.run([sys.executable, str(TESTS / "ddp_script.py"), str(tmp_path), "--spawn"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "spawn.json").read_text())
    assert "strategy='ddp_spawn'" in result["error"] and "Use strategy='ddp'" in result["error"]
    assert result["untouched"] and result["steps"] == 0
