"""Merge rules on small hand-built networks, checked exactly in float64."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from helpers import randomize_batchnorm, random_plan, rel_err
from lightning_layermerge import Plan, merge, prune, trace
from lightning_layermerge.surgery.affine import AffineConv


def _check_all_plans(model: nn.Module, x: torch.Tensor, limit: int = 25, **prune_kwargs) -> int:
    """Every (or `limit` random) legal plan merges exactly; returns how many were checked."""
    model = randomize_batchnorm(model).double().eval()
    x = x.double()
    chain = trace(model, x)
    rng = random.Random(0)
    plans = [Plan.keep_all(chain), Plan.remove_all(chain)] + [random_plan(chain, rng) for _ in range(limit)]
    for plan in plans:
        pruned = prune(model, chain, plan, **prune_kwargs).eval()
        merged = merge(pruned)
        with torch.no_grad():
            assert rel_err(pruned(x), merged(x)) <= 1e-9, str(plan)
    return len(plans)


def test_affine_conv_composition_matches_sequential_convs() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 4, 23, 23, dtype=torch.float64)
    for (k1, s1, g1), (k2, s2, g2) in itertools.product([(3, 1, 1), (3, 2, 4), (1, 2, 2), (5, 1, 4)], repeat=2):
        c1 = nn.Conv2d(4, 8, k1, stride=s1, groups=g1).double()
        c2 = nn.Conv2d(8, 8, k2, stride=s2, groups=g2).double()
        m = AffineConv.identity(4, x.device).then_conv(c1).then_conv(c2)
        got = F.conv2d(x, m.weight, m.bias, stride=m.stride, groups=m.groups)
        want = c2(c1(x))
        assert got.shape == want.shape
        assert rel_err(want, got) <= 1e-12, (k1, s1, g1, k2, s2, g2)


def test_depthwise_chain_stays_depthwise_and_mixed_becomes_dense() -> None:
    dw1 = nn.Conv2d(6, 6, 3, groups=6).double()
    dw2 = nn.Conv2d(6, 6, 3, groups=6).double()
    pw = nn.Conv2d(6, 6, 1).double()
    assert AffineConv.identity(6, torch.device("cpu")).then_conv(dw1).then_conv(dw2).groups == 6
    assert AffineConv.identity(6, torch.device("cpu")).then_conv(dw1).then_conv(pw).groups == 1


class ConvBN(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act: bool = True, bias: bool = False):
        layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=bias), nn.BatchNorm2d(cout)]
        super().__init__(*layers, *( [nn.ReLU()] if act else []))


class Plain(nn.Module):
    """Strided, grouped, depthwise and biased convs in one chain."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            ConvBN(3, 8), ConvBN(8, 8, bias=True), ConvBN(8, 16, stride=2), ConvBN(16, 16, 1),
            ConvBN(16, 16, groups=16), ConvBN(16, 16, groups=4), ConvBN(16, 16, 5, groups=16),
            nn.Conv2d(16, 16, 3, padding=1, bias=True), nn.Tanh(), ConvBN(16, 8, 1, act=False),
        )

    def forward(self, x):
        return self.body(x)


class Residual(nn.Module):
    """Identity and strided 1x1-projection shortcuts (torchvision BasicBlock style)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.a1, self.a2 = ConvBN(8, 8), ConvBN(8, 8, act=False)
        self.b1, self.b2 = ConvBN(8, 16, stride=2), ConvBN(16, 16, act=False)
        self.proj = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.relu = nn.ReLU()  # shared between positions, as in torchvision
        self.head = ConvBN(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        x = self.relu(self.a2(self.a1(x)) + x)
        x = self.relu(self.b2(self.b1(x)) + self.proj(x))
        return self.head(x)


class InvertedResidual(nn.Module):
    """MobileNetV2 style: linear bottleneck with identity shortcut, no activation after add."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.blocks = nn.ModuleList(
            nn.Sequential(ConvBN(8, 24, 1), ConvBN(24, 24, groups=24), ConvBN(24, 8, 1, act=False)) for _ in range(2)
        )
        self.head = ConvBN(8, 16, 1)

    def forward(self, x):
        x = self.stem(x)
        for block in self.blocks:
            x = x + block(x)
        return self.head(x)


@pytest.mark.parametrize("model_cls", [Plain, Residual, InvertedResidual])
def test_every_plan_merges_exactly(model_cls) -> None:
    torch.manual_seed(0)
    assert _check_all_plans(model_cls(), torch.randn(2, 3, 13, 13)) > 10


def test_plain_chain_segments_and_kernels() -> None:
    chain = trace(Plain().eval(), torch.randn(1, 3, 12, 12))
    assert chain.num_layers == 9
    assert chain.irreducible == {1, 3, 9}
    # conv 3 is strided: a following 1x1 may join it, a following 3x3 only if removed.
    assert [(s.k, s.convs) for s in chain.segments_between(2, 4)] == [(3, (3, 4))]
    assert [(s.k, s.convs) for s in chain.segments_between(2, 5)] == [(3, (3, 4))]
    # Eq. 3: the 1x1 conv 4 is kept whenever it fits (larger L1 norm at the same kernel).
    assert {s.k: s.convs for s in chain.segments_between(1, 2)} == {1: (), 3: (2,)}


def test_residual_fold_rules() -> None:
    chain = trace(Residual().eval(), torch.randn(1, 3, 12, 12))
    # layers: 1 stem, 2 a1, 3 a2, 4 b1, 5 b2, 6 head
    assert chain.num_layers == 6
    assert chain.segments_between(1, 3), "a segment holding the whole identity branch folds it"
    assert not chain.segments_between(2, 4), "a segment holding half a branch and crossing the add is illegal"
    assert chain.segments_between(2, 3), "a segment may end on the add"
    # (3, 5]: b1 strided 3x3 then b2 3x3 -> only with b2 removed; projection folded.
    assert [s.convs for s in chain.segments_between(3, 5)] == [(4,)]


def test_bottleneck_activation_option() -> None:
    torch.manual_seed(0)
    model = randomize_batchnorm(InvertedResidual()).double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    chain = trace(model, x)
    assert chain.positions[4].activation is None  # block 1 ends on a linear bottleneck
    plan = Plan.from_keep(chain, [1, 4, 7], range(1, 9))
    pruned = prune(model, chain, plan, bottleneck_activation=nn.ReLU6).eval()
    added = [n for n, m in pruned.named_modules() if n.startswith("layermerge_act_")]
    assert sorted(added) == ["layermerge_act_4", "layermerge_act_7"]
    assert all(isinstance(pruned.get_submodule(n), nn.ReLU6) for n in added)
    merged = merge(pruned)
    with torch.no_grad():
        assert rel_err(pruned(x), merged(x)) <= 1e-9
    assert _check_all_plans(InvertedResidual(), torch.randn(2, 3, 9, 9), limit=20, bottleneck_activation=nn.ReLU6)


def test_merge_rejects_foreign_input() -> None:
    with pytest.raises(TypeError, match="prune"):
        merge(nn.Conv2d(3, 3, 3))
    chain = trace(Plain().eval(), torch.randn(1, 3, 8, 8))
    merged = merge(prune(Plain().eval(), chain, Plan.keep_all(chain)))
    with pytest.raises(ValueError, match="already merged"):
        merge(merged)


class ThreeWaySum(nn.Module):
    """MobileOne/FastViT style: out = (scale(x) + bn(x)) + conv_kxk(x). The second add's
    shortcut cannot be folded; keep_all used to fail ("crosses the residual add")."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvBN(3, 8)
        self.kxk = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8))
        self.scale = nn.Sequential(nn.Conv2d(8, 8, 1, bias=False), nn.BatchNorm2d(8))
        self.identity = nn.BatchNorm2d(8)
        self.head = ConvBN(8, 8)

    def forward(self, x):
        x = self.stem(x)
        out = self.scale(x) + self.identity(x)
        out = out + self.kxk(x)
        return self.head(torch.relu(out))


def test_unfoldable_shortcut_from_the_segment_input_ends_the_segment() -> None:
    torch.manual_seed(0)
    model = ThreeWaySum()
    chain = trace(model, torch.randn(1, 3, 9, 9))
    # ties go to the first operand: the main path runs through scale, kxk is the shortcut
    assert [l.name for l in chain.layers] == ["stem.0", "scale.0", "head.0"]
    assert [s.foldable for s in chain.skips] == [True, False]  # bn(x) folds; padded kxk does not
    assert chain.segments_between(1, 2) and not chain.segments_between(1, 3)  # never across the add
    assert _check_all_plans(model, torch.randn(2, 3, 9, 9)) >= 3


def test_merged_network_shares_kept_tensors_but_not_modes_or_dtypes() -> None:
    """Layers outside the merged segments are not copied (a vgg16 classifier would cost more
    than the merge), yet converting or switching the merged network leaves ``pruned`` alone."""
    model = randomize_batchnorm(nn.Sequential(Plain(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5)))
    model = model.double()
    x = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    chain = trace(model, x)
    pruned = prune(model, chain, Plan.remove_all(chain)).train()
    head = next(m for m in pruned.modules() if isinstance(m, nn.Linear))
    assert head.weight.data_ptr() != model[3].weight.data_ptr()  # prune copies: training it spares the model
    copied = next(m for m in merge(pruned).modules() if isinstance(m, nn.Linear))
    assert copied.weight.data_ptr() != head.weight.data_ptr()  # the default copies
    merged = merge(pruned, share=True)
    merged_head = next(m for m in merged.modules() if isinstance(m, nn.Linear))
    assert merged_head is not head and merged_head.weight is not head.weight
    assert merged_head.weight.data_ptr() == head.weight.data_ptr()
    assert pruned.training and not merged.training
    with torch.no_grad():
        assert rel_err(pruned.eval()(x), merged(x)) <= 1e-9
    merged.float()
    assert head.weight.dtype == torch.float64 and merged_head.weight.dtype == torch.float32
