"""PKT: zero on identical, scale invariance, a hand-computed value, the golden-value cases."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.method import discover
from kdbench.methods.pkt import PKT, PKTConfig
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START, STUDENT, TEACHER, from_pooled, make_batch, make_ctx, rand_pooled

# One forward + backward through real networks: a cross-family pair by default, three more marked slow.


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, image_size: int = 8, **cfg) -> PKT:
    torch.manual_seed(0)
    return PKT(PKTConfig(**cfg), make_ctx(student, teacher, image_size))


def pkt_loss(m: PKT, s: ModelOutput, t: ModelOutput) -> float:
    return m.loss(s, t, make_batch(s.pooled.shape[0]), START)["pkt"].item()


def test_registered_with_reference_defaults():
    assert discover()["pkt"].cls is PKT
    cfg = PKTConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.eps) == (1.0, 0.0, 30000.0, 1e-7)
    assert PKT.needs == {"pooled"}
    assert list(build().parameters()) == [] and list(build().buffers()) == []


def test_zero_on_identical_outputs():
    out = rand_pooled(STUDENT, 5, torch.Generator().manual_seed(1))
    assert pkt_loss(build(STUDENT, STUDENT), out, out) == 0.0


def test_hand_computed_value():
    # student [[1, 0], [0, 1]]: cosines [[1, 0], [0, 1]] -> (cos + 1) / 2 = [[1, .5], [.5, 1]]
    #   -> rows [2/3, 1/3] and [1/3, 2/3]
    # teacher [[1, 0], [1, 0]] (any dimension; here 3): cosines all 1 -> all 1 -> rows [1/2, 1/2]
    # KL terms: 1/2 log(3/4) + 1/2 log(3/2) per row = 1/2 log(9/8); two rows -> log(9/8); mean over 4 entries.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    expected = 30000.0 * math.log(9 / 8) / 4
    assert pkt_loss(build(), from_pooled(s), from_pooled(t)) == pytest.approx(expected, rel=1e-5)


def test_invariant_to_positive_scaling_of_each_network():
    gen = torch.Generator().manual_seed(2)
    s, t = rand_pooled(STUDENT, 5, gen), rand_pooled(TEACHER, 5, gen)
    m = build()
    ref = pkt_loss(m, s, t)
    assert ref > 0
    assert pkt_loss(m, from_pooled(s.pooled * 9.0), from_pooled(t.pooled * 0.05)) == pytest.approx(ref, rel=1e-4)


def test_zero_vector_gives_finite_loss_and_gradient():
    gen = torch.Generator().manual_seed(3)
    s, t = rand_pooled(STUDENT, 4, gen), rand_pooled(TEACHER, 4, gen)
    s.pooled[2] = 0.0  # a dead student sample: its cosines are 0, no NaN anywhere
    s.pooled.requires_grad_(True)
    loss = build().loss(s, t, make_batch(4), START)["pkt"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.pooled.grad).all()
    assert s.pooled.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Inputs from a seeded generator, the method built under torch.manual_seed(0)."""
    m = build()
    gen = torch.Generator().manual_seed(100)
    return {"default": pkt_loss(m, rand_pooled(STUDENT, 6, gen), rand_pooled(TEACHER, 6, gen))}
