"""prune(): trainable result, padding moved, state dicts, errors."""

from __future__ import annotations

import pytest
import torch
import torchvision

from helpers import rel_err
from lightning_layermerge import Plan, merge, prune, trace


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = torchvision.models.resnet18().train()
    x = torch.randn(4, 3, 32, 32)
    return model, x, trace(model, x)


def test_pruned_network_trains_and_still_merges_exactly(setup) -> None:
    model, x, chain = setup
    plan = Plan.from_segments(chain, [(0, 1, 7), (1, 3, 5)] + [(l - 1, l, 3) for l in range(4, 18)])
    pruned = prune(model, chain, plan)
    assert pruned.training
    # padding of the merged pair moved to its input: both convs unpadded now
    assert pruned.get_submodule("layer1.0.conv1").padding == (0, 0)
    assert pruned.get_submodule("layer1.0.conv2").padding == (0, 0)
    opt = torch.optim.SGD(pruned.parameters(), lr=0.05)
    for _ in range(3):
        opt.zero_grad()
        loss = pruned(x).logsumexp(1).mean()
        loss.backward()
        opt.step()
    assert all(p.grad is not None for p in pruned.parameters() if p.requires_grad)
    pruned.eval()
    with torch.no_grad():
        assert rel_err(pruned(x), merge(pruned)(x)) <= 1e-4
    assert not torch.equal(pruned.get_submodule("layer1.0.conv1").weight, model.layer1[0].conv1.weight)


def test_state_dict_round_trip_for_resume(setup) -> None:
    model, x, chain = setup
    plan = Plan.remove_all(chain)
    a, b = prune(model, chain, plan), prune(model, chain, plan)
    assert "layer1.0.conv1.weight" not in a.state_dict()  # removed convs are gone
    with torch.no_grad():
        for p in a.parameters():
            p.add_(1.0)
    b.load_state_dict(a.state_dict(), strict=True)
    a.eval(), b.eval()
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_errors(setup) -> None:
    model, x, chain = setup
    other = trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="different chain"):
        prune(model, chain, Plan.keep_all(other))
    with pytest.raises(ValueError, match="does not match the chain"):
        prune(torchvision.models.resnet34(), chain, Plan.keep_all(chain))


def test_inplace_activations_do_not_overwrite_a_shortcut_after_pruning(setup) -> None:
    """torchvision's ReLU(inplace=True) after a removed conv+BN would overwrite the block input
    that the shortcut still reads; capture makes such ops out-of-place (the user's model keeps
    its flags)."""
    import copy
    import random

    from helpers import random_plan

    model, x, chain = setup
    model = copy.deepcopy(model).eval()
    reference = copy.deepcopy(model)
    for m in reference.modules():
        if hasattr(m, "inplace"):
            m.inplace = False
    rng = random.Random(0)
    for _ in range(8):
        plan = random_plan(chain, rng)
        pruned, expected = prune(model, chain, plan), prune(reference, chain, plan)
        with torch.no_grad():
            assert torch.equal(pruned.eval()(x), expected.eval()(x))
        pruned.train()(x).sum().backward()  # raised "modified by an inplace operation" before
    assert model.relu.inplace is True
