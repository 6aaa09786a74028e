"""LayerMergeCallback under ordinary Lightning habits: resume with a fresh module, checkpoints of
the compressed fit loaded the Lightning way, the user's own schedulers in sub-runs, and errors
raised before any table is built."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from lm_helpers import (FAST_LATENCY, LitEval, LitManual, LitNeedsDatamodule, LitOneCycle, LitTiny, digits,
                        loaders, one_thread, pretrained, quiet_trainer)
from torch import fx
from torch.utils.data import DataLoader, TensorDataset

from lightning_layermerge import Distillation, LatencyTable, LayerMergeCallback, Plan, build_latency_table
from lightning_layermerge import restore_pruned, solve, trace
from lightning_layermerge.fit.planner import Planner
from lightning_layermerge import LayerMergeReport
from lightning_layermerge.fit.resume import TEACHER_KEY
from lightning_layermerge import ImportanceSettings

TESTS = Path(__file__).parent
#: Sub-runs that use the module's own configure_optimizers (lr=None).
OWN_OPTIMIZER = ImportanceSettings(method="finetune", fraction=0.05, steps=2, batch_size=16)
FAST = ImportanceSettings(method="finetune", fraction=0.05, steps=2, batch_size=16, lr=0.01)

one_thread = pytest.fixture(autouse=True, scope="module")(one_thread)


@pytest.fixture(scope="module")
def trained_state() -> dict:
    return pretrained(LitEval(), steps=30).state_dict()


def make(cls=LitEval, state=None, **kwargs):
    module = cls(**kwargs)
    if state is not None:
        module.load_state_dict(state)
    return module


def callback(cache_dir, **kwargs) -> LayerMergeCallback:
    defaults = dict(budget=0.7, importance=FAST, latency=FAST_LATENCY, cache_dir=str(cache_dir), verbose=False)
    defaults.update(kwargs)
    return LayerMergeCallback(**defaults)


class KeepPruned(Callback):
    """The fine-tuned pruned target, before the merge in on_fit_end."""

    def on_train_end(self, trainer, pl_module) -> None:
        self.pruned = copy.deepcopy(pl_module.model)


class CountingCallback(LayerMergeCallback):
    """Counts planning runs (table builds) by subclassing, not patching."""

    plans = 0

    def _plan(self, *args, **kwargs):
        type(self).plans += 1
        return super()._plan(*args, **kwargs)


def fixed_loader() -> DataLoader:
    """4 batches per epoch, same order every epoch (resume can be compared exactly)."""
    ds = digits(128)
    return DataLoader(TensorDataset(*ds[:]), batch_size=32, shuffle=False)


def a_plan(module) -> dict:
    """A plan that removes the block's middle activation and the head conv."""
    chain = trace(module.model, torch.randn(32, 1, 8, 8))
    keys = [s.key for s in chain.segments]
    pick = next(k for k in keys if k[0] == 1 and k[1] == 3)
    return Plan.from_segments(chain, [k for k in keys if k[1] - k[0] == 1 and k[1] <= 1] + [pick]
                              + [next(k for k in keys if k[:2] == (3, 4) and k[2] == 1)]).to_dict()


# --------------------------------------------------------------------------- 1. resume with a fresh module


@pytest.mark.parametrize("distill", [None, Distillation(alpha=1.0)], ids=["no-kd", "kd"])
def test_resume_with_a_fresh_module_equals_an_uninterrupted_run(tmp_path: Path, trained_state: dict,
                                                                distill: Distillation | None) -> None:
    plan = a_plan(make(LitTiny, trained_state))
    loader = fixed_loader()

    # Uninterrupted: 2 epochs.
    whole, keep_whole = make(LitTiny, trained_state), KeepPruned()
    quiet_trainer(max_epochs=2, max_steps=-1, callbacks=[callback(tmp_path, plan=plan, distill=distill),
                                                         keep_whole]).fit(whole, train_dataloaders=loader)

    # Interrupted after epoch 1, resumed with a freshly built module (other random weights) and a
    # fresh callback that is given no plan: everything must come from the checkpoint.
    first = make(LitTiny, trained_state)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(max_epochs=1, max_steps=-1, enable_checkpointing=True,
                  callbacks=[callback(tmp_path, plan=plan, distill=distill), ckpt]).fit(first, train_dataloaders=loader)
    last = tmp_path / "ckpt" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert (TEACHER_KEY in saved) == (distill is not None)

    fresh = LitTiny(seed=123)
    assert not torch.equal(fresh.model.stem[0].weight, make(LitTiny, trained_state).model.stem[0].weight)
    CountingCallback.plans = 0
    resumed_cb, keep = CountingCallback(budget=0.7, importance=FAST, latency=FAST_LATENCY, cache_dir=False,
                                        verbose=False, distill=distill), KeepPruned()
    trainer = quiet_trainer(max_epochs=2, max_steps=-1, callbacks=[resumed_cb, keep])
    trainer.fit(fresh, train_dataloaders=loader, ckpt_path=str(last))
    assert CountingCallback.plans == 0 and resumed_cb.latency_table is None and resumed_cb.importance_table is None
    assert resumed_cb.plan.to_dict() == plan and trainer.global_step == 8
    got, want = keep.pruned.state_dict(), keep_whole.pruned.state_dict()
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-6, msg=name)
    assert resumed_cb.report is not None and resumed_cb.report.merged


def test_resume_with_distill_but_no_teacher_in_the_checkpoint_stops_before_training(tmp_path: Path,
                                                                                   trained_state: dict) -> None:
    plan = a_plan(make(LitTiny, trained_state))
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    quiet_trainer(max_steps=2, enable_checkpointing=True, callbacks=[callback(tmp_path, plan=plan), ckpt]).fit(
        make(LitTiny, trained_state), train_dataloaders=fixed_loader())
    fresh = LitTiny(seed=7)
    before = copy.deepcopy(fresh.state_dict())
    trainer = quiet_trainer(max_steps=4, callbacks=[callback(tmp_path, distill=Distillation())])
    with pytest.raises(ValueError, match=r"holds no teacher weights.*Load the original weights into module.model"):
        trainer.fit(fresh, train_dataloaders=fixed_loader(), ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert trainer.global_step == 0 and not isinstance(fresh.model, fx.GraphModule)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in before.items())

    # With the original weights in the module, the teacher is recovered from them.
    original = make(LitTiny, trained_state)
    cb = callback(tmp_path, distill=Distillation())
    quiet_trainer(max_steps=4, callbacks=[cb]).fit(original, train_dataloaders=fixed_loader(),
                                                   ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert cb.report is not None


# --------------------------------------------------------------------------- 2. checkpoints load the Lightning way


@pytest.fixture(scope="module")
def compressed_fit(tmp_path_factory: pytest.TempPathFactory, trained_state: dict) -> dict:
    """A fit with ModelCheckpoint(monitor='val_loss'): its module, trainer, callback and best checkpoint."""
    tmp = tmp_path_factory.mktemp("ckpt-fit")
    train, val = loaders()
    module = make(LitEval, trained_state)
    cb = callback(tmp / "cache", plan=a_plan(module))
    ckpt = ModelCheckpoint(dirpath=tmp / "ckpt", monitor="val_loss", save_top_k=1)
    trainer = quiet_trainer(max_steps=6, val_check_interval=2, enable_checkpointing=True, callbacks=[cb, ckpt])
    trainer.fit(module, train_dataloaders=train, val_dataloaders=val)
    return {"module": module, "trainer": trainer, "callback": cb, "best": ckpt.best_model_path, "val": val}


def expected_from(best: str, x: torch.Tensor) -> torch.Tensor:
    reference = restore_pruned(LitEval(), best, merged=True).eval()
    with torch.no_grad():
        return reference(x)


def test_trainer_test_validate_predict_with_best_checkpoint(compressed_fit: dict) -> None:
    module, trainer, val = compressed_fit["module"], compressed_fit["trainer"], compressed_fit["val"]
    best = compressed_fit["best"]
    assert best and isinstance(module.model, fx.GraphModule) and module.model.meta["layermerge"]["merged"]
    x, y = next(iter(val))
    want = expected_from(best, x)

    results = trainer.test(module, dataloaders=val, ckpt_path="best", verbose=False)
    assert module.model.meta["layermerge"]["merged"]  # the merged network was evaluated
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(x), want, rtol=1e-4, atol=1e-5)
    xs, ys = (torch.cat(t) for t in zip(*val))
    acc = float((expected_from(best, xs).argmax(1) == ys).float().mean())
    assert results[0]["test_acc"] == pytest.approx(acc, abs=1e-6)

    trainer.validate(module, dataloaders=val, ckpt_path=best, verbose=False)
    predictions = trainer.predict(module, dataloaders=val, ckpt_path=best)
    torch.testing.assert_close(predictions[0], want, rtol=1e-4, atol=1e-5)


def test_load_from_checkpoint_in_a_fresh_process(compressed_fit: dict, tmp_path: Path) -> None:
    best = compressed_fit["best"]
    x = next(iter(compressed_fit["val"]))[0]
    torch.save(x, tmp_path / "x.pt")
    torch.save(expected_from(best, x), tmp_path / "want.pt")
    script = f"""
import torch
from lm_helpers import LitEval
from lightning_layermerge import merge
module = LitEval.load_from_checkpoint({best!r}).eval()
assert module.model.meta["layermerge"]["merged"] is False  # the fine-tuned pruned network
merged = merge(module.model)
x, want = torch.load({str(tmp_path / 'x.pt')!r}), torch.load({str(tmp_path / 'want.pt')!r})
with torch.no_grad():
    torch.testing.assert_close(module(x), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(merged(x), want, rtol=1e-4, atol=1e-5)
print("ok", sum(p.numel() for p in merged.parameters()))
"""
    # Run from tests/ (the first entry of a ``-c`` script's path) so that lm_helpers imports.
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=TESTS)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.startswith("ok")


def test_load_from_checkpoint_rebuilds_a_plan_that_keeps_every_conv(tmp_path: Path, trained_state: dict) -> None:
    """A plan that only removes activations leaves the original's parameter names: the loaded
    module must still get the pruned architecture (the original with its activations computes
    something else)."""
    train, val = loaders()
    module = make(LitEval, trained_state)
    chain = trace(module.model, torch.randn(32, 1, 8, 8))
    keys = [s.key for s in chain.segments if len(s.convs) == s.j - s.i]  # every conv of the segment kept
    merged_pair = next(k for k in keys if k[1] - k[0] >= 2)
    plan = Plan.from_segments(chain, [k for k in Plan.keep_all(chain).keys if k[1] <= merged_pair[0]] + [merged_pair]
                              + [k for k in Plan.keep_all(chain).keys if k[0] >= merged_pair[1]])
    assert plan.kept_convs == frozenset(range(1, chain.num_layers + 1)) and len(plan.kept_activations) < chain.num_layers - 1
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val_loss", save_top_k=1)
    quiet_trainer(max_steps=2, val_check_interval=2, enable_checkpointing=True,
                  callbacks=[callback(tmp_path / "cache", plan=plan.to_dict()), ckpt]).fit(
        module, train_dataloaders=train, val_dataloaders=val)
    loaded = LitEval.load_from_checkpoint(ckpt.best_model_path).eval()
    assert isinstance(loaded.model, fx.GraphModule) and loaded.model.meta["layermerge"]["merged"] is False
    x = next(iter(val))[0]
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected_from(ckpt.best_model_path, x), rtol=1e-4, atol=1e-5)


def test_test_with_a_fresh_callback_on_an_already_merged_module_names_the_call_that_works(
        compressed_fit: dict) -> None:
    # The module's target is merged and this new callback never saw the original: a clear error.
    module = copy.deepcopy(compressed_fit["module"])
    trainer = quiet_trainer(callbacks=[callback(compressed_fit["callback"].cache_dir)])
    with pytest.raises(ValueError, match=r"restore_pruned\(MyModule\(\.\.\.\), path, merged=True\)"):
        trainer.test(module, dataloaders=compressed_fit["val"], ckpt_path=compressed_fit["best"], verbose=False)


# --------------------------------------------------------------------------- 3. the user's own scheduler


def test_one_cycle_lr_over_trainer_max_epochs_works_in_sub_runs(tmp_path: Path, trained_state: dict) -> None:
    module = make(LitOneCycle, trained_state)
    train, _ = loaders()
    cb = callback(tmp_path, importance=OWN_OPTIMIZER, calibrate=False)
    quiet_trainer(max_epochs=1, max_steps=-1, callbacks=[cb]).fit(module, train_dataloaders=train)
    assert cb.importance_table and all(v > float("-inf") for v in cb.importance_table.values())
    assert cb.report is not None and cb.report.merged


def test_a_module_whose_optimizer_needs_the_datamodule_fails_before_any_table(tmp_path: Path) -> None:
    module = LitNeedsDatamodule()
    before_obj, before = module.model, copy.deepcopy(module.state_dict())
    train, _ = loaders()
    trainer = quiet_trainer(max_steps=2, callbacks=[callback(tmp_path / "cache", importance=OWN_OPTIMIZER)])
    with pytest.raises(ValueError, match=r"failed in the module's own code: AttributeError.*"
                                         r"test_callback_lightning.py|lm_helpers.py.*ImportanceSettings\(method='finetune', lr=") as err:
        trainer.fit(module, train_dataloaders=train)
    assert "lm_helpers.py" in str(err.value) and "configure_optimizers" in str(err.value)
    assert not (tmp_path / "cache").exists()  # no latency table measured
    assert module.model is before_obj and all(torch.equal(module.state_dict()[k], v) for k, v in before.items())


# --------------------------------------------------------------------------- 4. errors before any work


def test_manual_optimization_with_distill_fails_before_any_table_and_a_retry_works(tmp_path: Path) -> None:
    module = LitManual()
    before_obj = module.model
    train, _ = loaders()
    trainer = quiet_trainer(max_steps=2, callbacks=[callback(tmp_path / "cache", distill=Distillation())])
    with pytest.raises(ValueError, match="needs automatic optimization"):
        trainer.fit(module, train_dataloaders=train)
    assert module.model is before_obj and not (tmp_path / "cache").exists()
    assert "training_step" not in vars(module) and "on_load_checkpoint" not in vars(module)
    cb = callback(tmp_path / "cache")  # the same module, without distill: compressed and merged
    quiet_trainer(max_steps=2, callbacks=[cb]).fit(module, train_dataloaders=train)
    assert cb.report is not None and cb.report.merged and module.model.meta["layermerge"]["merged"]


def table_and_floor(module, cache: Path) -> tuple:
    chain = trace(module.model, torch.randn(32, 1, 8, 8))
    table = build_latency_table(module.model, chain, FAST_LATENCY, cache_dir=cache, progress=False)
    fastest = {k: -v for k, v in table.entries.items()}
    floor = solve(table.entries, fastest, chain.num_layers, sum(table.entries.values()) + 1).latency
    return chain, table, fastest, floor


def planner(budget: float) -> Planner:
    return Planner(budget=budget, method="layermerge", monitor=None, mode="min", importance=FAST,
                   latency=FAST_LATENCY, calibrate=False, cache_dir=None, verbose=False)


def test_a_budget_infeasible_only_after_discretisation_is_solved_at_a_finer_resolution() -> None:
    # A table whose every entry costs something (no free identity segments), so rounding each of
    # the floor plan's segments up to whole units of budget/1000 overshoots a budget just above it.
    widths = [1, 4, 8, 12, 16, 20, 24]  # every conv changes the width: all irreducible, one segment each
    layers = [m for a, b in zip(widths, widths[1:]) for m in (torch.nn.Conv2d(a, b, 3, padding=1), torch.nn.ReLU())]
    chain = trace(torch.nn.Sequential(*layers), torch.randn(2, 1, 8, 8))
    entries = {s.key: 1.0 if s.key[1] - s.key[0] == 1 else 10.0 for s in chain.segments}  # floor: 6 segments
    table = LatencyTable(entries=entries, total_ms=10.0, chain_ms=sum(entries[s] for s in Plan.keep_all(chain).keys),
                         settings=FAST_LATENCY)
    fastest = {k: -v for k, v in entries.items()}
    floor = solve(entries, fastest, chain.num_layers, sum(entries.values())).latency
    infeasible = [eps for eps in (1e-3, 5e-4, 3e-4, 2e-4, 1e-4)
                  if _fails(lambda: solve(entries, fastest, chain.num_layers, floor * (1 + eps)))]
    assert infeasible, "no budget above the floor is infeasible at the default grid: the test lost its premise"
    budget_ms = floor * (1 + infeasible[-1])
    fraction = (table.outside_ms + budget_ms) / table.total_ms
    p = planner(fraction)
    assert p.budget_ms(table, chain) == pytest.approx(budget_ms) and p.resolution > 1000
    segments = p.solve(table, {k: 0.0 for k in entries}, chain, budget_ms)
    assert sum(entries[k] for k in segments) <= budget_ms + 1e-9


def _fails(call) -> bool:
    try:
        call()
    except ValueError as err:
        return "after discretisation" in str(err)
    return False


def test_an_unreachable_budget_names_a_budget_that_works(tmp_path: Path, trained_state: dict) -> None:
    module = make(LitTiny, trained_state)
    chain, table, _, floor = table_and_floor(module, tmp_path)
    too_low = (table.outside_ms + 0.9 * floor) / table.total_ms
    with pytest.raises(ValueError, match=r"Raise budget to at least (\d\.\d+)") as err:
        planner(too_low).budget_ms(table, chain)
    suggested = float(err.value.args[0].rsplit("at least ", 1)[1].split()[0])
    assert suggested > too_low
    works = planner(suggested)
    budget_ms = works.budget_ms(table, chain)  # no error: the suggestion is solvable
    assert budget_ms >= floor and works.resolution >= 1000


def test_a_very_low_budget_warns() -> None:
    with pytest.warns(UserWarning, match=r"budget=0.1\).*10.0x faster"):
        LayerMergeCallback(budget=0.1)


# --------------------------------------------------------------------------- 5. smaller points


def test_second_fit_refreshes_the_report_and_channels_last_survives(tmp_path: Path, trained_state: dict) -> None:
    module = make(LitTiny, trained_state)
    module.model.to(memory_format=torch.channels_last)
    train, _ = loaders()
    logger = CSVLogger(tmp_path / "logs")
    cb = callback(tmp_path / "cache", plan=a_plan(module))
    quiet_trainer(max_steps=1, callbacks=[cb], logger=logger).fit(module, train_dataloaders=train)
    first = cb.report
    assert first is not None
    convs = [m for m in module.model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(c.weight.is_contiguous(memory_format=torch.channels_last) for c in convs)
    hparams = (Path(logger.log_dir) / "hparams.yaml").read_text()
    assert "layermerge" in hparams and "segments" in hparams  # the plan reached the logger
    with pytest.warns(UserWarning, match="already compressed"):
        quiet_trainer(max_steps=1, callbacks=[cb]).fit(module, train_dataloaders=train)
    assert cb.report is None  # not the first fit's report


def test_true_precision_sets_the_timing_dtype(tmp_path: Path, trained_state: dict) -> None:
    module = make(LitTiny, trained_state)
    cb = callback(tmp_path / "cache", plan=a_plan(module))
    quiet_trainer(max_steps=1, callbacks=[cb], precision="64-true").fit(module, train_dataloaders=loaders()[0])
    assert cb.report.merged and next(module.model.parameters()).dtype == torch.float64
    assert cb.report.latency_settings["dtype"] == "float64" and cb.report.latency_settings["precision"] == "64-true"
    assert "precision=64-true" in str(cb.report)


def test_report_explains_parameter_growth() -> None:
    report = LayerMergeReport(budget=0.5, method="layermerge", target="model", num_layers=2, layer_names=["a", "b"],
                              segments=[(0, 2, 3)], kept_activations=[], kept_convs=[1, 2], irreducible=[],
                              params_before=100, params_after=150)
    assert "more parameters, yet faster" in str(report)
    report.params_after = 90
    assert "more parameters" not in str(report)


# --------------------------------------------------------------------------- checkpoints of earlier versions

#: Written by the callback at commit 8bead90 (state version 1, before the teacher weights and the
#: original-weights fingerprint were stored): LitTiny, budget 0.7, 2 steps, ModelCheckpoint(save_last).
OLD_CHECKPOINT = TESTS / "fixtures" / "callback_v1_8bead90.pt"


def test_a_checkpoint_of_the_first_callback_version_resumes_and_restores(tmp_path: Path) -> None:
    from lightning_layermerge.fit.resume import read_checkpoint, state_from_checkpoint

    saved = read_checkpoint(OLD_CHECKPOINT)  # plain data: weights_only=True reads it
    state = state_from_checkpoint(saved)
    assert state["version"] == 1 and "original_weights" not in state and TEACHER_KEY not in saved

    restored = restore_pruned(LitTiny(), OLD_CHECKPOINT)
    assert all(torch.equal(restored.state_dict()[k], v) for k, v in saved["state_dict"].items())

    CountingCallback.plans = 0
    cb = CountingCallback(budget=0.7, importance=FAST, latency=FAST_LATENCY, cache_dir=False, verbose=False)
    trainer = quiet_trainer(max_steps=4, callbacks=[cb])
    trainer.fit(LitTiny(seed=3), train_dataloaders=fixed_loader(), ckpt_path=str(OLD_CHECKPOINT))
    assert CountingCallback.plans == 0 and trainer.global_step == 4
    assert cb.plan.to_dict() == state["plan"] and cb.report is not None and cb.report.merged
