"""OFD: the margin from BN statistics by hand, the partial L2 case by case, the tap weights, which teachers have the
BN statistics (and that each zoo family's hook names the BN that really feeds its preact), golden values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdbench.method import MethodContext, discover
from kdbench.methods.ofd import OFD, OFDConfig, margin_from_bn, partial_l2
from kdbench.models import create_model
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import ONE_STEP, assert_matches_golden, make_ctx, method_loss

STUDENT = FeatureInfo(channels=(2, 3, 4), reduction=(1, 1, 2), pooled_dim=4, num_classes=5)
TEACHER = FeatureInfo(channels=(2, 3, 4), reduction=(1, 1, 2), pooled_dim=4, num_classes=5)


def bn_stats(info: FeatureInfo, gen: torch.Generator) -> tuple:
    return tuple((torch.rand(c, generator=gen) + 0.5, torch.randn(c, generator=gen)) for c in info.channels)


def ctx(student=STUDENT, teacher=TEACHER, bn=None) -> MethodContext:
    bn = bn_stats(teacher, torch.Generator().manual_seed(7)) if bn is None else bn
    return make_ctx(student, teacher, 4, num_train=4, num_classes=5, teacher_preact_bn=bn)


def outputs(info: FeatureInfo, b: int, gen: torch.Generator) -> ModelOutput:
    maps = [torch.randn(b, c, 4 // r, 4 // r, generator=gen) for c, r in zip(info.channels, info.reduction)]
    return ModelOutput(
        logits=torch.zeros(b, 5), feats=[m.relu() for m in maps], preact=maps, pooled=torch.zeros(b, info.pooled_dim)
    )


def loss(m: OFD, s: ModelOutput, t: ModelOutput) -> float:
    return method_loss(m, s, t, ONE_STEP, image_size=4)


def test_registered_with_reference_defaults():
    assert discover()["ofd"].cls is OFD
    c = OFDConfig()
    assert (c.ce_weight, c.kd_weight, c.weight, c.kernel_size) == (1.0, 0.0, 1e-3, 1)
    assert OFD.needs == {"preact"}


def test_margin_by_hand():
    phi = 1 / math.sqrt(2 * math.pi)
    # N(0, 1): E[x | x < 0] = -phi(0) / Phi(0) = -2 phi(0)
    # N(-1, 2^2): -1 - 2 phi(1/2) / Phi(1/2); N(5, 1): Phi(-5) < 0.001 -> -3 * 1; gamma's sign does not matter
    cdf_half = 0.5 * math.erfc(-0.5 / math.sqrt(2))
    expected = [-2 * phi, -1 - 2 * phi * math.exp(-0.125) / cdf_half, -3.0, -2 * phi]
    got = margin_from_bn(torch.tensor([1.0, 2.0, 1.0, -1.0]), torch.tensor([0.0, -1.0, 5.0, 0.0]))
    assert got.tolist() == pytest.approx(expected, rel=1e-5)
    # against a Monte-Carlo estimate of E[x | x < 0] for N(0.7, 1.3^2)
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 1.3 + 0.7
    mc = x[x < 0].mean().item()
    assert margin_from_bn(torch.tensor([1.3]), torch.tensor([0.7])).item() == pytest.approx(mc, abs=2e-3)


def test_partial_l2_case_by_case():
    m = torch.tensor([-1.0])

    def one(s: float, t: float) -> float:
        return partial_l2(torch.tensor(s).view(1, 1, 1, 1), torch.tensor(t).view(1, 1, 1, 1), m).item()

    assert one(0.5, 2.0) == pytest.approx(2.25)  # t > 0: plain L2, from below
    assert one(3.0, 2.0) == pytest.approx(1.0)  # t > 0: plain L2, from above
    assert one(-0.2, -0.5) == pytest.approx(0.09)  # m < t <= 0 and s > t: pulled down to t
    assert one(-0.8, -0.5) == 0.0  # s <= t <= 0: the teacher's ReLU gives 0 as well
    assert one(0.5, -3.0) == pytest.approx(2.25)  # t <= m < s: pulled down to the margin, not to t
    assert one(-2.0, -3.0) == 0.0  # s <= m
    # mean over the batch, sum over channels and pixels
    s = torch.tensor([[[[1.0, 2.0]], [[0.0, 0.0]]], [[[3.0, 0.0]], [[1.0, 1.0]]]])  # [2, 2, 1, 2]
    t = torch.ones(2, 2, 1, 2)
    assert partial_l2(s, t, torch.tensor([-1.0, -1.0])).item() == pytest.approx((1 + 2 + 4 + 1 + 0 + 0) / 2)


def test_taps_weights_and_margins():
    gen = torch.Generator().manual_seed(1)
    m = OFD(OFDConfig(weight=1.0), ctx())
    m.connectors = nn.ModuleList(nn.Identity() for _ in m.connectors)  # same channels: isolate the distance
    s, t = outputs(STUDENT, 3, gen), outputs(TEACHER, 3, gen)
    assert m.taps == [(1, 1), (2, 2)]
    bn = ctx().teacher_preact_bn
    expected = sum(partial_l2(s.preact[i], t.preact[i], margin_from_bn(*bn[i])).item() / 2 ** (2 - i) for i in (1, 2))
    assert loss(m, s, t) == pytest.approx(expected, rel=1e-5)
    # the target max(t, m) itself costs nothing
    target = [torch.maximum(p, margin_from_bn(*bn[i]).view(1, -1, 1, 1)) for i, p in enumerate(t.preact)]
    same = ModelOutput(logits=s.logits, feats=s.feats, preact=target, pooled=s.pooled)
    assert loss(m, same, t) == 0.0


@pytest.mark.parametrize("teacher", ["resnet56", "resnet32x4", "resnet50", "wrn_40_2", "vgg13"])
def test_bn_hook_names_the_bn_that_feeds_preact(teacher):
    torch.manual_seed(0)
    model = create_model(teacher, num_classes=5).eval()
    for mod in model.modules():  # non-trivial BN statistics
        if isinstance(mod, nn.BatchNorm2d):
            mod.weight.data.uniform_(0.5, 1.5)
            mod.bias.data.normal_()
    seen: dict[int, torch.Tensor] = {}
    bns = model.preact_bn()
    hooks = [bn.register_forward_hook(lambda _m, _i, o, i=i: seen.__setitem__(i, o)) for i, bn in enumerate(bns)]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 16, 16), preact=True)
    for h in hooks:
        h.remove()
    residual = teacher.startswith("resnet")
    for i, bn in enumerate(bns):
        assert bn.num_features == model.feature_info.channels[i]
        if i == 0 or not residual:
            assert torch.equal(seen[i], out.preact[i]), i  # the BN's output is the preact itself
        else:
            assert seen[i].shape == out.preact[i].shape  # the residual branch; the shortcut is added after


@pytest.mark.parametrize(
    "teacher,ok",
    [
        ("resnet56", True),
        ("wrn_40_2", True),
        ("vgg13", True),
        ("resnet50", True),
        ("mobilenetv2", False),
        ("shufflenetv1", False),
    ],
)
def test_applicable_teachers(teacher, ok):
    from kdbench.train import _preact_bn

    with torch.device("meta"):
        s = create_model("resnet20", num_classes=100)
    t = create_model(teacher, num_classes=100)
    c = make_ctx(s.feature_info, t.feature_info, 32, num_train=4, num_classes=100, teacher_preact_bn=_preact_bn(t))
    reason = OFD.not_applicable(OFDConfig(), c)
    assert (reason is None) == ok, reason


def golden_values() -> dict[str, float]:
    torch.manual_seed(0)
    m = OFD(OFDConfig(), ctx())
    gen = torch.Generator().manual_seed(100)
    return {"default": loss(m, outputs(STUDENT, 4, gen), outputs(TEACHER, 4, gen))}


def test_golden_values():
    assert_matches_golden("ofd", golden_values())


def test_teacher_bn_defaults_to_batch_statistics_and_eval_is_a_switch():
    from kdbench.errors import KdbenchError
    from kdbench.method import make_config, resolve

    assert OFDConfig().teacher_bn == "batch" and OFD(OFDConfig(), ctx()).teacher_batch_stats
    assert not OFD(make_config(resolve("ofd"), {"teacher_bn": "eval"}), ctx()).teacher_batch_stats
    with pytest.raises(KdbenchError, match="teacher_bn"):
        make_config(resolve("ofd"), {"teacher_bn": "train"})


def test_batch_statistics_forward_matches_train_mode_and_leaves_the_teacher_untouched():
    """The references run OFD's teacher in train mode: kdbench's second forward gives the same outputs as a teacher
    in train mode, differs from the eval-mode forward, and changes none of the shared teacher's running statistics."""
    import copy

    from kdbench.train import teacher_outputs

    torch.manual_seed(0)
    teacher = create_model("resnet8", num_classes=5).eval()
    with torch.no_grad():  # running statistics away from their initial values, so eval and batch modes differ
        teacher.train()
        for _ in range(3):
            teacher(torch.randn(8, 3, 16, 16) * 2 + 1)
        teacher.eval()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    x = torch.randn(6, 3, 16, 16)
    got = teacher_outputs(teacher, x, preact=True, batch_stats=True)
    reference = copy.deepcopy(teacher).train()
    with torch.no_grad():
        want = reference(x, preact=True)
    evald = teacher_outputs(teacher, x, preact=True)
    for a, b, e in zip(got.preact, want.preact, evald.preact):
        torch.testing.assert_close(a, b)
        assert not torch.allclose(a, e)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_harness_gives_ofd_the_batch_statistics_teacher(tiny_toml, tiny_data, monkeypatch):
    """In a cohort, the default OFD run sees the batch-statistics teacher and the eval-mode one the shared forward."""
    import kdbench.train as train
    from kdbench.config import load_bench
    from kdbench.sweep import Request, expand

    calls = []
    real = train.teacher_outputs

    last: dict[bool, object] = {}

    def spy(teacher, x, preact=False, batch_stats=False):
        calls.append(batch_stats)
        last[batch_stats] = real(teacher, x, preact, batch_stats)
        return last[batch_stats]

    monkeypatch.setattr(train, "teacher_outputs", spy)
    bench = load_bench(tiny_toml)
    specs = expand(bench, Request(["ofd"], ["tiny"], sets=["protocol.epochs=1"]))
    specs += expand(bench, Request(["ofd"], ["tiny"], sets=["protocol.epochs=1", "methods.ofd.teacher_bn=eval"]))
    assert specs[0].run_id != specs[1].run_id
    torch.manual_seed(0)
    teacher = create_model(specs[0].teacher.arch, num_classes=tiny_data.num_classes).eval()
    seen: dict[int, bool] = {}  # member -> did its loss get the batch-statistics forward
    members = [train.build_member(s, tiny_data, teacher, torch.device("cpu")) for s in specs]
    for m in members:
        real_loss = m.method.loss

        def loss(s, t, batch, progress, _m=m, _real=real_loss):
            seen[id(_m)] = t is last[True] and t is not last[False]
            return _real(s, t, batch, progress)

        m.method.loss = loss
    train.train_cohort(members, tiny_data, teacher, torch.device("cpu"), save=False)
    steps = len(calls) // 2
    assert calls == [False, True] * steps and steps > 0  # one shared forward and one batch-statistics forward
    assert seen == {id(members[0]): True, id(members[1]): False}
