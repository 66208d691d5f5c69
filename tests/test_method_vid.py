"""VID: hand-computed likelihood, the variance initialisation and training, spatial pooling, the golden-value cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.methods.vid import VID, VIDConfig
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START, build_method, info, make_batch, outputs

SIZE = 32  # VID's checks run at CIFAR's image size


def build(s: FeatureInfo, t: FeatureInfo, image_size: int = SIZE, **kw) -> VID:
    return build_method(VID, s, t, image_size, rng=True, **kw)


def test_defaults():
    cfg = VIDConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight) == (1.0, 0.0, 1.0)
    assert cfg.init_pred_var == 5.0 and cfg.eps == 1e-5
    assert VID.needs == frozenset({"feats"})


def test_variance_starts_at_init_pred_var_and_is_registered():
    s, t = info((8, 4, 6, 8), (1, 1, 2, 4)), info((16, 8, 12, 16), (1, 1, 2, 4))
    m = build(s, t)
    assert len(m.layers) == 3  # feats[1:]
    names = dict(m.named_parameters())
    for i, c in enumerate((8, 12, 16)):
        log_scale = names[f"layers.{i}.log_scale"]
        assert log_scale.shape == (c,) and log_scale.requires_grad
        var = torch.log1p(torch.exp(log_scale.detach().double())) + 1e-5
        torch.testing.assert_close(var, torch.full((c,), 5.0, dtype=torch.float64), rtol=1e-6, atol=0)
        assert f"layers.{i}.log_scale" in m.state_dict()
        # mid width = teacher channels, three bias-free 1x1 convs
        convs = [mod for mod in m.layers[i].regressor if isinstance(mod, torch.nn.Conv2d)]
        assert [(cv.in_channels, cv.out_channels) for cv in convs] == [((4, 6, 8)[i], c), (c, c), (c, c)]
        assert all(cv.kernel_size == (1, 1) and cv.bias is None for cv in convs)


def test_hand_computed_value():
    # One block group, 2 channels, 1x2 pixels; identity regressor: the mean is the (non-negative) student map.
    s = t = FeatureInfo(channels=(1, 2), reduction=(1, 1), pooled_dim=2, num_classes=10)
    m = build(s, t, image_size=2, weight=3.0)
    with torch.no_grad():
        for conv in m.layers[0].regressor[::2]:
            conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1))
    f_s = torch.tensor([[[[1.0, 2.0]], [[0.0, 3.0]]]])  # (1, 2, 1, 2)
    f_t = torch.tensor([[[[1.0, 0.0]], [[2.0, 3.0]]]])
    # squared errors 0, 4, 4, 0; var 5 everywhere: mean NLL = 0.5 * (8 / 4 / 5 + ln 5)
    expected = 3.0 * 0.5 * (0.4 + math.log(5.0))
    stem = torch.zeros(1, 1, 1, 2)
    out_s = ModelOutput(logits=torch.zeros(1, 10), feats=[stem, f_s], preact=[stem, f_s], pooled=torch.zeros(1, 2))
    out_t = ModelOutput(logits=torch.zeros(1, 10), feats=[stem, f_t], preact=[stem, f_t], pooled=torch.zeros(1, 2))
    got = m.loss(out_s, out_t, make_batch(1, SIZE), START)
    assert set(got) == {"vid"}
    assert got["vid"].item() == pytest.approx(expected, rel=1e-5)


def test_larger_map_is_average_pooled():
    # Student group output twice the teacher's size: same as feeding the 2x2-average-pooled student map.
    s_big, s_small = info((4, 6), (1, 1)), info((4, 6), (1, 2))
    t = info((4, 5), (1, 2))
    m_big, m_small = build(s_big, t), build(s_small, t)
    m_small.load_state_dict(m_big.state_dict())
    gen = torch.Generator().manual_seed(3)
    out_s, out_t = outputs(gen, s_big, 2, SIZE), outputs(gen, t, 2, SIZE)
    pooled = [out_s.feats[0], F.avg_pool2d(out_s.feats[1], 2)]
    out_s_small = ModelOutput(out_s.logits, pooled, pooled, out_s.pooled)
    a = m_big.loss(out_s, out_t, make_batch(2, SIZE), START)["vid"]
    b = m_small.loss(out_s_small, out_t, make_batch(2, SIZE), START)["vid"]
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    # And the teacher is pooled when it is the larger one.
    t_big = info((4, 5), (1, 1))
    m_t = build(s_small, t_big)
    out_tb = outputs(gen, t_big, 2, SIZE)
    pooled_t = [out_tb.feats[0], F.avg_pool2d(out_tb.feats[1], 2)]
    out_t_small = ModelOutput(out_tb.logits, pooled_t, pooled_t, out_tb.pooled)
    torch.testing.assert_close(
        m_t.loss(out_s_small, out_tb, make_batch(2, SIZE), START)["vid"],
        m_small.loss(out_s_small, out_t_small, make_batch(2, SIZE), START)["vid"],
        rtol=1e-6,
        atol=1e-7,
    )


def test_variance_and_regressor_train():
    s, t = info((4, 6, 8), (1, 1, 2)), info((4, 10, 12), (1, 1, 2))
    m = build(s, t)
    gen = torch.Generator().manual_seed(1)
    out_s, out_t = outputs(gen, s, 4, SIZE), outputs(gen, t, 4, SIZE)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.loss(out_s, out_t, make_batch(4, SIZE), START)["vid"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    opt.step()
    for i in range(2):
        assert not torch.equal(m.layers[i].log_scale.detach(), before[f"layers.{i}.log_scale"])


def test_state_dict_round_trip():
    s, t = info((4, 6, 8), (1, 1, 2)), info((4, 10, 12), (1, 1, 2))
    m = build(s, t)
    with torch.no_grad():
        m.layers[1].log_scale.add_(0.25)
    m2 = build(s, t)
    m2.load_state_dict(m.state_dict())
    for k, v in m.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k


# ---------------------------------------------------------------------------------------------- golden values

GOLDEN_STUDENT = info((4, 6, 8, 10), (1, 1, 2, 4))
GOLDEN_TEACHER = info((8, 12, 16, 20), (1, 2, 1, 8))  # tap 1, 3: student larger; tap 2: teacher


def golden_values() -> dict[str, float]:
    m = build(GOLDEN_STUDENT, GOLDEN_TEACHER)
    gen = torch.Generator().manual_seed(1234)
    out_s, out_t = outputs(gen, GOLDEN_STUDENT, 3, SIZE), outputs(gen, GOLDEN_TEACHER, 3, SIZE)
    return {k: float(v.detach()) for k, v in m.loss(out_s, out_t, make_batch(3, SIZE), START).items()}
