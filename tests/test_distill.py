"""Distillation loss and the training_step patch (no Trainer needed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from lm_helpers import LitTiny
from torch import nn

from lightning_layermerge.fit.distill import Distillation, DistillationPatch, frozen_teacher, kd_loss


def test_kd_loss_on_logits_is_t2_scaled_kl() -> None:
    torch.manual_seed(0)
    s, t = torch.randn(6, 10), torch.randn(6, 10)
    temp = 3.0
    p_t = F.softmax(t / temp, 1)
    want = (p_t * (p_t.log() - F.log_softmax(s / temp, 1))).sum(1).mean() * temp**2
    assert kd_loss(s, t, temp).item() == pytest.approx(want.item(), rel=1e-5)
    assert kd_loss(t, t, temp).item() == pytest.approx(0.0, abs=1e-6)


def test_kd_loss_is_mse_for_other_tensors_and_averages_structures() -> None:
    torch.manual_seed(0)
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    assert kd_loss(a, b).item() == pytest.approx(F.mse_loss(a, b).item(), rel=1e-6)
    logits_s, logits_t = torch.randn(2, 5), torch.randn(2, 5)
    both = kd_loss({"x": a, "y": logits_s}, {"x": b, "y": logits_t}, 2.0)
    assert both.item() == pytest.approx((F.mse_loss(a, b) + kd_loss(logits_s, logits_t, 2.0)).item() / 2, rel=1e-5)
    with pytest.raises(ValueError, match="different structures"):
        kd_loss((a, a), a)
    with pytest.raises(ValueError, match="no floating-point tensor"):
        kd_loss(torch.tensor([1, 2]), torch.tensor([1, 2]))


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"alpha": -1.0}, "alpha"), ({"alpha": math.inf}, "alpha"), ({"temperature": 0.0}, "temperature"),
    ({"loss_fn": 3}, "loss_fn"),
])
def test_distillation_validates(kwargs: dict, message: str) -> None:
    with pytest.raises((ValueError, TypeError), match=message):
        Distillation(**kwargs)


def test_user_loss_fn_is_used() -> None:
    cfg = Distillation(loss_fn=lambda s, t: (s - t).abs().sum())
    assert cfg.loss(torch.ones(2, 2), torch.zeros(2, 2)).item() == 4.0


def test_frozen_teacher_is_a_detached_eval_copy() -> None:
    student = nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.5)).train()
    teacher = frozen_teacher(student)
    assert teacher is not student and not teacher.training
    assert all(not p.requires_grad for p in teacher.parameters())
    assert all(p.requires_grad for p in student.parameters())


def test_patch_adds_alpha_times_kd_and_detaches_cleanly() -> None:
    torch.manual_seed(0)
    module = LitTiny()
    module.log = lambda *args, **kwargs: None  # no trainer attached in this unit test
    teacher = frozen_teacher(module.model)
    with torch.no_grad():  # make the student differ from the teacher
        for p in module.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    cfg = Distillation(alpha=0.7, temperature=2.0)
    patch = DistillationPatch(cfg, teacher, module, module.model, log_name=None)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    plain = module.training_step((x, y), 0)
    patch.attach()
    assert "training_step" in vars(module) and patch.attached
    total = module.training_step((x, y), 0)
    with torch.no_grad():
        kd = kd_loss(module.model(x), teacher(x), 2.0)
    assert total.item() == pytest.approx(plain.item() + 0.7 * kd.item(), rel=1e-5)
    # Gradients reach the student only; the teacher stays frozen.
    total.backward()
    assert all(p.grad is not None for p in module.model.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    patch.detach()
    assert "training_step" not in vars(module) and not patch.attached
    assert module.training_step((x, y), 0).item() == pytest.approx(plain.item(), rel=1e-6)
    assert not module.model._forward_hooks  # the recording hook is gone


def test_patch_keeps_dict_outputs_and_skipped_batches() -> None:
    module = LitTiny()
    module.log = lambda *args, **kwargs: None
    teacher = frozen_teacher(module.model)

    def step(batch, batch_idx):
        if batch_idx == 1:
            return None  # the user skips this batch
        x, y = batch
        return {"loss": F.cross_entropy(module.model(x), y), "extra": 1}

    module.training_step = step  # an instance-level step of the user's is respected and restored
    patch = DistillationPatch(Distillation(alpha=1.0), teacher, module, module.model, log_name=None)
    patch.attach()
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
    out = module.training_step((x, y), 0)
    assert set(out) == {"loss", "extra"} and out["extra"] == 1
    assert module.training_step((x, y), 1) is None
    patch.detach()
    assert module.training_step is step
