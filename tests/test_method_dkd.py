"""DKD and DKD-LS: hand-computed TCKD / NCKD, the paper's decomposition of KD, zero on identical logits, the warm-up
mapping, the invariance of the standardised variant, golden values."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.losses import kd_loss
from kdbench.method import Batch, MethodContext, Progress, discover
from kdbench.methods.dkd import DKD, DKDLS, DKDConfig, DKDLSConfig, dkd_terms, warmup_factor
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import assert_matches_golden

INFO = FeatureInfo(channels=(4, 4, 6, 8), reduction=(1, 1, 2, 4), pooled_dim=8, num_classes=5)
P0 = Progress(epoch=239, epochs=240, step=0, steps=1)  # past the warm-up


def ctx() -> MethodContext:
    return MethodContext(
        student=INFO, teacher=INFO, num_classes=5, num_train=10, train_labels=torch.zeros(10, dtype=torch.long)
    )


def out(logits: torch.Tensor) -> ModelOutput:
    f = torch.zeros(logits.shape[0], 1, 1, 1)
    return ModelOutput(logits=logits, feats=[f], preact=[f], pooled=torch.zeros(logits.shape[0], 1))


def batch(labels: torch.Tensor) -> Batch:
    return Batch(images=torch.zeros(len(labels), 3, 4, 4), labels=labels, index=torch.arange(len(labels)))


def loss(m, s, t, labels, progress=P0) -> float:
    return m.loss(out(s), out(t), batch(labels), progress)[m.name].item()


def softmax(v: list[float]) -> list[float]:
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q) if a > 0)


def test_registered_with_reference_defaults():
    reg = discover()
    assert reg["dkd"].cls is DKD and reg["dkd-ls"].cls is DKDLS
    c = DKDConfig()
    assert (c.ce_weight, c.kd_weight, c.temperature, c.weight, c.alpha, c.beta, c.warmup, c.logit_stand) == (
        1.0,
        0.0,
        4.0,
        1.0,
        1.0,
        8.0,
        20.0,
        False,
    )
    ls = DKDLSConfig()  # the logit-standardisation authors: --base-temp 2 --kd-weight 9 -> alpha 9, beta 72, T 2
    assert (ls.ce_weight, ls.temperature, ls.alpha, ls.beta, ls.logit_stand) == (1.0, 2.0, 9.0, 72.0, True)
    assert DKD.needs == {"logits"} and list(DKD(DKDConfig(), ctx()).parameters()) == []


def test_hand_computed_terms():
    s, t, g, temp = [1.0, 0.0, -1.0], [2.0, 1.0, 0.0], 0, 2.0
    ps, pt = softmax([x / temp for x in s]), softmax([x / temp for x in t])
    tckd = kl([pt[g], 1 - pt[g]], [ps[g], 1 - ps[g]]) * temp**2
    qs, qt = softmax([x / temp for x in s[1:]]), softmax([x / temp for x in t[1:]])
    nckd = kl(qt, qs) * temp**2
    got_t, got_n = dkd_terms(torch.tensor([s]), torch.tensor([t]), torch.tensor([g]), temp)
    assert got_t.item() == pytest.approx(tckd, rel=1e-5)
    assert got_n.item() == pytest.approx(nckd, rel=1e-5)
    m = DKD(DKDConfig(temperature=temp, alpha=0.5, beta=3.0), ctx())
    assert loss(m, torch.tensor([s]), torch.tensor([t]), torch.tensor([g])) == pytest.approx(
        0.5 * tckd + 3.0 * nckd, rel=1e-5
    )


def test_kd_decomposes_into_tckd_and_weighted_nckd():
    # The paper's Eq. (1): KD = TCKD + (1 - p_t,g) NCKD, sample by sample.
    gen = torch.Generator().manual_seed(3)
    for _ in range(5):
        s, t = torch.randn(1, 7, generator=gen) * 3, torch.randn(1, 7, generator=gen) * 3
        g = torch.randint(0, 7, (1,), generator=gen)
        tckd, nckd = dkd_terms(s, t, g, 4.0)
        pt_g = torch.softmax(t / 4.0, dim=1)[0, g].item()
        assert kd_loss(s, t, 4.0).item() == pytest.approx(tckd.item() + (1 - pt_g) * nckd.item(), rel=1e-4)


def test_zero_on_identical_logits_and_labels_matter():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5, generator=gen)
    labels = torch.randint(0, 5, (6,), generator=gen)
    assert loss(DKD(DKDConfig(), ctx()), z, z, labels) == pytest.approx(0.0, abs=1e-6)
    t = torch.randn(6, 5, generator=gen)
    assert loss(DKD(DKDConfig(), ctx()), z, t, labels) != pytest.approx(
        loss(DKD(DKDConfig(), ctx()), z, t, (labels + 1) % 5)
    )


def test_warmup_mapping():
    # mdistiller: min(epoch / 20, 1) with 1-based epochs of 240; kdbench's epochs are 0-based.
    assert warmup_factor(Progress(0, 240, 0, 10), 20, 240) == pytest.approx(1 / 20)
    assert warmup_factor(Progress(9, 240, 5, 10), 20, 240) == pytest.approx(10 / 20)
    assert warmup_factor(Progress(19, 240, 0, 10), 20, 240) == 1.0
    assert warmup_factor(Progress(0, 40, 0, 10), 20, 240) == pytest.approx(1 / (20 * 40 / 240))  # same fraction
    assert warmup_factor(Progress(0, 15, 0, 10), 20, 240) == pytest.approx(0.8)  # W = 1.25 epochs
    assert warmup_factor(Progress(1, 15, 0, 10), 20, 240) == 1.0
    assert warmup_factor(Progress(0, 15, 0, 10), 20, 0) == pytest.approx(1 / 20)  # unscaled
    assert warmup_factor(Progress(0, 15, 0, 10), 0, 240) == 1.0
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 5, generator=gen), torch.randn(4, 5, generator=gen)
    labels = torch.tensor([0, 1, 2, 3])
    m = DKD(DKDConfig(), ctx())
    assert loss(m, s, t, labels, Progress(4, 240, 0, 1)) == pytest.approx(loss(m, s, t, labels) * 5 / 20, rel=1e-6)


def test_standardised_variant_ignores_each_networks_logit_scale_and_shift():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(6, 5, generator=gen), torch.randn(6, 5, generator=gen)
    labels = torch.randint(0, 5, (6,), generator=gen)
    m = DKDLS(DKDLSConfig(), ctx())
    base = loss(m, s, t, labels)
    assert loss(m, 3.0 * s - 2.0, 0.5 * t + 7.0, labels) == pytest.approx(base, rel=1e-4)
    assert loss(m, s, 4.0 * s + 1.0, labels) == pytest.approx(0.0, abs=1e-5)  # same relations, other magnitude
    plain = DKD(DKDConfig(), ctx())
    assert loss(plain, s, 4.0 * s + 1.0, labels) > 1e-3  # plain DKD asks for the teacher's magnitude


def golden_values() -> dict[str, float]:
    gen = torch.Generator().manual_seed(100)
    s, t = torch.randn(8, 5, generator=gen) * 2, torch.randn(8, 5, generator=gen) * 2
    labels = torch.randint(0, 5, (8,), generator=gen)
    return {
        "dkd": loss(DKD(DKDConfig(), ctx()), s, t, labels),
        "dkd_epoch0": loss(DKD(DKDConfig(), ctx()), s, t, labels, Progress(0, 240, 0, 1)),
        "dkd-ls": loss(DKDLS(DKDLSConfig(), ctx()), s, t, labels),
    }


def test_golden_values():
    assert_matches_golden("dkd", golden_values())


def test_the_harness_passes_the_training_progress(tiny_toml, tiny_data, monkeypatch):
    from kdbench.config import load_bench
    from kdbench.models import create_model
    from kdbench.sweep import Request, expand
    from kdbench.train import build_member, train_cohort

    (spec,) = expand(load_bench(tiny_toml), Request(["dkd"], ["tiny"]))
    torch.manual_seed(0)
    teacher = create_model(spec.teacher.arch, num_classes=tiny_data.num_classes).eval()
    m = build_member(spec, tiny_data, teacher, torch.device("cpu"))
    seen: list[Progress] = []
    original = DKD.loss

    def spy(self, student, teacher_out, batch, progress):
        seen.append(progress)
        return original(self, student, teacher_out, batch, progress)

    monkeypatch.setattr(DKD, "loss", spy)
    train_cohort([m], tiny_data, teacher, torch.device("cpu"), save=False)
    epochs, steps = spec.protocol.epochs, len(seen) // spec.protocol.epochs
    assert [(p.epoch, p.step) for p in seen] == [(e, s) for e in range(epochs) for s in range(steps)]
    assert all(p.epochs == epochs and p.steps == steps for p in seen)
