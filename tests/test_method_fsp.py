"""FSP: the FSP matrix and loss by hand, applicability, the init stage, the golden-value cases."""

from __future__ import annotations

import pytest
import torch

from kdbench.methods.fsp import FSP, FSPConfig, fsp_matrix
from kdbench.models.base import FeatureInfo, ModelOutput, feature_info
from tests.method_helpers import START, TinyNet, build_method, info, init_stage_losses, make_batch, make_ctx, outputs


def from_feats(feats: list[torch.Tensor]) -> ModelOutput:
    b = feats[0].shape[0]
    return ModelOutput(logits=torch.zeros(b, 10), feats=feats, preact=feats, pooled=feats[-1].mean(dim=(2, 3)))


TEACHER = info((4, 6, 8), (1, 2, 2))  # same channels; the teacher's group-1 map is half the student's size


def build(s: FeatureInfo = TinyNet.feature_info, t: FeatureInfo = TEACHER, image_size: int = 8, **kw) -> FSP:
    return build_method(FSP, s, t, image_size, rng=True, **kw)


def test_defaults():
    cfg = FSPConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.init_weight) == (1.0, 0.0, 50.0, 1.0)
    assert FSP.needs == frozenset({"feats"})


def test_fsp_matrix_by_hand():
    bottom = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])  # (1, 2, 1, 2)
    top = torch.tensor([[[[3.0, 4.0]]]])  # (1, 1, 1, 2)
    g = fsp_matrix(bottom, top)
    assert g.shape == (1, 1, 2)  # (batch, top channels, bottom channels)
    torch.testing.assert_close(g, torch.tensor([[[(3 * 1 + 4 * 2) / 2, (3 * 0 + 4 * 1) / 2]]]))
    # the larger map of the pair is average-pooled to the smaller: a 2x2 bottom against a 1x1 top
    bottom2 = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    top2 = torch.tensor([[[[2.0]], [[-1.0]]]])
    torch.testing.assert_close(fsp_matrix(bottom2, top2), torch.tensor([[[5.0], [-2.5]]]))
    torch.testing.assert_close(fsp_matrix(top2, bottom2), torch.tensor([[[5.0, -2.5]]]))


def test_fsp_loss_by_hand():
    s = t = info((2, 1), (1, 1))
    m = build(s, t, image_size=2)
    bottom = torch.tensor([[[[1.0, 2.0]], [[0.0, 1.0]]]])
    out_s = from_feats([bottom, torch.tensor([[[[3.0, 4.0]]]])])  # G_s = [5.5, 2]
    out_t = from_feats([bottom, torch.tensor([[[[1.0, 0.0]]]])])  # G_t = [0.5, 0]
    assert m.fsp_loss(out_s, out_t).item() == pytest.approx((5.0**2 + 2.0**2) / 2, rel=1e-6)
    # three maps: two pairs, summed with equal weights
    s3 = t3 = info((2, 1, 1), (1, 1, 1))
    m3 = build(s3, t3, image_size=2)
    last_s, last_t = torch.tensor([[[[1.0, 1.0]]]]), torch.tensor([[[[0.0, 2.0]]]])
    # second pair: G_s = mean([3, 4] * [1, 1]) = 3.5, G_t = mean([1, 0] * [0, 2]) = 0 -> 12.25
    got = m3.fsp_loss(from_feats([*out_s.feats, last_s]), from_feats([*out_t.feats, last_t]))
    assert got.item() == pytest.approx(14.5 + 12.25, rel=1e-6)
    m3_50 = build(s3, t3, image_size=2, init_weight=50.0)
    stage_loss = m3_50.init_stage(TinyNet()).loss(
        from_feats([*out_s.feats, last_s]), from_feats([*out_t.feats, last_t]), make_batch(1)
    )
    assert set(stage_loss) == {"fsp"} and stage_loss["fsp"].item() == pytest.approx(50 * 26.75, rel=1e-6)


def test_zero_for_identical_feats_and_main_stage_empty():
    m = build()
    gen = torch.Generator().manual_seed(3)
    out = outputs(gen, TinyNet.feature_info, 2)
    assert m.fsp_loss(out, out).item() == 0.0
    assert m.loss(out, out, make_batch(2), START) == {}
    assert list(m.parameters()) == [] and m.state_dict() == {}


def test_not_applicable():
    cfg = FSPConfig()
    wrn_40_2, wrn_40_1 = info((16, 32, 64, 128), (1, 1, 2, 4)), info((16, 16, 32, 64), (1, 1, 2, 4))
    reason = FSP.not_applicable(cfg, make_ctx(wrn_40_1, wrn_40_2))
    assert reason == (
        "FSP needs equal channel counts at every tap: teacher (16, 32, 64, 128) vs student (16, 16, 32, 64)"
    )
    FSP(cfg, make_ctx(wrn_40_1, wrn_40_2))  # the harness asks not_applicable before building; the constructor does not
    assert FSP.not_applicable(cfg, make_ctx(info((16, 32, 64, 128), (1, 1, 2, 4)), wrn_40_2)) is None
    assert FSP.not_applicable(cfg, make_ctx(TinyNet.feature_info, TEACHER)) is None  # sizes may differ
    assert "equal channel counts" in FSP.not_applicable(cfg, make_ctx(info((4, 6), (1, 1)), TEACHER))


def test_init_stage_parameter_set():
    m = build()
    student = TinyNet()
    stage = m.init_stage(student)
    assert m.state_dict() == {} and list(m.children()) == []
    assert stage.epochs is None and stage.parameters == []
    assert stage.student_modules == [student.stem, student.group1, student.group2]
    expected = [id(p) for name, p in student.named_parameters() if not name.startswith("fc.")]
    assert [id(p) for p in stage.all_parameters()] == expected


def test_init_stage_loss_decreases():
    # FSP's stage trains only student layers, which require a gradient already
    student, losses = init_stage_losses(build, TEACHER, lr=1.0)
    assert losses[-1] < 0.7 * losses[0], losses
    assert student.fc.weight.grad is None


# ---------------------------------------------------------------------------------------------- golden values

GOLDEN_STUDENT = info((4, 6, 8, 10), (1, 1, 2, 4))
GOLDEN_TEACHER = info((4, 6, 8, 10), (1, 2, 2, 2))


def golden_values() -> dict[str, float]:
    m = build(GOLDEN_STUDENT, GOLDEN_TEACHER, image_size=16)
    gen = torch.Generator().manual_seed(1234)
    out_s, out_t = outputs(gen, GOLDEN_STUDENT, 3, 16), outputs(gen, GOLDEN_TEACHER, 3, 16)
    return {k: float(v.detach()) for k, v in m.init_stage(TinyNet()).loss(out_s, out_t, make_batch(3)).items()}


# ---------------------------------------------------------------------------------------------- zoo pairs


@pytest.mark.parametrize(
    ("teacher", "student", "applicable"),
    [
        ("resnet32x4", "resnet8x4", True),
        ("wrn_40_2", "wrn_16_2", True),
        ("vgg13", "vgg8", True),
        ("resnet110", "resnet20", True),
        ("wrn_40_2", "wrn_40_1", False),
        ("resnet32x4", "shufflenetv2", False),
        ("vgg13", "mobilenetv2", False),
        ("resnet50", "vgg8", False),
    ],
)
def test_zoo_applicability(teacher, student, applicable):
    ctx = make_ctx(feature_info(student, 10), feature_info(teacher, 10), image_size=32)
    reason = FSP.not_applicable(FSPConfig(), ctx)
    assert (reason is None) == applicable, reason
