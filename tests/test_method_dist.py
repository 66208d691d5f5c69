"""DIST: Pearson correlation by hand, the two-class sign case, zero on identical, scale of the terms, golden values."""

from __future__ import annotations

import pytest
import torch

from kdbench.method import discover
from kdbench.methods.dist import DIST, DISTConfig, dist_terms, pearson_rows
from kdbench.models.base import FeatureInfo
from tests.method_helpers import assert_matches_golden, logit_loss, make_ctx

INFO = FeatureInfo(channels=(4,), reduction=(1,), pooled_dim=4, num_classes=4)


def build(**cfg) -> DIST:
    return DIST(DISTConfig(**cfg), make_ctx(INFO, INFO, 32, num_train=4))


def loss(m: DIST, s: torch.Tensor, t: torch.Tensor) -> float:
    return logit_loss(m, s, t)


def test_registered_with_reference_defaults():
    assert discover()["dist"].cls is DIST
    c = DISTConfig()
    assert (c.ce_weight, c.kd_weight, c.temperature, c.weight, c.inter_weight, c.intra_weight) == (
        1.0,
        0.0,
        4.0,
        1.0,
        2.0,
        2.0,
    )
    assert DIST.needs == {"logits"}


def test_pearson_by_hand():
    # a = [1, 2, 3], b = [2, 4, 7]: centred [-1, 0, 1] and [-7/3, -1/3, 8/3]; cov = 5, |a| = sqrt 2, |b| = sqrt(114/9)
    r = pearson_rows(torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[2.0, 4.0, 7.0]])).item()
    assert r == pytest.approx(5.0 / (2**0.5 * (114 / 9) ** 0.5), rel=1e-6)
    # invariant to a positive affine map of either row, sign-flipped by a negative one
    x = torch.tensor([[0.3, -1.0, 2.0, 0.5]])
    assert pearson_rows(x, 4 * x + 1).item() == pytest.approx(1.0, abs=1e-6)
    assert pearson_rows(x, -x).item() == pytest.approx(-1.0, abs=1e-6)


def test_two_classes_reduce_to_signs():
    # With 2 classes every centred row is +-(d, -d): rows correlate +1 when both prefer the same class, -1
    # otherwise. Sample 0 agrees, sample 1 disagrees -> inter = 1 - (1 - 1)/2 = 1. Columns over a batch of 2 are
    # also 2-vectors, correlating +-1 by the direction of change from sample 0 to sample 1.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[2.0, 0.0], [3.0, 0.0]])  # teacher: class 0 for both, more so for sample 1
    inter, intra = dist_terms(s, t, tau=1.0)
    assert inter.item() == pytest.approx(1.0, abs=1e-6)
    # student column 0: [0.731, 0.269] (falls); teacher column 0: [0.881, 0.953] (rises) -> -1 for both columns
    assert intra.item() == pytest.approx(2.0, abs=1e-6)
    m = build(temperature=1.0, inter_weight=2.0, intra_weight=3.0, weight=0.5)
    assert loss(m, s, t) == pytest.approx(0.5 * (2.0 * 1.0 + 3.0 * 2.0), rel=1e-6)
    # tau^2 scaling of both terms
    i4, j4 = dist_terms(s * 4, t * 4, tau=4.0)
    assert (i4.item(), j4.item()) == pytest.approx((16.0 * 1.0, 16.0 * 2.0), abs=1e-4)


def test_zero_on_identical_logits():
    z = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    assert loss(build(), z, z) == pytest.approx(0.0, abs=5e-4)  # fp32 rounding times tau^2 (beta + gamma) = 64
    assert loss(build(), z, z + 3.0) == pytest.approx(0.0, abs=5e-4)  # softmax ignores a shift


def test_golden_values():
    gen = torch.Generator().manual_seed(100)
    s, t = torch.randn(8, 4, generator=gen) * 3, torch.randn(8, 4, generator=gen) * 3
    assert_matches_golden("dist", {"dist": loss(build(), s, t)})
