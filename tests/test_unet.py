"""diffusers UNet2DModel (DDPM): trace, prune and merge through the diffusers adapter.

Small random UNets in float64 (exactness) and float32; the DDPM CIFAR-10 configuration is
traced in a slow test. The merged network must be called and answer like the UNet.
"""

from __future__ import annotations

import random
import subprocess
import sys

import pytest
import torch
from torch import fx, nn

from helpers import random_plan, rel_err
from lightning_layermerge import Plan, merge, prune, trace

diffusers = pytest.importorskip("diffusers")
UNet2DModel = diffusers.UNet2DModel

# Attention in both directions, a channel change (32 -> 64, shortcut conv), asymmetric
# downsampling padding (diffusers' DDPM setting), GroupNorm with 8 groups, two timesteps.
SMALL = dict(
    sample_size=16, in_channels=3, out_channels=3, block_out_channels=(32, 64), layers_per_block=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=8, downsample_padding=0, attention_head_dim=None,
)
TIMESTEPS = [torch.tensor([3, 500]), torch.tensor(999), 42]


def _unet(dtype: torch.dtype = torch.float64, seed: int = 0, **overrides) -> nn.Module:
    torch.manual_seed(seed)
    return UNet2DModel(**{**SMALL, **overrides}).to(dtype).eval()


def _sample(dtype: torch.dtype = torch.float64, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.fixture(scope="module")
def small():
    unet, x = _unet(), _sample()
    return unet, x, trace(unet, (x, TIMESTEPS[0]))


def test_chain_of_resnet_blocks_and_barriers(small) -> None:
    unet, _, chain = small
    names = [layer.name for layer in chain.layers]
    assert names[0] == "conv_in" and names[-1] == "conv_out"
    assert not any("conv_shortcut" in n for n in names)  # shortcut convs stay off the chain
    # Each ResnetBlock2D's conv1 -> conv2 can merge into one segment.
    for l, name in enumerate(names, start=1):
        if name.endswith("conv1"):
            assert names[l] == name.replace("conv1", "conv2")
            assert chain.segments_between(l - 1, l + 1), f"{name}: block convs do not form a segment"
    seen = set()
    for pos in chain.positions:
        for node in pos.nodes:
            kind = next((b for b in ("attentions", "cat", "interpolate", "pad") if node.startswith(b)
                         or f"_{b}" in node), None)
            if kind:
                seen.add(kind)
                assert pos.forced, f"{node} does not force position {pos.index}"
    assert seen == {"attentions", "cat", "interpolate", "pad"}, seen
    # No segment crosses attention, the skip concat or resampling: each such barrier forces
    # its position, and no segment spans a forced position.
    for seg in chain.segments:
        assert not chain.forced & set(range(seg.i + 1, seg.j))
    # The upsampling conv (between the interpolation and the concat) is a candidate: it
    # may be removed (k=1), as in the paper.
    up = names.index("up_blocks.0.upsamplers.0.conv") + 1
    assert {s.k for s in chain.segments_between(up - 1, up)} == {1, 3}
    # A conv whose channels change is irreducible; the block's conv2 is not.
    c1 = names.index("down_blocks.1.resnets.0.conv1") + 1
    assert c1 in chain.irreducible and c1 + 1 not in chain.irreducible
    assert "UNet2DModel" in str(chain)


def test_keep_all_equals_original(small) -> None:
    unet, x, chain = small
    pruned = prune(unet, chain, Plan.keep_all(chain)).eval()
    merged = merge(pruned)
    with torch.no_grad():
        for t in TIMESTEPS:
            want = unet(x, t).sample
            assert rel_err(want, pruned(x, t).sample) == 0.0
            assert rel_err(want, merged(x, t).sample) <= 1e-12


def test_merge_equals_prune_float64_random_plans(small) -> None:
    unet, x, chain = small
    rng = random.Random(0)
    plans = [Plan.remove_all(chain)] + [random_plan(chain, rng) for _ in range(6)]
    assert any(s.j - s.i > 1 and len(s.convs) > 1 for p in plans for s in p.segments)
    for plan in plans:
        pruned = prune(unet, chain, plan).eval()
        merged = merge(pruned)
        with torch.no_grad():
            for t in TIMESTEPS:
                assert rel_err(pruned(x, t).sample, merged(x, t).sample) <= 1e-9, (str(plan), t)


def test_merged_unet_signature_and_output_type(small) -> None:
    unet, x, chain = small
    merged = merge(prune(unet, chain, Plan.remove_all(chain)))
    out = merged(x, 10)
    assert type(out).__name__ == "UNet2DOutput" and out.sample.shape == x.shape
    tup = merged(x, 10, return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1 and torch.equal(tup[0], out.sample)
    assert torch.equal(merged(sample=x, timestep=torch.tensor(10)).sample, out.sample)
    with pytest.raises(ValueError, match="class_embedding"):
        merged(x, 10, class_labels=torch.tensor([0, 1]))
    # Another batch size than the one traced: the timestep is broadcast at call time.
    assert merged(torch.cat([x, x]), 10).sample.shape[0] == 4


def test_groupnorm_moved_and_time_bias_carried(small) -> None:
    unet, x, chain = small
    c1 = [layer.name for layer in chain.layers].index("down_blocks.0.resnets.0.conv1") + 1
    specs = [(l - 1, l, chain.layer(l).kernel) for l in range(1, c1)]
    specs += [(c1 - 1, c1 + 1, 5)]
    specs += [(l - 1, l, chain.layer(l).kernel) for l in range(c1 + 2, chain.num_layers + 1)]
    pruned = prune(unet, chain, Plan.from_segments(chain, specs))
    order = [n for n in pruned.graph.nodes if n.op == "call_module"]
    targets = [str(n.target) for n in order]
    block = "down_blocks.0.resnets.0."
    i1, i2, n2 = (targets.index(block + m) for m in ("conv1", "conv2", "norm2"))
    assert i1 < i2 < n2, "GroupNorm 2 must now follow conv2"
    assert targets.count(block + "norm2") == 1
    # Between the convs only the time-embedding add and dropout are left (SiLU and GN gone).
    between, cur = [], order[i2].args[0]
    while cur is not order[i1]:
        between.append(type(pruned.get_submodule(str(cur.target))).__name__ if cur.op == "call_module"
                       else getattr(cur.target, "__name__", str(cur.target)))
        cur = cur.args[0]
    assert sorted(between) == ["Dropout", "add"], between
    merged = merge(pruned.eval())
    proj = [name for name, _ in merged.named_modules() if name.startswith(f"merged_{c1 - 1}_{c1 + 1}_bias")]
    assert proj, "the merged block must still add the (pushed-through) time embedding"
    with torch.no_grad():
        a, b = merged(x, 1).sample, merged(x, 900).sample
        assert rel_err(a, b) > 1e-3  # the timestep still matters
        assert rel_err(pruned(x, 900).sample, b) <= 1e-9


def test_float32_merge_within_tolerance() -> None:
    unet, x = _unet(torch.float32, seed=3), _sample(torch.float32, seed=4)
    chain = trace(unet, (x, torch.tensor([7, 300])))
    rng = random.Random(1)
    for plan in [Plan.remove_all(chain), random_plan(chain, rng), random_plan(chain, rng)]:
        pruned = prune(unet, chain, plan).eval()
        merged = merge(pruned)
        with torch.no_grad():
            for t in (torch.tensor([7, 300]), 650):
                want, got = pruned(x, t).sample, merged(x, t).sample
                assert got.dtype == torch.float32
                assert float((want - got).abs().max()) <= 1e-4 * float(want.abs().max()), str(plan)


def test_pruned_unet_trains_with_dropout_between_merged_convs() -> None:
    # Dropout stays between the (still separate) convs of a pruned segment while training
    # and is the identity in eval mode, where merge is exact.
    unet, x = _unet(torch.float32, dropout=0.5), _sample(torch.float32)
    chain = trace(unet, (x, torch.tensor([5, 6])))
    pruned = prune(unet.train(), chain, Plan.remove_all(chain))
    assert pruned.training
    loss = pruned(x, torch.tensor([5, 6])).sample.square().mean()
    loss.backward()
    assert all(p.grad is not None for n, p in pruned.named_parameters() if "conv_in" in n)
    with torch.no_grad():
        torch.manual_seed(0)
        a = pruned(x, 5).sample
        b = pruned(x, 5).sample
    assert not torch.equal(a, b)  # dropout active in training mode
    pruned.eval()
    with torch.no_grad():
        assert rel_err(pruned(x, 5).sample, merge(pruned)(x, 5).sample) <= 1e-4


def test_two_layers_per_block_and_mid_attention() -> None:
    unet = _unet(block_out_channels=(16, 32), layers_per_block=2, norm_num_groups=4,
                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), downsample_padding=1)
    x = _sample()
    chain = trace(unet, (x, torch.tensor([1, 2])))
    rng = random.Random(2)
    for plan in [random_plan(chain, rng) for _ in range(3)]:
        pruned = prune(unet, chain, plan).eval()
        merged = merge(pruned)
        with torch.no_grad():
            assert rel_err(pruned(x, 123).sample, merged(x, 123).sample) <= 1e-9, str(plan)


def test_unsupported_unet_configuration_is_refused() -> None:
    unet = _unet(class_embed_type=None, num_class_embeds=4)
    with pytest.raises(ValueError, match="class-conditional"):
        trace(unet, (_sample(), torch.tensor([1, 2])))


def test_adapter_forward_that_differs_is_refused() -> None:
    from lightning_layermerge.surgery import adapters

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(x) * 2

    def wrong(self, x):
        return self.conv(x)

    adapters.register_forward(lambda m: type(m) is Net, wrong)
    try:
        with pytest.raises(ValueError, match="do not reproduce"):
            trace(Net(), torch.randn(1, 3, 8, 8))
    finally:
        adapters._FORWARDS.pop()


def test_package_imports_without_diffusers() -> None:
    code = "import sys; sys.modules['diffusers'] = None; import lightning_layermerge; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr


@pytest.mark.slow
def test_ddpm_cifar10_configuration_traces() -> None:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=None, norm_eps=1e-6, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1,
    ).eval()
    chain = trace(unet, (torch.randn(1, 3, 32, 32), torch.tensor([10])))
    assert chain.num_layers == 52
    merges = {(s.i, s.j) for s in chain.segments if len(s.convs) == 2}
    assert len(merges) == 22  # conv1+conv2 of every ResnetBlock2D: 8 down, 2 mid, 12 up
    assert isinstance(merge(prune(unet, chain, Plan.remove_all(chain))), fx.GraphModule)
