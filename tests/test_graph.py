"""trace(): the chain read from real graphs, barriers, Eq. 3, errors, and no side effects."""

from __future__ import annotations

import itertools

import pytest
import torch
import torchvision
from torch import nn

from helpers import randomize_batchnorm
from lightning_layermerge import trace


def test_resnet18_chain() -> None:
    chain = trace(torchvision.models.resnet18(), torch.randn(1, 3, 32, 32))
    assert chain.num_layers == 17
    assert chain.irreducible == {1, 6, 10, 14}
    assert chain.forced == {0, 1, 17}  # the stem max-pool is a barrier
    assert "MaxPool2d" in chain.positions[1].forced
    # downsample convs are shortcuts, not chain layers
    assert all("downsample" not in layer.name for layer in chain.layers)
    assert chain.layer(6).in_shape == (1, 64, 8, 8) and chain.layer(6).out_shape == (1, 128, 4, 4)
    table = chain.table()
    for word in ("layer", "module", "kernel", "stride", "channels", "activation", "irred", "barrier", "layer2.0.conv1"):
        assert word in table
    assert str(chain) == table
    assert len(table.splitlines()) == 2 + 17


def test_every_segment_is_within_bounds_and_keeps_irreducible() -> None:
    chain = trace(torchvision.models.mobilenet_v2(), torch.randn(1, 3, 32, 32))
    for seg in chain.segments:
        assert 0 <= seg.i < seg.j <= chain.num_layers
        assert chain.irreducible & set(range(seg.i + 1, seg.j + 1)) <= set(seg.convs)
        assert not chain.forced & set(range(seg.i + 1, seg.j))
        assert seg.k == 1 + sum(chain.layer(l).kernel - 1 for l in seg.convs)


def test_eq3_keeps_the_largest_l1_subset() -> None:
    """Brute force over kept-conv subsets for every segment of a small chain."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Conv2d(4, 4, k, padding=k // 2), nn.ReLU()) for k in (3, 1, 3, 5, 3, 1)])
    chain = trace(model, torch.randn(1, 4, 16, 16))
    assert chain.num_layers == 6 and not chain.irreducible
    for (i, j) in itertools.combinations(range(7), 2):
        best: dict[int, float] = {}
        for r in range(j - i + 1):
            for kept in itertools.combinations(range(i + 1, j + 1), r):
                k = 1 + sum(chain.layer(l).kernel - 1 for l in kept)
                best[k] = max(best.get(k, -1.0), sum(chain.layer(l).weight_l1 for l in kept))
        segs = {s.k: s for s in chain.segments_between(i, j)}
        assert set(segs) == set(best)
        for k, seg in segs.items():
            assert sum(chain.layer(l).weight_l1 for l in seg.convs) == pytest.approx(best[k])


class Unusual(nn.Module):
    """Ops the tracer must not merge across: concat, SE gating, dilation, pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.side = nn.Conv2d(8, 8, 1)
        self.c3 = nn.Conv2d(16, 16, 3, padding=1)
        self.se = nn.Conv2d(16, 16, 1)
        self.c4 = nn.Conv2d(16, 16, 3, padding=2, dilation=2)
        self.c5 = nn.Conv2d(16, 16, 3, padding=1)
        self.c6 = nn.Conv2d(16, 16, 3, padding=1)
        self.c7 = nn.Conv2d(16, 16, 3, padding=1)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        y = torch.relu(self.c2(x))
        x = torch.cat([y, self.side(x)], dim=1)
        x = torch.relu(self.c3(x))
        x = x * torch.sigmoid(self.se(x.mean((2, 3), keepdim=True)))
        x = torch.relu(self.c5(x))
        x = torch.relu(self.c4(x))
        x = torch.relu(self.c6(x))
        return self.c7(x)


def test_unknown_ops_become_barriers_and_merges_stay_exact() -> None:
    from helpers import random_plan, rel_err
    import random
    from lightning_layermerge import Plan, merge, prune

    torch.manual_seed(0)
    model = Unusual().double().eval()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    chain = trace(model, x)
    reasons = " | ".join(p.forced for p in chain.positions)
    assert "cat" in reasons and "dilation" in reasons and "mul" in reasons
    # only c6 -> c7 is free to merge
    free = [p.index for p in chain.positions if not p.forced]
    assert len(free) == 1
    rng = random.Random(0)
    for plan in [Plan.keep_all(chain), Plan.remove_all(chain)] + [random_plan(chain, rng) for _ in range(5)]:
        pruned = prune(model, chain, plan).eval()
        with torch.no_grad():
            assert rel_err(pruned(x), merge(pruned)(x)) <= 1e-9


def test_shared_relu_module_is_removed_per_call() -> None:
    """torchvision's BasicBlock calls one ReLU twice; removing one call keeps the other."""
    from lightning_layermerge import Plan, prune

    model = torchvision.models.resnet18().eval()
    chain = trace(model, torch.randn(1, 3, 32, 32))
    plan = Plan.from_keep(chain, [p for p in range(1, 17) if p != 2], range(1, 18))
    pruned = prune(model, chain, plan)
    calls = [n for n in pruned.graph.nodes if n.op == "call_module" and n.target == "layer1.0.relu"]
    assert len(calls) == 1


def test_trace_does_not_modify_the_model() -> None:
    model = randomize_batchnorm(torchvision.models.resnet18()).train()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    trace(model, torch.randn(2, 3, 32, 32))
    assert model.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_errors() -> None:
    with pytest.raises(ValueError, match="no nn.Conv2d"):
        trace(nn.Sequential(nn.Linear(3, 4)), torch.randn(1, 3))
    with pytest.raises(ValueError, match=r"example input \[\(1, 4, 32, 32\)\] does not fit.*3 input channels"):
        trace(torchvision.models.resnet18(), torch.randn(1, 4, 32, 32))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        trace("resnet", torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match="example_input"):
        trace(torchvision.models.resnet18(), {"x": 1})

    class DataDependent(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x

    class Outer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 1)
            self.block = DataDependent()

        def forward(self, x):
            return self.block(self.stem(x))

    with pytest.raises(ValueError, match=r"inside submodule block \(DataDependent\).*trace a submodule"):
        trace(Outer(), torch.randn(1, 3, 8, 8))


class SplitMix(nn.Module):
    """MixNet/Res2Net style: a feature map split into a tuple, each part convolved, concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 1)
        self.a = nn.Conv2d(4, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 5, padding=2)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.c4 = nn.Conv2d(8, 8, 1)

    def forward(self, x):
        x = self.c2(torch.relu(self.c1(x)))
        left, right = torch.split(x, 4, dim=1)  # one node with a tuple value, read by getitem
        x = torch.relu(torch.cat([self.a(left), self.b(right)], dim=1))
        return self.c4(torch.relu(self.c3(x)))


def test_tuple_valued_nodes_are_barriers_not_dead_ends() -> None:
    """A split's tuple has no tensor shape; the main path used to stop there ("no tensor path
    from the input to the output", timm mixnet_s / res2net). It is a barrier on the path."""
    from helpers import random_plan, rel_err
    import random
    from lightning_layermerge import Plan, merge, prune

    torch.manual_seed(0)
    model = SplitMix().double().eval()
    x = torch.randn(1, 3, 10, 10, dtype=torch.float64)
    chain = trace(model, x)
    assert [layer.name for layer in chain.layers] == ["c1", "c2", "a", "c3", "c4"]
    assert "split" in chain.positions[2].forced and "cat" in chain.positions[3].forced
    rng = random.Random(0)
    for plan in [Plan.keep_all(chain), Plan.remove_all(chain)] + [random_plan(chain, rng) for _ in range(5)]:
        pruned = prune(model, chain, plan).eval()
        with torch.no_grad():
            assert rel_err(pruned(x), merge(pruned)(x)) <= 1e-9


def test_untraceable_error_names_the_failing_line() -> None:
    """The error names the submodule and the line of model code fx stopped at (the op)."""

    class Gate(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3)

        def forward(self, x):
            if x.mean() > 0:  # data-dependent branch: the op that cannot be traced
                return self.conv(x)
            return x

    with pytest.raises(ValueError, match=r"inside submodule <root> \(Gate\) at test_graph\.py:\d+ \(`if x\.mean\(\) > 0:"):
        trace(Gate(), torch.randn(1, 3, 8, 8))
