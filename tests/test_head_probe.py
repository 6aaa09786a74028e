"""The head probe (``ImportanceSettings(method="probe")``): importance entries that train nothing but
the classifier head, and its fallback to fine-tuning where a network has no such head."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import LitTinyVal, loaders, one_thread, pretrained
from torch import nn

from lightning_layermerge import Plan, prune, trace
from lightning_layermerge.fit.head_probe import ProbeUnsupported, find_head, probe_head
from lightning_layermerge.fit.importance_settings import ImportanceSettings
from lightning_layermerge.fit.subruns import SubRunner

threads = pytest.fixture(autouse=True)(one_thread)


class ConvHead(nn.Module):
    """Ends in a 1x1 conv (as a UNet ends in a conv): no nn.Linear produces the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.fc = nn.Linear(8, 8)  # a Linear that does not produce the output
        self.out = nn.Conv2d(8, 10, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x)).mean((2, 3))


class LitConvHead(LitTinyVal):
    def __init__(self) -> None:
        super().__init__()
        self.model = ConvHead()


class LitTwice(LitTinyVal):
    """training_step calls the network twice (e.g. two augmented views)."""

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.cross_entropy(self(x), y) + F.cross_entropy(self(x.flip(3)), y)


def test_find_head_is_the_linear_whose_output_is_the_network_output() -> None:
    module = LitTinyVal()
    x = torch.randn(4, 1, 8, 8)
    head = find_head(module.model, lambda: module.model(x))
    linears = [m for m in module.model.modules() if isinstance(m, nn.Linear)]
    assert head is linears[-1]
    conv = ConvHead()
    with pytest.raises(ProbeUnsupported, match="does not come straight from an nn.Linear"):
        find_head(conv, lambda: conv(x))
    with pytest.raises(ProbeUnsupported, match="called the network 2 times"):
        find_head(module.model, lambda: (module.model(x), module.model(x)))


def test_probe_refits_only_the_head_and_lowers_the_training_loss() -> None:
    module = pretrained(LitTinyVal(), steps=20)
    chain = trace(module.model, torch.randn(2, 1, 8, 8))
    seg = next(s for i in range(chain.num_layers) for s in chain.segments_between(i, chain.num_layers)
               if len(s.convs) < s.j - s.i)  # a segment that removes a conv
    module.model = prune(module.model, chain, Plan.replacing(chain, seg))
    module.model.eval()
    train, _ = loaders(batch_size=32, n=600)
    batches = list(train)[:6]
    head = [m for m in module.model.modules() if isinstance(m, nn.Linear)][-1]
    before = {k: v.clone() for k, v in module.model.state_dict().items()}

    def train_loss() -> float:
        with torch.no_grad():
            return sum(float(F.cross_entropy(module.model(x), y)) for x, y in batches) / len(batches)

    loss0 = train_loss()
    probe_head(module, "model", batches, weight_decay=0.0)
    assert train_loss() < loss0 - 0.05  # the head refit on these features fits them better
    after = module.model.state_dict()
    head_names = {n for n, p in module.model.named_parameters() if any(p is q for q in head.parameters())}
    assert head_names and all(not torch.equal(after[k], before[k]) for k in head_names)
    assert all(torch.equal(after[k], v) for k, v in before.items() if k not in head_names)  # body frozen
    assert all(p.requires_grad for p in module.model.parameters())  # requires_grad restored
    assert isinstance(module.model, nn.Module) and module.model is not None


def test_the_penalty_shrinks_the_head() -> None:
    train, _ = loaders(batch_size=32, n=300)
    batches = list(train)
    norms = []
    for wd in (0.0, 1.0):
        module = LitTinyVal()
        probe_head(module, "model", batches, weight_decay=wd)
        head = [m for m in module.model.modules() if isinstance(m, nn.Linear)][-1]
        norms.append(float(head.weight.norm()))
    assert norms[1] < 0.5 * norms[0]


def test_unsupported_probe_leaves_the_head_unchanged() -> None:
    module = LitTwice()
    train, _ = loaders(batch_size=32, n=300)
    before = copy.deepcopy(module.model.state_dict())
    with pytest.raises(ProbeUnsupported, match="2 times"):
        probe_head(module, "model", list(train), weight_decay=1.0)
    assert all(torch.equal(module.model.state_dict()[k], v) for k, v in before.items())


def _runner(module, settings: ImportanceSettings) -> SubRunner:
    train, val = loaders(batch_size=32, n=600)
    return SubRunner(module, "model", train, settings, val_loader=val)


def test_runner_probe_trains_no_step_and_falls_back_where_it_does_not_apply() -> None:
    module = pretrained(LitTinyVal(), steps=150)
    runner = _runner(module, ImportanceSettings(noise_repeats=0))
    assert runner.method == "probe" and runner.steps == 0
    with pytest.raises(RuntimeError, match="resolve_monitor"):
        runner.check_finetune(module.model)
    _, loss0 = runner.resolve_monitor(module.model, None, "min")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # applies: no fallback warning
        runner.check_finetune(module.model)
    assert runner.method == "probe"
    # The blind head (weight 0, bias refit) is no better than the class prior; the trained net far better.
    assert -runner.blind_perf > 2.0 and loss0 < -runner.blind_perf - 0.5
    probed = runner.finetune(copy.deepcopy(module.model))
    assert runner.score(probed) == pytest.approx(math.log(runner._raw_score(probed, 0) - runner.blind_perf))
    conv = _runner(LitConvHead(), ImportanceSettings(noise_repeats=0))
    conv.resolve_monitor(LitConvHead().model, None, "min")
    with pytest.warns(UserWarning, match=r"method='probe'\) does not apply to LitConvHead: .*nn.Linear.*"
                                         r"fine-tuned instead \(30 steps\)"):
        conv.check_finetune(LitConvHead().model)
    assert conv.method == "finetune" and conv.steps == 30


class LitReadsTrainer(LitTinyVal):
    """training_step reads the trainer (fine in a fit, not on the probe's bare copy)."""

    def training_step(self, batch: tuple, batch_idx: int) -> torch.Tensor:
        return super().training_step(batch, batch_idx) * (1.0 + 0.0 * self.trainer.global_step)


def test_a_training_step_that_needs_the_trainer_falls_back_to_the_fine_tune() -> None:
    module = LitReadsTrainer()
    runner = _runner(module, ImportanceSettings(noise_repeats=0))
    runner.resolve_monitor(module.model, None, "min")
    with pytest.warns(UserWarning, match=r"training_step failed outside a Trainer: RuntimeError"):
        runner.check_finetune(module.model)
    assert runner.method == "finetune"
    trained = runner.finetune(copy.deepcopy(module.model))  # the fine-tune runs in a Trainer
    assert any(not torch.equal(a, b) for a, b in zip(trained.parameters(), module.model.parameters()))


def test_probe_settings_refuse_fine_tune_options() -> None:
    with pytest.raises(ValueError, match=r"ImportanceSettings\(steps=5, lr=0.1\) configures the fine-tune.*"
                                         r"method='finetune'"):
        ImportanceSettings(steps=5, lr=0.1)
    with pytest.raises(ValueError, match=r"kd_alpha=1.0"):
        ImportanceSettings(kd_alpha=1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        ImportanceSettings(method="oracle")
    with pytest.raises(ValueError, match="probe_weight_decay"):
        ImportanceSettings(probe_weight_decay=-1.0)
    assert ImportanceSettings().bn_batch_count == 8
    assert ImportanceSettings(method="finetune").bn_batch_count == 0
    assert ImportanceSettings(bn_batches=2).bn_batch_count == 2


def test_the_refit_keeps_features_and_labels_not_images() -> None:
    from lightning_layermerge.fit.head_probe import _record

    module = LitTinyVal().eval()
    train, _ = loaders(batch_size=32, n=300)
    train = torch.utils.data.DataLoader(train.dataset, batch_size=32)  # the same batches twice
    head, features, kept = _record(module, module.model, type(module).training_step, train)
    originals = list(train)
    assert len(kept) == len(features) == len(originals)
    for (x, y), (x0, y0), f in zip(kept, originals, features):
        assert x.shape == x0.shape and x.stride() == (0,) * x.dim() and not x.any()  # a zero-stride placeholder
        assert torch.equal(y, y0) and f.shape == (x0.shape[0], head.in_features)
