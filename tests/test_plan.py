"""Plan construction and validation."""

from __future__ import annotations

import pytest
import torch
import torchvision

from lightning_layermerge import Plan, trace


@pytest.fixture(scope="module")
def chain():
    return trace(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))


def _singles(chain, start: int) -> list[tuple[int, int, int]]:
    return [(l - 1, l, chain.layer(l).kernel) for l in range(start, chain.num_layers + 1)]


def test_keep_all_and_sets(chain) -> None:
    plan = Plan.keep_all(chain)
    assert plan.keys == [(l - 1, l, chain.layer(l).kernel) for l in range(1, 18)]
    assert plan.kept_activations == set(range(1, 17))
    assert plan.kept_convs == set(range(1, 18))


def test_from_segments_with_explicit_convs(chain) -> None:
    plan = Plan.from_segments(chain, [(0, 1, 7), (1, 3, 3, (3,))] + _singles(chain, 4))
    assert plan.kept_convs == set(range(1, 18)) - {2}
    assert plan.kept_activations == {1} | set(range(3, 17))


def test_replacing_changes_only_one_segment(chain) -> None:
    seg = chain.segment(1, 3, 5)
    plan = Plan.replacing(chain, seg)
    assert plan.keys == [(0, 1, 7), (1, 3, 5)] + _singles(chain, 4)


def test_remove_all_is_minimal(chain) -> None:
    plan = Plan.remove_all(chain)
    assert plan.kept_convs == chain.irreducible
    # The stem barrier at 1, then one segment per strided stage: a strided 3x3 may not be
    # merged with a following 3x3, so the rest of its stage is removed.
    assert plan.keys == [(0, 1, 7), (1, 7, 3), (7, 11, 3), (11, 17, 3)]


def test_round_trip(chain) -> None:
    plan = Plan.remove_all(chain)
    assert Plan.from_dict(chain, plan.to_dict()) == plan
    other = trace(torchvision.models.resnet18(), torch.randn(1, 3, 64, 64))
    with pytest.raises(ValueError, match="different architecture or input shape"):
        Plan.from_dict(other, plan.to_dict())


def test_errors(chain) -> None:
    with pytest.raises(ValueError, match="stop at position 1"):
        Plan.from_segments(chain, [(0, 1, 7)])
    with pytest.raises(ValueError, match="gap at position 2"):
        Plan.from_segments(chain, [(0, 1, 7), (1, 2, 3), (3, 4, 3)] + _singles(chain, 5))
    with pytest.raises(ValueError, match="overlap at position 3"):
        Plan.from_segments(chain, [(0, 1, 7), (1, 3, 5), (2, 3, 3)] + _singles(chain, 4))
    with pytest.raises(ValueError, match=r"position 1 is a forced boundary \(module maxpool"):
        Plan.from_segments(chain, [(0, 2, 9)] + _singles(chain, 3))
    with pytest.raises(ValueError, match=r"legal kernels for \(1, 2\] are \[1, 3\]"):
        Plan.from_segments(chain, [(0, 1, 7), (1, 2, 5)] + _singles(chain, 3))
    with pytest.raises(ValueError, match=r"removes irreducible conv\(s\) 6 \(layer2.0.conv1\)"):
        Plan.from_keep(chain, range(1, 17), [l for l in range(1, 18) if l != 6])
    with pytest.raises(ValueError, match="merges to kernel 3, not 5"):
        Plan.from_segments(chain, [(0, 1, 7), (1, 3, 5, (3,))] + _singles(chain, 4))
    with pytest.raises(ValueError, match="forced boundaries"):
        Plan.from_keep(chain, range(2, 17), range(1, 18))
    with pytest.raises(ValueError, match="crosses the residual add"):
        Plan.from_segments(chain, [(0, 1, 7), (1, 2, 3), (2, 4, 5)] + _singles(chain, 5))
