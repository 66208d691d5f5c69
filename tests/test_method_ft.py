"""FT: the factor loss by hand, paraphraser / translator shapes, the init stage and the frozen paraphraser."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import KdbenchError
from kdbench.methods.ft import FT, FTConfig, factor_transfer_loss
from kdbench.models.base import FeatureInfo
from tests.method_helpers import START, build_method, info, make_batch, make_ctx, outputs, sgd_losses

STUDENT = info((4, 6, 8), (1, 1, 2))
TEACHER = info((4, 8, 14), (1, 1, 2))  # factor channels int(14 * 0.5) = 7


def build(s: FeatureInfo = STUDENT, t: FeatureInfo = TEACHER, image_size: int = 8, **kw) -> FT:
    return build_method(FT, s, t, image_size, rng=True, **kw)


def test_defaults():
    cfg = FTConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight) == (1.0, 0.0, 200.0)
    assert (cfg.factor_rate, cfg.factor_mode, cfg.factor_power) == (0.5, "attention", 2.0)
    assert FT.needs == frozenset({"feats"})
    with pytest.raises(KdbenchError, match="factor_mode"):
        build(factor_mode="l2")


def test_module_shapes():
    m = build(t=info((4, 8, 15), (1, 1, 2)))  # odd teacher width: int(15 * 0.5) = 7 factor channels
    convs = [mod for mod in m.paraphraser.encoder if isinstance(mod, nn.Conv2d)]
    deconvs = [mod for mod in m.paraphraser.decoder if isinstance(mod, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(15, 15), (15, 7), (7, 7)]
    assert [(c.in_channels, c.out_channels) for c in deconvs] == [(7, 7), (7, 15), (15, 15)]
    assert not any(isinstance(mod, nn.BatchNorm2d) for mod in m.paraphraser.modules())
    tconvs = [mod for mod in m.translator.encoder if isinstance(mod, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in tconvs] == [(8, 8), (8, 7), (7, 7)]
    assert sum(isinstance(mod, nn.BatchNorm2d) for mod in m.translator.modules()) == 3
    f = torch.randn(2, 15, 4, 4)
    assert m.paraphraser.encode(f).shape == (2, 7, 4, 4) and m.paraphraser(f).shape == f.shape
    assert m.translator(torch.randn(2, 8, 4, 4)).shape == (2, 7, 4, 4)


def test_factor_loss_by_hand():
    # attention mode: channel mean of squares [1, 0] vs [1, 1] -> [1, 0] vs [1/sqrt2, 1/sqrt2]
    f_s = torch.tensor([[[[1.0, 0.0]], [[-1.0, 0.0]]]])  # (1, 2, 1, 2)
    f_t = torch.tensor([[[[1.0, 1.0]], [[1.0, -1.0]]]])
    expected = (abs(1 - 1 / math.sqrt(2)) + 1 / math.sqrt(2)) / 2  # = 0.5
    assert factor_transfer_loss(f_s, f_t).item() == pytest.approx(expected, rel=1e-6)
    # flatten mode: [3, 4] / 5 vs [4, 3] / 5 -> mean |diff| = 0.2
    a, b = torch.tensor([[[[3.0, 4.0]]]]), torch.tensor([[[[4.0, 3.0]]]])
    assert factor_transfer_loss(a, b, mode="flatten").item() == pytest.approx(0.2, rel=1e-6)
    # the squares drop the sign that the flatten mode keeps
    assert factor_transfer_loss(a, -a).item() == pytest.approx(0.0, abs=1e-7)
    assert factor_transfer_loss(a, -a, mode="flatten").item() == pytest.approx(1.4, rel=1e-6)


def test_factor_loss_zero_identical_and_scale_invariant():
    gen = torch.Generator().manual_seed(4)
    f = torch.randn(3, 5, 4, 4, generator=gen)
    g = torch.randn(3, 5, 4, 4, generator=gen)
    for mode in ("attention", "flatten"):
        assert factor_transfer_loss(f, f.clone(), mode=mode).item() == pytest.approx(0.0, abs=1e-7)
        torch.testing.assert_close(factor_transfer_loss(3.0 * f, g, mode=mode), factor_transfer_loss(f, g, mode=mode))


def test_factor_loss_pools_the_larger_map():
    gen = torch.Generator().manual_seed(5)
    big, small = torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 3, 4, 4, generator=gen)
    torch.testing.assert_close(factor_transfer_loss(big, small), factor_transfer_loss(F.avg_pool2d(big, 2), small))
    torch.testing.assert_close(factor_transfer_loss(small, big), factor_transfer_loss(small, F.avg_pool2d(big, 2)))


def test_main_loss_value_and_weight():
    m = build(weight=3.0)
    m.eval()
    gen = torch.Generator().manual_seed(6)
    out_s, out_t = outputs(gen, STUDENT, 2), outputs(gen, TEACHER, 2)
    got = m.loss(out_s, out_t, make_batch(2), START)
    assert set(got) == {"ft"}
    with torch.no_grad():
        ref = factor_transfer_loss(m.translator(out_s.feats[-1]), m.paraphraser.encode(out_t.feats[-1]))
    torch.testing.assert_close(got["ft"].detach(), 3.0 * ref)


def test_reconstruction_loss_with_zero_paraphraser():
    # All weights and biases zero: every layer outputs LeakyReLU(0) = 0, so the loss is the mean of t^2.
    m = build()
    with torch.no_grad():
        for p in m.paraphraser.parameters():
            p.zero_()
    gen = torch.Generator().manual_seed(7)
    out_s, out_t = outputs(gen, STUDENT, 2), outputs(gen, TEACHER, 2)
    got = m.init_stage(nn.Identity()).loss(out_s, out_t, make_batch(2))
    assert set(got) == {"ft_rec"}
    assert got["ft_rec"].item() == pytest.approx(out_t.feats[-1].pow(2).mean().item(), rel=1e-6)


def test_init_stage_is_exactly_the_paraphraser():
    m = build()
    stage = m.init_stage(nn.Identity())
    assert stage.epochs is None
    assert [id(p) for p in stage.parameters] == [id(p) for p in m.paraphraser.parameters()]
    assert not set(map(id, stage.parameters)) & set(map(id, m.translator.parameters()))
    assert stage.student_modules == [] and not stage.needs_student  # the student is not run


@pytest.mark.parametrize(
    ("arch", "lr"),
    [
        ("resnet8", 0.01),
        ("resnet110", 0.01),
        ("resnet8x4", 0.01),
        ("resnet32x4", 0.01),
        ("wrn_16_1", 0.01),
        ("wrn_40_2", 0.01),
        ("resnet50", None),
        ("vgg8", None),
        ("mobilenetv2", None),
        ("shufflenetv2", None),
    ],
)
def test_init_stage_lr_is_the_references(arch, lr):
    """RepDistiller's helper/pretrain.py: lr 0.01 for a CIFAR ResNet / WRN student, else the run's (None here)."""
    torch.manual_seed(0)
    ctx = make_ctx(STUDENT, TEACHER, student_arch=arch)
    assert FT(FTConfig(), ctx).init_stage(nn.Identity()).lr == lr


def test_paraphraser_frozen_in_main_stage():
    m = build()
    assert not any(p.requires_grad for p in m.paraphraser.parameters())
    assert all(p.requires_grad for p in m.translator.parameters())
    m.train()
    assert m.training and m.translator.training and not m.paraphraser.training
    gen = torch.Generator().manual_seed(8)
    out_s, out_t = outputs(gen, STUDENT, 2), outputs(gen, TEACHER, 2)
    m.loss(out_s, out_t, make_batch(2), START)["ft"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.translator.parameters())
    assert all(p.grad is None for p in m.paraphraser.parameters())
    # During the init stage (the harness turns the gradients on) train() puts it in train mode.
    for p in m.paraphraser.parameters():
        p.requires_grad_(True)
    m.train()
    assert m.paraphraser.training
    m.eval()
    assert not m.paraphraser.training and not m.translator.training


def test_init_stage_loss_decreases():
    m = build()
    stage = m.init_stage(nn.Identity())
    for p in stage.parameters:
        p.requires_grad_(True)
    m.train()
    gen = torch.Generator().manual_seed(9)
    out_s, out_t = outputs(gen, STUDENT, 4), outputs(gen, TEACHER, 4)
    losses = sgd_losses(stage.parameters, lambda: sum(stage.loss(out_s, out_t, make_batch(4)).values()), 0.05)
    assert losses[-1] < 0.9 * losses[0], losses


def test_state_dict_round_trip():
    m = build()
    with torch.no_grad():
        m.paraphraser.encoder[0].weight.add_(1.0)
        m.translator.encoder[1].running_var.add_(0.5)
    assert "translator.encoder.1.running_var" in m.state_dict()
    m2 = build()
    m2.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------- golden values

GOLDEN_STUDENT = info((4, 6, 10), (1, 1, 2))
GOLDEN_TEACHER = info((4, 8, 12), (1, 1, 4))  # the student's last map is twice the teacher's: factors pooled


def golden_values() -> dict[str, float]:
    gen = torch.Generator().manual_seed(1234)
    out_s, out_t = outputs(gen, GOLDEN_STUDENT, 3), outputs(gen, GOLDEN_TEACHER, 3)
    values = {}
    for mode in ("attention", "flatten"):
        m = build(GOLDEN_STUDENT, GOLDEN_TEACHER, factor_mode=mode)
        values[f"{mode}/ft"] = float(m.loss(out_s, out_t, make_batch(3), START)["ft"].detach())
    values["ft_rec"] = float(m.init_stage(nn.Identity()).loss(out_s, out_t, make_batch(3))["ft_rec"].detach())
    return values
