"""CRCD: relation cosines by hand, CE gradients, the whole loss against a direct computation, state, golden cases."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.method import Batch, MethodContext, discover, make_config, resolve
from kdbench.methods.crcd import CRCD, CRCDConfig, ce_feature_grad, relation_scores
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START

STUDENT = FeatureInfo(channels=(4, 8), reduction=(1, 2), pooled_dim=8, num_classes=4)
TEACHER = FeatureInfo(channels=(4, 16), reduction=(1, 2), pooled_dim=16, num_classes=4)
N = 64
LABELS = torch.arange(N) % 4
BANKS = ("memory_s", "memory_t", "grad_memory_s", "grad_memory_t")


class Pair:
    """A method with its own student / teacher heads (the heads give the logits and the CE gradients)."""

    def __init__(self, labels: torch.Tensor = LABELS, **cfg):
        torch.manual_seed(0)
        self.head_s = nn.Linear(STUDENT.pooled_dim, STUDENT.num_classes)
        self.head_t = nn.Linear(TEACHER.pooled_dim, TEACHER.num_classes).requires_grad_(False)
        self.labels = labels
        ctx = MethodContext(
            student=STUDENT,
            teacher=TEACHER,
            num_classes=4,
            num_train=labels.numel(),
            train_labels=labels,
            student_head=self.head_s,
            teacher_head=self.head_t,
        )
        self.m = CRCD(CRCDConfig(**cfg), ctx)
        self.m.rng = torch.Generator().manual_seed(0)

    def outputs(self, b: int, gen: torch.Generator) -> tuple[ModelOutput, ModelOutput]:
        ps = torch.randn(b, STUDENT.pooled_dim, generator=gen).relu().requires_grad_(True)
        pt = torch.randn(b, TEACHER.pooled_dim, generator=gen).relu()
        with torch.no_grad():
            lt = self.head_t(pt)
        return ModelOutput(self.head_s(ps), [], [], ps), ModelOutput(lt, [], [], pt)

    def batch(self, index: torch.Tensor) -> Batch:
        return Batch(images=torch.zeros(index.numel(), 3, 8, 8), labels=self.labels[index], index=index)


def embed(e: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x @ e.linear.weight.detach().t() + e.linear.bias.detach(), dim=1)


def test_registered_with_defaults():
    assert discover()["crcd"].cls is CRCD
    c = CRCDConfig()
    assert (c.ce_weight, c.kd_weight, c.weight, c.temperature) == (1.0, 0.9, 1.0, 4.0)
    assert (c.feat_dim, c.nce_k, c.nce_t, c.nce_m, c.grad_weight) == (128, 500, 0.05, 0.5, 1.0)
    assert make_config(resolve("crcd+kd")).kd_weight == 1.0
    assert CRCD.needs == {"logits", "pooled", "index"}
    assert "CVPR 2021" in CRCD.paper


def test_relation_cosines_by_hand():
    """Pairs (0, 1) and (1, 0): x - anchor = (1, 1) both times; the memory relations are (1, 1) and
    (-1, 1) / (1, -1)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    anchors = torch.tensor([[-1.0, 0.0], [0.0, -1.0]])
    contrast = torch.tensor([[[1.0, 0.0], [-1.0, 0.0]], [[0.0, 1.0], [0.0, -1.0]]])
    # (i=0, a=1): x0 - a1 = (1, 1); m00 - a1 = (1, 1): cos 1; m01 - a1 = (-1, 1): cos 0.
    # (i=1, a=0): x1 - a0 = (1, 1); m10 - a0 = (1, 1): cos 1; m11 - a0 = (1, -1): cos 0.
    got = relation_scores(x, anchors, contrast)
    assert torch.allclose(got, torch.tensor([[1.0, 0.0], [1.0, 0.0]]), atol=1e-6)
    # A memory row equal to its anchor has no direction: cosine ~0, never NaN.
    contrast[0, 1] = anchors[1]
    got = relation_scores(x, anchors, contrast)
    assert torch.isfinite(got).all() and abs(got[0, 1].item()) < 1e-3


def test_relation_scores_match_pairwise_normalised_differences():
    gen = torch.Generator().manual_seed(0)
    b, k, d = 4, 3, 6
    x = F.normalize(torch.randn(b, d, generator=gen), dim=1)
    anchors = F.normalize(torch.randn(b, d, generator=gen), dim=1)
    contrast = F.normalize(torch.randn(b, k, d, generator=gen), dim=2)
    rows = []
    for i in range(b):
        for a in range(b):
            if a != i:
                r = F.normalize(x[i] - anchors[a], dim=0)
                rows.append(torch.stack([r @ F.normalize(contrast[i, j] - anchors[a], dim=0) for j in range(k)]))
    assert torch.allclose(relation_scores(x, anchors, contrast), torch.stack(rows), atol=1e-5)


def test_ce_feature_grad_is_the_per_sample_autograd_gradient():
    gen = torch.Generator().manual_seed(1)
    head = nn.Linear(5, 3)
    f = torch.randn(4, 5, generator=gen, requires_grad=True)
    y = torch.tensor([0, 2, 1, 2])
    (expected,) = torch.autograd.grad(F.cross_entropy(head(f), y, reduction="sum"), f)
    assert torch.allclose(ce_feature_grad(head(f), y, head.weight), expected, atol=1e-6)


def test_loss_matches_a_direct_computation():
    """Small N: relations built pair by pair with F.normalize, Z and NCE written out, the same negatives."""
    labels = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3])
    p = Pair(labels, nce_k=4, feat_dim=8, nce_t=0.5)
    m = p.m
    gen = torch.Generator().manual_seed(2)
    s, t = p.outputs(3, gen)
    index = torch.tensor([0, 4, 8])
    banks = {name: getattr(m, name).clone() for name in BANKS}
    idx = m.sample_contrast(index)
    m.rng = torch.Generator().manual_seed(0)  # the loss draws the same negatives again
    got = m.loss(s, t, p.batch(index), START)

    y = labels[index]
    g_s = (F.softmax(s.logits.detach(), 1) - F.one_hot(y, 4)) @ p.head_s.weight.detach()
    g_t = (F.softmax(t.logits, 1) - F.one_hot(y, 4)) @ p.head_t.weight
    queries = [
        embed(m.embed_s, s.pooled.detach()),
        embed(m.embed_t, t.pooled),
        embed(m.grad_embed_s, g_s),
        embed(m.grad_embed_t, g_t),
    ]
    memories = [banks["memory_t"], banks["memory_s"], banks["grad_memory_t"], banks["grad_memory_s"]]
    c, eps = 4 / 12, 1e-7
    terms = []
    for q, mem in zip(queries, memories):
        e = []
        for i in range(3):
            for a in range(3):
                if a != i:
                    anchor = mem[index[a]]
                    r = F.normalize(q[i] - anchor, dim=0)
                    e.append([math.exp(float(r @ F.normalize(mem[j] - anchor, dim=0)) / 0.5) for j in idx[i]])
        z = sum(map(sum, e)) / (6 * 5) * 12
        total = 0.0
        for row in e:
            pr = [v / z for v in row]
            total += math.log(pr[0] / (pr[0] + c + eps)) + sum(math.log(c / (v + c + eps)) for v in pr[1:])
        terms.append(-total / 6)
    assert got["crcd"].item() == pytest.approx(terms[0] + terms[1], rel=1e-4)
    assert got["crcd_grad"].item() == pytest.approx(terms[2] + terms[3], rel=1e-4)
    # Momentum 0.5 update of the four banks with the batch's (detached) elements, rows renormalised.
    for name, q in zip(("memory_s", "memory_t", "grad_memory_s", "grad_memory_t"), queries):
        expected = F.normalize(0.5 * banks[name][index] + 0.5 * q, dim=1)
        assert torch.allclose(getattr(m, name)[index], expected, atol=1e-6)
        others = torch.ones(12, dtype=torch.bool)
        others[index] = False
        assert torch.equal(getattr(m, name)[others], banks[name][others])


def test_negatives_from_other_classes_only():
    p = Pair(nce_k=40)
    index = torch.arange(0, 64, 5)
    idx = p.m.sample_contrast(index)
    assert idx.shape == (13, 41) and torch.equal(idx[:, 0], index)
    assert (LABELS[idx[:, 1:]] != LABELS[index].unsqueeze(1)).all()


def test_gradients_reach_all_heads_and_the_student_classifier():
    p = Pair()
    gen = torch.Generator().manual_seed(3)
    s, t = p.outputs(6, gen)
    out = p.m.loss(s, t, p.batch(torch.arange(6)), START)
    out["crcd_grad"].backward(retain_graph=True)
    # The gradient-relation term alone trains the student's classifier and features (second order).
    assert p.head_s.weight.grad is not None and p.head_s.weight.grad.abs().sum() > 0
    assert s.pooled.grad is not None and s.pooled.grad.abs().sum() > 0
    out["crcd"].backward()
    for name, prm in p.m.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, name
    assert p.head_t.weight.grad is None


def test_terms_are_added_and_weighted():
    gen = torch.Generator().manual_seed(4)
    ref = Pair()
    s, t = ref.outputs(5, gen)
    base = ref.m.loss(s, t, ref.batch(torch.arange(5)), START)
    no_grad_term = Pair(grad_weight=0.0)
    got = no_grad_term.m.loss(s, t, no_grad_term.batch(torch.arange(5)), START)
    assert got["crcd_grad"].item() == 0.0 and got["crcd"].item() == pytest.approx(base["crcd"].item(), rel=1e-6)
    doubled = Pair(weight=2.0)
    got = doubled.m.loss(s, t, doubled.batch(torch.arange(5)), START)
    assert got["crcd"].item() == pytest.approx(2 * base["crcd"].item(), rel=1e-6)
    assert got["crcd_grad"].item() == pytest.approx(2 * base["crcd_grad"].item(), rel=1e-6)


def test_single_sample_batch_has_no_relation_but_updates_the_banks():
    p = Pair()
    s, t = p.outputs(1, torch.Generator().manual_seed(5))
    before = p.m.memory_s.clone()
    out = p.m.loss(s, t, p.batch(torch.tensor([7])), START)
    assert out["crcd"].item() == 0.0 and out["crcd_grad"].item() == 0.0
    assert not torch.equal(p.m.memory_s[7], before[7])
    assert (p.m.nce_z < 0).all()  # Z waits for a batch that has relations


def test_banks_z_and_state_round_trip():
    p = Pair()
    for name in BANKS:
        bank = getattr(p.m, name)
        assert bank.shape == (N, 128) and torch.allclose(bank.norm(dim=1), torch.ones(N))
    gen = torch.Generator().manual_seed(6)
    for start in (0, 8, 16):
        s, t = p.outputs(8, gen)
        p.m.loss(s, t, p.batch(torch.arange(start, start + 8)), START)
        if start == 0:
            z = p.m.nce_z.clone()
            assert (z > 0).all()
    assert torch.equal(p.m.nce_z, z)  # fixed by the first batch
    state = p.m.state_dict()
    assert set(BANKS) | {"nce_z"} <= set(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = Pair()
    fresh.m.load_state_dict(torch.load(buf, weights_only=True))
    for name in (*BANKS, "nce_z"):
        assert torch.equal(getattr(fresh.m, name), getattr(p.m, name))
    s, t = fresh.outputs(8, gen)
    fresh.m.loss(s, t, fresh.batch(torch.arange(24, 32)), START)
    assert torch.equal(fresh.m.nce_z, z)


def test_eval_mode_leaves_the_banks_alone():
    p = Pair()
    p.m.eval()
    banks = [getattr(p.m, n).clone() for n in BANKS]
    s, t = p.outputs(4, torch.Generator().manual_seed(7))
    p.m.loss(s, t, p.batch(torch.arange(4)), START)
    assert all(torch.equal(getattr(p.m, n), b) for n, b in zip(BANKS, banks))


# ---------------------------------------------------------------------------------------------- golden


def golden_values() -> dict[str, list[float]]:
    """Two consecutive steps of batch 8 (reference settings; 48 negatives exist, so nce_k is capped)."""
    p = Pair()
    gen = torch.Generator().manual_seed(1234)
    values: dict[str, list[float]] = {"crcd": [], "crcd_grad": []}
    for index in (torch.arange(0, 64, 8), torch.arange(1, 64, 8)):
        s, t = p.outputs(8, gen)
        out = p.m.loss(s, t, p.batch(index), START)
        for key, steps in values.items():
            steps.append(out[key].item())
    return values


def test_labels_must_be_the_training_labels():
    with pytest.raises(ValueError, match=r"ctx.train_labels has 3 labels, num_train=64"):
        CRCD(
            CRCDConfig(),
            MethodContext(
                student=STUDENT,
                teacher=TEACHER,
                num_classes=4,
                num_train=64,
                train_labels=torch.arange(3),
                student_head=nn.Linear(STUDENT.pooled_dim, 4),
                teacher_head=nn.Linear(TEACHER.pooled_dim, 4),
            ),
        )
