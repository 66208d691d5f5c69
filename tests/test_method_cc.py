"""CC: the reference formula by hand, both embeddings trained, state round trip, the golden-value cases."""

from __future__ import annotations

import io

import pytest
import torch

from kdbench.method import discover
from kdbench.methods.cc import CC, CCConfig
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START, STUDENT, TEACHER, from_pooled, make_batch, make_ctx, rand_pooled

# One forward + backward through real networks: a cross-family pair by default, three more marked slow.


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, image_size: int = 8, **cfg) -> CC:
    torch.manual_seed(0)
    return CC(CCConfig(**cfg), make_ctx(student, teacher, image_size))


def cc_loss(m: CC, s: ModelOutput, t: ModelOutput) -> torch.Tensor:
    return m.loss(s, t, make_batch(s.pooled.shape[0]), START)["cc"]


def identity_embeddings(dim: int) -> CC:
    info = FeatureInfo(channels=(1,), reduction=(1,), pooled_dim=dim, num_classes=5)
    m = build(info, info, embed_dim=dim)
    with torch.no_grad():
        for lin in (m.embed_s, m.embed_t):
            lin.weight.copy_(torch.eye(dim))
            lin.bias.zero_()
    return m


def test_registered_with_reference_defaults():
    assert discover()["cc"].cls is CC
    cfg = CCConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.embed_dim) == (1.0, 0.0, 0.02, 128)
    assert CC.needs == {"pooled"}
    m = build()
    assert m.embed_s.in_features == 8 and m.embed_t.in_features == 16
    assert m.embed_s.out_features == m.embed_t.out_features == 128
    assert {n for n, _ in m.named_parameters()} == {"embed_s.weight", "embed_s.bias", "embed_t.weight", "embed_t.bias"}


def test_hand_computed_value():
    # identity embeddings: delta = |s - t| = [[1, 2], [2, 3], [2, 1]]
    # consecutive pairs: (0, 1) -> 1*2 + 2*3 = 8; (1, 2) -> 2*2 + 3*1 = 7; mean 7.5; times beta 0.02.
    m = identity_embeddings(2)
    s = torch.tensor([[1.0, 2.0], [3.0, 4.0], [0.0, 1.0]])
    t = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    assert cc_loss(m, from_pooled(s), from_pooled(t)).item() == pytest.approx(0.02 * 7.5, rel=1e-6)
    # the order of the batch matters: it only pairs neighbours. Swap rows 1 and 2: delta [[1, 2], [2, 1], [2, 3]]
    # -> (1*2 + 2*1) = 4 and (2*2 + 1*3) = 7 -> 5.5
    perm = torch.tensor([0, 2, 1])
    assert cc_loss(m, from_pooled(s[perm]), from_pooled(t[perm])).item() == pytest.approx(0.02 * 5.5, rel=1e-6)


def test_zero_on_identical_embeddings_and_single_sample():
    m = identity_embeddings(3)
    x = torch.rand(4, 3, generator=torch.Generator().manual_seed(1))
    assert cc_loss(m, from_pooled(x), from_pooled(x.clone())).item() == 0.0
    one = cc_loss(build(), rand_pooled(STUDENT, 1, torch.Generator()), rand_pooled(TEACHER, 1, torch.Generator()))
    assert one.item() == 0.0


def test_gradients_reach_both_embeddings_and_student():
    gen = torch.Generator().manual_seed(2)
    s, t = rand_pooled(STUDENT, 4, gen), rand_pooled(TEACHER, 4, gen)
    s.pooled.requires_grad_(True)
    m = build()
    cc_loss(m, s, t).backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert s.pooled.grad is not None and s.pooled.grad.abs().sum() > 0
    assert not t.pooled.requires_grad


def test_state_dict_round_trip():
    m = build()
    buf = io.BytesIO()
    torch.save(m.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(99)
    m2 = CC(CCConfig(), make_ctx(STUDENT, TEACHER))
    assert not torch.equal(m2.embed_t.weight, m.embed_t.weight)
    m2.load_state_dict(torch.load(buf, weights_only=True))
    for key, value in m.state_dict().items():
        assert torch.equal(value, m2.state_dict()[key]), key
    gen = torch.Generator().manual_seed(3)
    s, t = rand_pooled(STUDENT, 4, gen), rand_pooled(TEACHER, 4, gen)
    assert cc_loss(m, s, t).item() == cc_loss(m2, s, t).item()


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Inputs from a seeded generator, the method (its two embeddings) built under torch.manual_seed(0)."""
    m = build()
    gen = torch.Generator().manual_seed(100)
    return {"default": cc_loss(m, rand_pooled(STUDENT, 6, gen), rand_pooled(TEACHER, 6, gen)).item()}
