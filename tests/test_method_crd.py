"""CRD: NCE maths by hand, class-aware negatives, memory banks and Z as state, gradients, the golden-value cases."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.method import Batch, MethodContext, discover, make_config, resolve
from kdbench.methods.crd import CRD, CRDKD, CRDConfig, CRDKDConfig, nce_loss
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START

STUDENT = FeatureInfo(channels=(4, 8), reduction=(1, 2), pooled_dim=8, num_classes=4)
TEACHER = FeatureInfo(channels=(4, 16), reduction=(1, 2), pooled_dim=16, num_classes=4)
N = 64
LABELS = torch.arange(N) % 4  # 16 samples per class: at most 48 negatives each


def make_ctx(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, labels: torch.Tensor = LABELS):
    return MethodContext(
        student=student,
        teacher=teacher,
        num_classes=int(labels.max()) + 1,
        num_train=labels.numel(),
        train_labels=labels,
    )


def build(cls: type[CRD] = CRD, ctx: MethodContext | None = None, **cfg) -> CRD:
    torch.manual_seed(0)
    m = cls(cls.Config(**cfg), ctx or make_ctx())
    m.rng = torch.Generator().manual_seed(0)
    return m


def make_out(info: FeatureInfo, b: int, gen: torch.Generator, grad: bool = False) -> ModelOutput:
    pooled = torch.randn(b, info.pooled_dim, generator=gen).relu().requires_grad_(grad)
    return ModelOutput(logits=torch.randn(b, info.num_classes, generator=gen), feats=[], preact=[], pooled=pooled)


def make_batch(index: torch.Tensor, labels: torch.Tensor = LABELS) -> Batch:
    return Batch(images=torch.zeros(index.numel(), 3, 8, 8), labels=labels[index], index=index)


def set_identity(embed: torch.nn.Module) -> None:
    with torch.no_grad():
        embed.linear.weight.copy_(torch.eye(*embed.linear.weight.shape))
        embed.linear.bias.zero_()


def test_registered_with_reference_defaults():
    reg = discover()
    assert reg["crd"].cls is CRD and reg["crd+kd"].cls is CRDKD
    cfg = CRDConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight) == (1.0, 0.0, 0.8)
    assert (cfg.feat_dim, cfg.nce_k, cfg.nce_t, cfg.nce_m) == (128, 16384, 0.07, 0.5)
    assert CRDKDConfig().kd_weight == 1.0 and CRDKDConfig().weight == 0.8
    assert make_config(resolve("crd+kd")).kd_weight == 1.0
    assert CRD.needs == {"pooled", "index"}
    assert "ICLR 2020" in CRD.paper and "Tian" in CRD.paper


def test_nce_loss_by_hand():
    p = torch.tensor([[0.5, 0.1, 0.2], [0.25, 0.4, 0.05]])
    n_data, eps = 4, 1e-7
    c = 2 / 4  # m * Pn with m = 2 noise samples, Pn = 1/4
    rows = [
        math.log(0.5 / (0.5 + c + eps)) + math.log(c / (0.1 + c + eps)) + math.log(c / (0.2 + c + eps)),
        math.log(0.25 / (0.25 + c + eps)) + math.log(c / (0.4 + c + eps)) + math.log(c / (0.05 + c + eps)),
    ]
    expected = -(rows[0] + rows[1]) / 2
    assert nce_loss(p, n_data).item() == pytest.approx(expected, rel=1e-6)


def test_negatives_never_share_the_class_and_use_only_self_rng():
    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (200,), generator=gen)
    largest = int(torch.bincount(labels).max())
    m = build(ctx=make_ctx(labels=labels), nce_k=10_000)
    assert m.sampler.k == 200 - largest  # capped at what the largest class leaves
    index = torch.randperm(200, generator=gen)[:32]
    state = torch.get_rng_state()
    idx = m.sample_contrast(index)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is never touched
    assert idx.shape == (32, 1 + m.sampler.k)
    assert torch.equal(idx[:, 0], index)
    neg = idx[:, 1:]
    assert (labels[neg] != labels[index].unsqueeze(1)).all()
    assert (neg >= 0).all() and (neg < 200).all()
    assert all(len(set(row.tolist())) == neg.shape[1] for row in neg)  # without replacement
    # A smaller k draws a subset; the same generator seed gives the same draw.
    small = build(ctx=make_ctx(labels=labels), nce_k=7)
    a = small.sample_contrast(index)
    small.rng = torch.Generator().manual_seed(0)
    assert torch.equal(a, small.sample_contrast(index)) and a.shape == (32, 8)
    assert (labels[a[:, 1:]] != labels[index].unsqueeze(1)).all()


def test_single_class_training_set_falls_back_to_any_other_sample():
    labels = torch.zeros(10, dtype=torch.long)
    m = build(ctx=make_ctx(labels=labels))
    assert m.sampler.k == 9 and not m.sampler.class_aware
    index = torch.tensor([0, 3, 7])
    idx = m.sample_contrast(index)
    assert all(sorted(row[1:].tolist()) == [j for j in range(10) if j != i] for i, row in zip(index.tolist(), idx))


def test_loss_memory_update_and_z_by_hand():
    """N = 4 (classes 0, 0, 1, 1), identity embeddings in 2-d: every score is a dot product of known vectors."""
    labels = torch.tensor([0, 0, 1, 1])
    info = FeatureInfo(channels=(2,), reduction=(1,), pooled_dim=2, num_classes=2)
    m = build(ctx=make_ctx(info, info, labels), feat_dim=2, nce_t=0.5)
    set_identity(m.embed_s)
    set_identity(m.embed_t)
    mem_t = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    mem_s = torch.tensor([[0.6, 0.8], [0.8, 0.6], [-0.6, 0.8], [0.0, 1.0]])
    m.memory_t.copy_(mem_t)
    m.memory_s.copy_(mem_s)
    v_s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    v_t = torch.tensor([[0.6, 0.8], [0.8, -0.6]])
    out_s = ModelOutput(torch.zeros(2, 2), [], [], v_s.clone())
    out_t = ModelOutput(torch.zeros(2, 2), [], [], v_t.clone())
    loss = m.loss(out_s, out_t, make_batch(torch.tensor([0, 2]), labels), START)["crd"]

    # Sample 0 (class 0): positive row 0, negatives rows 2 and 3; sample 2 (class 1): positive 2, negatives 0, 1.
    s_scores = [[1.0, -1.0, 0.0], [0.0, 0.0, 1.0]]  # v_s . memory_t
    t_scores = [[1.0, 0.28, 0.8], [-0.96, 0.0, 0.28]]  # v_t . memory_s
    c, eps = 2 / 4, 1e-7

    def nce(scores: list[list[float]]) -> tuple[float, float]:
        e = [[math.exp(s / 0.5) for s in row] for row in scores]
        z = sum(sum(row) for row in e) / 6 * 4  # mean over the 2 x 3 scores, times N
        total = 0.0
        for row in e:
            p = [x / z for x in row]
            total += math.log(p[0] / (p[0] + c + eps)) + sum(math.log(c / (q + c + eps)) for q in p[1:])
        return -total / 2, z

    l_s, z_s = nce(s_scores)
    l_t, z_t = nce(t_scores)
    assert loss.item() == pytest.approx(0.8 * (l_s + l_t), rel=1e-5)
    assert m.nce_z.tolist() == pytest.approx([z_s, z_t], rel=1e-6)
    # Momentum 0.5 then renormalised, rows of the batch only.
    assert torch.allclose(m.memory_s[0], F.normalize(torch.tensor([0.8, 0.4]), dim=0))
    assert torch.allclose(m.memory_s[2], F.normalize(torch.tensor([-0.3, 0.9]), dim=0))  # (-0.6, 0.8) & (0, 1)
    assert torch.allclose(m.memory_t[0], F.normalize(torch.tensor([0.8, 0.4]), dim=0))
    assert torch.allclose(m.memory_t[2], F.normalize(torch.tensor([-0.1, -0.3]), dim=0))  # (-1, 0) & (0.8, -0.6)
    assert torch.equal(m.memory_s[[1, 3]], mem_s[[1, 3]]) and torch.equal(m.memory_t[[1, 3]], mem_t[[1, 3]])


def test_memory_initialised_like_the_reference():
    m = build()
    bound = 1 / math.sqrt(128 / 3)
    for bank in (m.memory_s, m.memory_t):
        assert bank.shape == (N, 128)
        assert bank.abs().max() <= bound and bank.abs().max() > 0.9 * bound
    assert m.nce_z.tolist() == [-1.0, -1.0]


def test_z_fixed_on_first_batch_and_state_round_trip():
    m = build()
    gen = torch.Generator().manual_seed(1)
    m.loss(make_out(STUDENT, 8, gen), make_out(TEACHER, 8, gen), make_batch(torch.arange(8)), START)
    z = m.nce_z.clone()
    assert (z > 0).all()
    for start in (8, 16):
        m.loss(make_out(STUDENT, 8, gen), make_out(TEACHER, 8, gen), make_batch(torch.arange(start, start + 8)), START)
    assert torch.equal(m.nce_z, z)

    state = m.state_dict()
    assert {"memory_s", "memory_t", "nce_z"} <= set(state)
    assert "sampler.labels" not in state  # rebuilt from the context, not checkpointed
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    fresh = build()
    assert not torch.equal(fresh.memory_s, m.memory_s)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    for name in ("memory_s", "memory_t", "nce_z"):
        assert torch.equal(getattr(fresh, name), getattr(m, name))
    # The restored Z is used as is, not re-estimated.
    fresh.loss(make_out(STUDENT, 8, gen), make_out(TEACHER, 8, gen), make_batch(torch.arange(24, 32)), START)
    assert torch.equal(fresh.nce_z, z)


def test_both_embeddings_get_gradients_and_the_teacher_none():
    m = build()
    gen = torch.Generator().manual_seed(2)
    s, t = make_out(STUDENT, 8, gen, grad=True), make_out(TEACHER, 8, gen)
    t.pooled.requires_grad_(True)  # even if the teacher's output required a gradient, none flows back
    m.loss(s, t, make_batch(torch.arange(8)), START)["crd"].backward()
    for p in m.parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert s.pooled.grad is not None and s.pooled.grad.abs().sum() > 0
    assert t.pooled.grad is None


def test_eval_mode_leaves_the_banks_alone():
    m = build().eval()
    before = m.memory_s.clone(), m.memory_t.clone()
    gen = torch.Generator().manual_seed(4)
    m.loss(make_out(STUDENT, 8, gen), make_out(TEACHER, 8, gen), make_batch(torch.arange(8)), START)
    assert torch.equal(m.memory_s, before[0]) and torch.equal(m.memory_t, before[1])


# ---------------------------------------------------------------------------------------------- golden


def golden_values() -> dict[str, list[float]]:
    """Two consecutive steps (the second uses the updated banks and the fixed Z) for each variant."""
    values: dict[str, list[float]] = {}
    for cls in (CRD, CRDKD):
        m = build(cls)
        gen = torch.Generator().manual_seed(1234)
        steps = []
        for index in (torch.arange(0, 64, 8), torch.arange(1, 64, 8)):
            s, t = make_out(STUDENT, 8, gen), make_out(TEACHER, 8, gen)
            steps.append(m.loss(s, t, make_batch(index), START)["crd"].item())
        values[cls.name] = steps
    return values


@pytest.mark.parametrize("cls", [CRD, CRDKD])
def test_labels_must_be_the_training_labels(cls):
    ctx = make_ctx()
    ctx = MethodContext(student=ctx.student, teacher=ctx.teacher, num_classes=4, num_train=N + 1, train_labels=LABELS)
    with pytest.raises(ValueError, match=f"ctx.train_labels has {N} labels, num_train={N + 1}"):
        cls(cls.Config(), ctx)
