"""AB: the hand-computed boundary loss and its layer weights, connectors, the init stage, the golden-value cases."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdbench.methods.ab import AB, ABConfig, boundary_loss, make_connector
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START, TinyNet, build_method, info, init_stage_losses, make_batch, outputs

TEACHER = info((4, 6, 12), (1, 1, 2))  # tap 1: same shape as the student's (identity), tap 2: 8 -> 12 channels


def build(s: FeatureInfo, t: FeatureInfo, image_size: int = 8, **kw) -> AB:
    return build_method(AB, s, t, image_size, rng=True, **kw)


def test_defaults():
    cfg = ABConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.margin, cfg.init_weight) == (1.0, 0.0, 1.0, 1.0, 1.0)
    assert cfg.connect_equal_shapes is False
    assert AB.needs == frozenset({"preact"})


def test_boundary_loss_by_hand():
    source = torch.tensor([-2.0, -0.5, 0.5, 2.0, 0.3, -0.3, 0.0])
    target = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 0.0])  # last: a teacher value of 0 counts as off
    # off: -2 is past the margin (0); -0.5 -> 0.5^2; 0.5 -> 1.5^2.  on: 2 past the margin (0); 0.3 -> 0.7^2;
    # -0.3 -> 1.3^2.  off at 0: (0 + 1)^2.
    expected = 0.25 + 2.25 + 0.49 + 1.69 + 1.0
    assert boundary_loss(source, target, 1.0).item() == pytest.approx(expected, rel=1e-6)
    # margin 0.5: off: -0.5 is at the margin (not > -0.5) -> 0; 0.5 -> 1^2; on: 0.3 -> 0.2^2; -0.3 -> 0.8^2; 0 -> 0.25
    assert boundary_loss(source, target, 0.5).item() == pytest.approx(1.0 + 0.04 + 0.64 + 0.25, rel=1e-6)


def test_layer_weights_and_batch_scaling_by_hand():
    # Two block groups of 7 channels at 1x1, equal shapes -> identity connectors; weights 1/2 and 1.
    s = t = info((1, 7, 7), (1, 1, 1))
    m = build(s, t, image_size=1)
    assert all(isinstance(c, nn.Identity) for c in m.connectors)
    src = torch.tensor([-2.0, -0.5, 0.5, 2.0, 0.3, -0.3, 0.0]).view(1, 7, 1, 1)
    tgt = torch.tensor([-1.0, -1.0, -1.0, 1.0, 1.0, 1.0, 0.0]).view(1, 7, 1, 1)
    per_sample = 5.68
    for b in (1, 3):  # a batch of b copies: the sum grows b times, the division by the batch size undoes it
        stem = torch.zeros(b, 1, 1, 1)
        out_s = ModelOutput(
            torch.zeros(b, 10), [stem] * 3, [stem, src.repeat(b, 1, 1, 1), src.repeat(b, 1, 1, 1)], torch.zeros(b, 7)
        )
        out_t = ModelOutput(
            torch.zeros(b, 10),
            [stem] * 3,
            [stem, tgt.repeat(b, 1, 1, 1), 2 * tgt.repeat(b, 1, 1, 1)],
            torch.zeros(b, 7),
        )
        expected = (0.5 * per_sample + 1.0 * per_sample) / 1000 * 3
        assert m.ab_loss(out_s, out_t).item() == pytest.approx(expected, rel=1e-6)
        # The main stage adds nothing; the init stage scales by init_weight.
        assert m.loss(out_s, out_t, make_batch(b), START) == {}
    m2 = build(s, t, image_size=1, init_weight=4.0)
    got = m2.init_stage(TinyNet()).loss(out_s, out_t, make_batch(3))
    assert set(got) == {"ab"} and got["ab"].item() == pytest.approx(4 * expected, rel=1e-6)


def test_zero_when_student_agrees_beyond_margin():
    gen = torch.Generator().manual_seed(5)
    s = t = info((4, 6, 8), (1, 1, 2))
    m = build(s, t)
    out_t = outputs(gen, t, 2)
    agree = [1.5 * torch.where(p > 0, 1.0, -1.0) for p in out_t.preact]
    out_s = ModelOutput(out_t.logits, [a.relu() for a in agree], agree, out_t.pooled)
    assert m.ab_loss(out_s, out_t).item() == 0.0
    assert m.ab_loss(out_t, out_t).item() > 0  # matching values inside the margin still pay


@pytest.mark.parametrize(
    ("s_size", "t_size", "kind"),
    [(8, 8, nn.Conv2d), (8, 4, nn.Conv2d), (4, 8, nn.ConvTranspose2d), (6, 4, nn.Conv2d), (2, 8, nn.ConvTranspose2d)],
)
def test_connector_maps_to_teacher_shape(s_size, t_size, kind):
    conn = make_connector(3, s_size, 5, t_size)
    assert isinstance(conn[0], kind) and conn[0].bias is None and isinstance(conn[1], nn.BatchNorm2d)
    assert conn(torch.randn(2, 3, s_size, s_size)).shape == (2, 5, t_size, t_size)
    if s_size == t_size:
        assert conn[0].kernel_size == (1, 1)
    assert isinstance(make_connector(5, 4, 5, 4), nn.Identity)
    assert isinstance(make_connector(5, 4, 5, 4, always=True)[0], nn.Conv2d)


def test_connectors_frozen_registered_and_round_trip():
    m = build(TinyNet.feature_info, TEACHER)
    assert isinstance(m.connectors[0], nn.Identity) and isinstance(m.connectors[1][0], nn.Conv2d)
    params = list(m.parameters())
    assert params and not any(p.requires_grad for p in params)  # trained in the init stage only
    sd = m.state_dict()
    assert {"connectors.1.0.weight", "connectors.1.1.running_mean", "connectors.1.1.running_var"} <= set(sd)
    with torch.no_grad():
        m.connectors[1][0].weight.add_(1.0)
        m.connectors[1][1].running_mean.add_(0.5)
    m2 = build(TinyNet.feature_info, TEACHER)
    m2.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    every = build(TinyNet.feature_info, TEACHER, connect_equal_shapes=True)
    assert isinstance(every.connectors[0][0], nn.Conv2d)


def test_init_stage_parameter_set():
    m = build(TinyNet.feature_info, TEACHER)
    torch.manual_seed(1)
    student = TinyNet()
    stage = m.init_stage(student)
    assert not any(k.startswith("_student") for k in m.state_dict())  # the method keeps no reference to it
    assert stage.epochs is None and stage.needs_student
    assert [id(p) for p in stage.parameters] == [id(p) for p in m.connectors.parameters()]
    assert stage.student_modules == [student.stem, student.group1, student.group2]
    got = {id(p) for p in stage.all_parameters()}
    assert len(got) == len(stage.all_parameters())
    expected = {id(p) for p in m.connectors.parameters()}
    expected |= {id(p) for name, p in student.named_parameters() if not name.startswith("fc.")}
    assert got == expected
    assert not got & {id(p) for p in student.head.parameters()}


def test_init_stage_loss_decreases():
    _, losses = init_stage_losses(lambda: build(TinyNet.feature_info, TEACHER), TEACHER, lr=0.5)
    assert losses[-1] < 0.7 * losses[0], losses


# ---------------------------------------------------------------------------------------------- golden values

GOLDEN_STUDENT = info((4, 6, 8, 10), (1, 1, 2, 4))
GOLDEN_TEACHER = info((4, 6, 12, 16), (1, 2, 1, 4))  # tap 1: 3x3/s2 conv; tap 2: transposed conv; tap 3: 1x1


def golden_values() -> dict[str, float]:
    m = build(GOLDEN_STUDENT, GOLDEN_TEACHER, image_size=16)
    gen = torch.Generator().manual_seed(1234)
    out_s, out_t = outputs(gen, GOLDEN_STUDENT, 3, 16), outputs(gen, GOLDEN_TEACHER, 3, 16)
    return {k: float(v.detach()) for k, v in m.init_stage(TinyNet()).loss(out_s, out_t, make_batch(3)).items()}
