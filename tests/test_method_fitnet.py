"""FitNet: regressor choice per size ratio, hand-computed values, gradients, state, the golden-value cases."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from kdbench.method import MethodContext, discover
from kdbench.method_parts import regressor_conv
from kdbench.methods.fitnet import FitNet, FitNetConfig
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START, STUDENT, TEACHER, TEACHER_X, make_batch, make_ctx, make_out

# Tiny made-up networks at image size 8: taps of 8, 8, 4, 2 pixels a side.
# A VGG-like teacher (one more tap, everything one stride coarser) and a MobileNet-like student.
STUDENT_X = FeatureInfo(channels=(4, 4, 6, 8, 10), reduction=(1, 1, 2, 4, 8), pooled_dim=10, num_classes=5)

# One forward + backward through real networks: a cross-family pair by default, three more marked slow.


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, **cfg) -> FitNet:
    torch.manual_seed(0)
    return FitNet(FitNetConfig(**cfg), make_ctx(student, teacher))


def set_identity_scaled(m: FitNet, scale: float) -> None:
    """1x1 conv = scale * identity, no bias; BN in eval with statistics that make it exactly the identity."""
    conv, bn = m.regressor[0], m.regressor[1]
    with torch.no_grad():
        conv.weight.copy_(scale * torch.eye(conv.out_channels).view(conv.out_channels, conv.in_channels, 1, 1))
        conv.bias.zero_()
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0 - bn.eps)
    m.eval()


def test_registered_with_reference_defaults():
    entry = discover()["fitnet"]
    assert entry.cls is FitNet
    cfg = FitNetConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.hint_layer) == (1.0, 0.0, 100.0, 2)
    assert FitNet.needs == {"feats"}


@pytest.mark.parametrize(
    "s,t,kind,kernel,stride",
    [
        (16, 8, nn.Conv2d, 3, 2),  # student twice the teacher: strided conv
        (8, 16, nn.ConvTranspose2d, 4, 2),  # student half the teacher: strided transposed conv
        (8, 8, nn.Conv2d, 1, 1),  # equal: 1x1
        (10, 8, nn.Conv2d, 3, 1),  # larger by 2 pixels: valid 3x3
        (32, 8, nn.Conv2d, 25, 1),  # 4x larger: valid 25x25, as the reference
        (4, 16, nn.ConvTranspose2d, 13, 1),  # 4x smaller: the reference fails; transposed 13x13
        (5, 8, nn.ConvTranspose2d, 4, 1),
    ],
)
def test_regressor_choice_and_output_shape(s, t, kind, kernel, stride):
    reg = regressor_conv(3, s, 5, t, bias=True)  # FitNet's conv; AB's connector is the same without a bias
    assert type(reg) is kind
    assert reg.kernel_size == (kernel, kernel) and reg.stride == (stride, stride)
    assert reg(torch.zeros(2, 3, s, s)).shape == (2, 5, t, t)
    assert reg.bias is not None and regressor_conv(3, s, 5, t, bias=False).bias is None


def test_zero_when_regressed_student_equals_teacher():
    info = FeatureInfo(channels=(4, 4, 6, 8), reduction=(1, 1, 2, 4), pooled_dim=8, num_classes=5)
    m = build(info, info)
    set_identity_scaled(m, 1.0)
    out = make_out(info, 3, torch.Generator().manual_seed(1))
    loss = m.loss(out, out, make_batch(3), START)
    assert set(loss) == {"fitnet"}
    assert loss["fitnet"].item() == pytest.approx(0.0, abs=1e-10)


def test_hand_computed_value():
    # regressor = ReLU(2 * x): loss = 100 * mean((2 s - t)^2) over every element of the hint map.
    info = FeatureInfo(channels=(1, 1, 2, 2), reduction=(1, 1, 1, 1), pooled_dim=2, num_classes=5)
    m = FitNet(FitNetConfig(), MethodContext(info, info, 5, 10, torch.zeros(10, dtype=torch.long), image_size=2))
    set_identity_scaled(m, 2.0)
    s_map = torch.tensor([[[[1.0, 0.0], [0.5, 2.0]], [[0.0, 1.0], [3.0, 0.0]]]])  # 1 x 2 x 2 x 2
    t_map = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]], [[0.0, 0.0], [2.0, 2.0]]]])
    # 2s - t: [[1, -1], [0, 3]], [[0, 2], [4, -2]] -> squares 1 1 0 9 0 4 16 4 = 35, mean 35/8.
    expected = 100.0 * 35.0 / 8.0
    zero = torch.zeros(1, 1, 2, 2)
    s = ModelOutput(torch.zeros(1, 5), [zero, zero, s_map, zero], [zero, zero, s_map, zero], torch.zeros(1, 2))
    t = ModelOutput(torch.zeros(1, 5), [zero, zero, t_map, zero], [zero, zero, t_map, zero], torch.zeros(1, 2))
    assert m.loss(s, t, make_batch(1), START)["fitnet"].item() == pytest.approx(expected, rel=1e-6)
    # beta scales the term linearly
    m.cfg.weight = 1.0
    assert m.loss(s, t, make_batch(1), START)["fitnet"].item() == pytest.approx(35.0 / 8.0, rel=1e-6)


def test_uses_only_the_hint_layer():
    m = build()
    gen = torch.Generator().manual_seed(2)
    s, t = make_out(STUDENT, 4, gen), make_out(TEACHER, 4, gen)
    ref = m.loss(s, t, make_batch(4), START)["fitnet"].item()
    for out in (s, t):
        for i in (0, 1, 3):
            out.feats[i] = out.feats[i] * 7.0 + 1.0
    assert m.loss(s, t, make_batch(4), START)["fitnet"].item() == pytest.approx(ref, rel=1e-6)
    m1 = build(hint_layer=1)
    assert m1.regressor[0].in_channels == STUDENT.channels[1]


def test_gradients_reach_regressor_and_student_only():
    m = build()
    gen = torch.Generator().manual_seed(3)
    s, t = make_out(STUDENT, 4, gen), make_out(TEACHER, 4, gen)
    s.feats[2].requires_grad_(True)
    m.loss(s, t, make_batch(4), START)["fitnet"].backward()
    assert s.feats[2].grad is not None and s.feats[2].grad.abs().sum() > 0
    params = dict(m.named_parameters())
    assert set(params) == {"regressor.0.weight", "regressor.0.bias", "regressor.1.weight", "regressor.1.bias"}
    for name, p in params.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not t.feats[2].requires_grad


def test_state_dict_round_trip():
    m = build()
    gen = torch.Generator().manual_seed(4)
    s, t = make_out(STUDENT, 4, gen), make_out(TEACHER, 4, gen)
    m.train()
    m.loss(s, t, make_batch(4), START)  # updates the BN running statistics
    state = m.state_dict()
    assert {"regressor.1.running_mean", "regressor.1.running_var", "regressor.1.num_batches_tracked"} <= set(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    torch.manual_seed(123)
    m2 = FitNet(FitNetConfig(), make_ctx(STUDENT, TEACHER))
    m2.load_state_dict(torch.load(buf, weights_only=True))
    for key, value in m.state_dict().items():
        assert torch.equal(value, m2.state_dict()[key]), key
    m.eval()
    m2.eval()
    assert m.loss(s, t, make_batch(4), START)["fitnet"].item() == m2.loss(s, t, make_batch(4), START)["fitnet"].item()


def test_not_applicable_when_hint_layer_missing():
    ctx = make_ctx(STUDENT, TEACHER)
    assert FitNet.not_applicable(FitNetConfig(), ctx) is None
    reason = FitNet.not_applicable(FitNetConfig(hint_layer=4), ctx)
    assert reason is not None and "hint_layer 4" in reason


def test_cross_shape_pair_strided_regressors():
    # hint layer 2: student 4 px, VGG-like teacher 2 px -> strided conv; and the reverse -> transposed conv.
    m = build(STUDENT, TEACHER_X)
    assert type(m.regressor[0]) is nn.Conv2d and m.regressor[0].stride == (2, 2)
    m2 = build(TEACHER_X, STUDENT_X)
    assert type(m2.regressor[0]) is nn.ConvTranspose2d
    gen = torch.Generator().manual_seed(5)
    for mm, si, ti in ((m, STUDENT, TEACHER_X), (m2, TEACHER_X, STUDENT_X)):
        loss = mm.loss(make_out(si, 3, gen), make_out(ti, 3, gen), make_batch(3), START)["fitnet"]
        assert torch.isfinite(loss)


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Each case: inputs from a seeded generator, the method built under torch.manual_seed(0), train mode."""
    cases = {
        "same_shape": (STUDENT, TEACHER),  # equal sizes: 1x1 conv
        "student_twice": (STUDENT, TEACHER_X),  # strided conv
        "student_half": (TEACHER_X, STUDENT_X),  # strided transposed conv
    }
    values = {}
    for k, (name, (si, ti)) in enumerate(cases.items()):
        m = build(si, ti)
        gen = torch.Generator().manual_seed(100 + k)
        s, t = make_out(si, 4, gen), make_out(ti, 4, gen)
        values[name] = m.loss(s, t, make_batch(4), START)["fitnet"].item()
    return values
