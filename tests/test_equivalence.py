"""merge(prune(model)) == prune(model) on real torchvision/timm architectures.

For each model: the keep-everything plan, the remove-everything plan and 20 random legal
plans. The merged network is checked in float64 (relative error <= 1e-9, or within the
pruned network's own float64 sensitivity where that is larger) and, cast to float32, against
the float32 pruned network (<= 1e-4 of max |output|). The keep-everything plan must also
equal the original model.

The 22 plans of a model are checked in chunks (one test each) so that parallel workers
(pytest-xdist) share the big models; a worker builds, calibrates and traces a model once
for consecutive chunks (``_setup``), and the plans are the same however they are chunked.
"""

from __future__ import annotations

import functools
import gc
import random

import pytest
import timm
import torch
import torchvision
from torch import nn

from helpers import calibrate_batchnorm, float_sensitivity, randomize_batchnorm, random_plan, rel_err
from lightning_layermerge import Chain, Plan, merge, prune, trace

MODELS = {
    "resnet18": lambda: torchvision.models.resnet18(),
    "resnet34": lambda: torchvision.models.resnet34(),
    "resnet50": lambda: torchvision.models.resnet50(),
    "mobilenet_v2": lambda: torchvision.models.mobilenet_v2(),
    "vgg16_bn": lambda: torchvision.models.vgg16_bn(),
    "timm_resnet34": lambda: timm.create_model("resnet34"),
    "timm_mobilenetv2_100": lambda: timm.create_model("mobilenetv2_100"),
    "timm_efficientnet_b0": lambda: timm.create_model("efficientnet_b0"),
}
SLOW_MODELS: dict = {}
RANDOM_PLANS = 20
CHUNKS = 4  # tests per model; plan n is checked in chunk n % CHUNKS


def _conv_names(model: nn.Module) -> set[str]:
    return {name for name, m in model.named_modules() if isinstance(m, nn.Conv2d)}


@functools.lru_cache(maxsize=1)  # one model at a time: vgg16_bn alone is 1.1 GB in float64
def _setup(name: str) -> tuple[torch.Tensor, nn.Module, Chain, list[Plan], torch.Tensor]:
    """Input, float64 model (BatchNorm calibrated in float32, then cast once), chain, all
    plans and the model's float64 output."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    model = calibrate_batchnorm({**MODELS, **SLOW_MODELS}[name](), x.float()).eval().double()
    chain = trace(model, x)
    rng = random.Random(0)
    plans = [Plan.keep_all(chain), Plan.remove_all(chain)] + [random_plan(chain, rng) for _ in range(RANDOM_PLANS)]
    assert len({p.keys.__repr__() for p in plans}) >= 10, "random plans should differ"
    with torch.no_grad():
        reference = model(x)
    return x, model, chain, plans, reference


@pytest.fixture(scope="module", autouse=True)
def _free_last_model():
    """Do not keep the last model (up to 1.1 GB) alive for the rest of the session."""
    yield
    _setup.cache_clear()


@pytest.mark.parametrize("chunk", range(CHUNKS))
@pytest.mark.parametrize(
    "name", list(MODELS) + [pytest.param(n, marks=pytest.mark.slow) for n in SLOW_MODELS]
)
def test_merge_equals_pruned(name: str, chunk: int) -> None:
    x, model, chain, plans, reference = _setup(name)
    chain_convs = {layer.name for layer in chain.layers}
    for n, plan in list(enumerate(plans))[chunk::CHUNKS]:
        pruned = prune(model, chain, plan).eval()
        merged = merge(pruned, share=True)  # pruned is thrown away after the check
        with torch.no_grad():
            out_pruned, out_merged = pruned(x), merged(x)
            _check_float64(pruned, x, out_pruned, out_merged, f"plan {n} {plan}")
            _check_float32(pruned, merged, x, out_pruned, f"plan {n} {plan}")
        if n == 0:
            assert rel_err(reference, out_pruned) <= 1e-12
        # One conv per non-identity segment, no chain conv left unmerged.
        merged_convs = _conv_names(merged)
        expected = {f"merged_{s.i}_{s.j}" for s in plan.segments if not s.identity}
        assert {c for c in merged_convs if c.startswith("merged_")} == expected
        assert not merged_convs & chain_convs
        del pruned, merged
        gc.collect()  # fx GraphModules hold reference cycles; free big models promptly
    assert not model.training, "the model must be left in eval mode as given"


def _check_float64(pruned: nn.Module, x: torch.Tensor, exact: torch.Tensor, merged: torch.Tensor, what: str) -> None:
    """float64: merged within 1e-9 of pruned, or within the pruned network's own sensitivity.

    Random, never fine-tuned plans can make the pruned network ill-conditioned: removing
    activations leaves BatchNorm statistics that no longer match their inputs, outputs grow
    to ~1e4 and squeeze-excitation gates compound the growth block after block. Then moving
    every weight of the *pruned* network by one ulp already changes its float64 output by
    more than 1e-9 (efficientnet_b0 plan 15: 3.6e-9, against 8.1e-9 for the merged network,
    while every merged region matches its pruned layers to 3e-15 on the same input, and
    recalibrating the pruned network's BatchNorm brings the same plan to 4e-14). No float64
    computation can be held to better than that, so there the merged network must stay within
    a small multiple (10x) of this sensitivity; 10x covers the spread of the 3-sample estimate
    (merged/sensitivity ratios 0.2-3 over efficientnet_b0's 22 plans). A real inexactness
    (wrong padding, a dropped tap) gives errors many orders of magnitude above either bound.
    """
    err = rel_err(exact, merged)
    if err <= 1e-9:
        return
    own = float_sensitivity(pruned, x)
    assert err <= 10 * own, f"{what} (float64 error {err:.1e}, pruned network's own sensitivity {own:.1e})"


def _check_float32(pruned: nn.Module, merged: nn.Module, x: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """float32: merged within 1e-4 of pruned (relative to max |output|).

    A random, never fine-tuned plan can leave long linear chains whose float32 rounding is
    itself amplified beyond 1e-4 (the pruned network alone then differs from its own
    float64 value by more than that). There, no float32 network could match it within
    1e-4, and the check is instead that the merged network's float32 error against the
    exact float64 output is of the same order (at most 5x) as the pruned network's own
    float32 error. That error is one sample of the rounding; it can be far below what a
    float32 ulp of the weights does to this network (efficientnet_b0 plan 21: 2.4e-3 against
    2.2e-2 for the merged network and 1.5e-2 for float32-ulp weight noise), so the larger
    of the two is the pruned network's float32 accuracy (ratios <= 2.6 over efficientnet_b0's
    22 plans).
    """
    out_pruned32, out_merged32 = _float32_outputs([pruned, merged], x)
    if rel_err(out_pruned32, out_merged32) <= 1e-4:
        return
    own_error = rel_err(exact, out_pruned32)
    if rel_err(exact, out_merged32) > 5 * own_error:  # the sensitivity costs 3 forwards: only when needed
        own_error = max(own_error, float_sensitivity(pruned, x, ulp=2.0**-23))
    assert own_error > 5e-5, f"{what} (float32)"
    assert rel_err(exact, out_merged32) <= 5 * own_error, f"{what} (float32, pruned error {own_error:.1e})"


def _float32_outputs(nets: list[nn.Module], x: torch.Tensor) -> list[torch.Tensor]:
    """Each network's output computed in float32, as float64; the networks stay in float64.

    The float32 weights are passed to ``torch.func.functional_call``; a tensor that several
    networks share (``merge`` shares the layers it keeps with ``pruned``: vgg16_bn's 138M
    classifier weights) is cast once.
    """
    cast: dict[tuple, torch.Tensor] = {}

    def float32(t: torch.Tensor) -> torch.Tensor:
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if key not in cast:
            cast[key] = t.detach().float() if t.is_floating_point() else t
        return cast[key]

    outs = []
    for net in nets:
        state = {k: float32(t) for k, t in [*net.named_parameters(), *net.named_buffers()]}
        outs.append(torch.func.functional_call(net, state, (x.float(),)).double())
    return outs


def test_keep_all_plan_leaves_structure_and_model_untouched() -> None:
    model = randomize_batchnorm(torchvision.models.resnet18()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 32, 32)
    chain = trace(model, x)
    pruned = prune(model, chain, Plan.keep_all(chain))
    assert model.training and pruned.training
    assert set(pruned.state_dict()) == set(model.state_dict())
    merge(pruned.eval())
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.conv1.padding == (3, 3) and model.layer1[0].conv1.padding == (1, 1)


def test_merged_parameters_do_not_grow_when_kernels_do_not() -> None:
    """A segment that keeps one conv (its BatchNorm, removed convs and folded identity or
    1x1 shortcuts absorbed) has no more parameters than that conv plus a bias.

    Segments that compose several convs can grow even at equal kernel size (a 3x3 followed
    by a 1x1 expansion becomes a wide 3x3); the latency table decides whether they pay."""
    torch.manual_seed(0)
    model = randomize_batchnorm(torchvision.models.resnet50()).eval()
    chain = trace(model, torch.randn(1, 3, 32, 32))
    rng = random.Random(1)
    checked = 0
    for _ in range(5):
        plan = random_plan(chain, rng)
        merged = merge(prune(model, chain, plan), share=True)
        for seg in plan.segments:
            kept = [chain.layer(l) for l in seg.convs]
            if seg.identity or len(kept) != 1:
                continue
            params = sum(p.numel() for p in merged.get_submodule(f"merged_{seg.i}_{seg.j}").parameters())
            original = sum(l.in_channels // l.groups * l.out_channels * l.kernel**2 + l.out_channels for l in kept)
            assert params <= original, seg
            checked += 1
    assert checked > 10
