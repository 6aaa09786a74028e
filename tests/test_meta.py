"""SurgeryMeta (the record ``gm.meta["layermerge"]``), fold_batchnorm and rebuild_compressed."""

from __future__ import annotations

import random

import pytest
import torch
from torch import nn

from helpers import random_plan, randomize_batchnorm, rel_err
from lightning_layermerge import Plan, fold_batchnorm, merge, prune, save_compressed, trace
from lightning_layermerge.surgery.meta import MergeRegion, SurgeryMeta, attach_input_spec, example_from_spec
from lightning_layermerge.surgery.rebuild import rebuild_compressed


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 4, 1)).eval()


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = randomize_batchnorm(_net())
    x = torch.randn(2, 3, 8, 8)
    chain = trace(model, x)
    plan = random_plan(chain, random.Random(3))
    return model, x, chain, plan


def test_prune_writes_the_record_and_merge_marks_it_merged(setup) -> None:
    model, x, chain, plan = setup
    pruned = prune(model, chain, plan)
    record = SurgeryMeta.of(pruned)
    assert record.plan == plan.to_dict() and not record.merged and record.inputs is None
    assert [(r.i, r.j, r.k) for r in record.regions] == [s.key for s in plan.segments]
    assert all(isinstance(r, MergeRegion) for r in record.regions)
    assert isinstance(pruned.meta["layermerge"], dict)  # stored as plain data
    merged = merge(pruned)
    assert SurgeryMeta.of(merged).merged and not SurgeryMeta.of(pruned).merged  # merge works on a copy
    with pytest.raises(ValueError, match="already merged"):
        merge(merged)


def test_record_round_trips_through_its_stored_form(setup) -> None:
    model, x, chain, plan = setup
    pruned = prune(model, chain, plan)
    attach_input_spec(pruned, x)
    stored = pruned.meta["layermerge"]
    assert stored["inputs"] == [([2, 3, 8, 8], "float32")]
    assert SurgeryMeta.from_dict(stored).to_dict() == stored
    assert example_from_spec(SurgeryMeta.of(pruned).inputs)[0].shape == x.shape


def test_a_network_without_a_record_is_refused() -> None:
    assert not SurgeryMeta.present(_net())
    with pytest.raises(TypeError, match="prune"):
        SurgeryMeta.of(_net())
    with pytest.raises(TypeError, match="prune"):
        save_compressed(_net(), "unused.safetensors")


def test_fold_batchnorm_is_the_original_function_without_batchnorm(setup) -> None:
    model, x, chain, _ = setup
    for share in (False, True):
        folded = fold_batchnorm(model, chain, share=share)
        assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
        with torch.no_grad():
            assert rel_err(folded(x), model(x)) <= 1e-5
    assert SurgeryMeta.of(folded).plan == Plan.keep_all(chain).to_dict()


@pytest.mark.parametrize("merged", [False, True])
def test_rebuild_compressed_gives_the_stored_architecture(setup, merged: bool) -> None:
    model, x, chain, plan = setup
    net = prune(model, chain, plan)
    net = merge(net) if merged else net
    rebuilt = rebuild_compressed(_net(), plan.to_dict(), x, merged=merged)  # other weights, same architecture
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in net.state_dict().items()}
    rebuilt.load_state_dict(net.state_dict())
    with torch.no_grad():
        assert rel_err(rebuilt.eval()(x), net.eval()(x)) <= 1e-6
    record = SurgeryMeta.of(rebuilt)
    assert record.merged == merged and record.inputs == [([2, 3, 8, 8], "float32")]
