"""KD-LS (KD on standardised logits): the z-score, a hand-computed value, invariance to each network's logit scale and
shift, golden values."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.losses import standardise
from kdbench.method import discover
from kdbench.methods.kd import KDLS, KDLSConfig
from kdbench.models.base import FeatureInfo
from tests.method_helpers import assert_matches_golden, logit_loss, make_ctx

INFO = FeatureInfo(channels=(4,), reduction=(1,), pooled_dim=4, num_classes=3)


def build(**cfg) -> KDLS:
    return KDLS(KDLSConfig(**cfg), make_ctx(INFO, INFO, 32, num_train=4))


def loss(m: KDLS, s: torch.Tensor, t: torch.Tensor) -> float:
    return logit_loss(m, s, t, key="kd_ls")


def test_registered_with_reference_defaults():
    assert discover()["kd-ls"].cls is KDLS
    c = KDLSConfig()  # README: --logit-stand --base-temp 2 --kd-weight 9 on mdistiller's KD (CE weight 0.1)
    assert (c.ce_weight, c.kd_weight, c.temperature, c.weight) == (0.1, 0.0, 2.0, 9.0)
    assert KDLS.needs == {"logits"} and KDLS.requires_teacher


def test_standardise_by_hand():
    # [1, 2, 3]: mean 2, unbiased std 1 -> [-1, 0, 1]; [0, 0, 3]: mean 1, std sqrt(3)
    z = standardise(torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 3.0]]))
    r3 = math.sqrt(3.0)
    assert z[0].tolist() == pytest.approx([-1.0, 0.0, 1.0], abs=1e-6)
    assert z[1].tolist() == pytest.approx([-1 / r3, -1 / r3, 2 / r3], abs=1e-6)


def test_hand_computed_value():
    r3 = math.sqrt(3.0)
    zs, zt = [-1.0, 0.0, 1.0], [-1 / r3, -1 / r3, 2 / r3]
    T = 2.0

    def softmax(v):
        e = [math.exp(x / T) for x in v]
        return [x / sum(e) for x in e]

    ps, pt = softmax(zs), softmax(zt)
    expected = 9.0 * T * T * sum(a * math.log(a / b) for a, b in zip(pt, ps))
    got = loss(build(), torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.0, 0.0, 3.0]]))
    assert got == pytest.approx(expected, rel=1e-5)


def test_invariant_to_each_networks_scale_and_shift():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 3, generator=gen), torch.randn(5, 3, generator=gen)
    base = loss(build(), s, t)
    assert loss(build(), 10.0 * s + 3.0, 0.2 * t - 1.0) == pytest.approx(base, rel=1e-4)
    assert loss(build(), s, 3.0 * s + 5.0) == pytest.approx(0.0, abs=1e-5)
    assert base > 0


def test_golden_values():
    gen = torch.Generator().manual_seed(100)
    s, t = torch.randn(8, 3, generator=gen) * 2, torch.randn(8, 3, generator=gen) * 5
    assert_matches_golden("kd_ls", {"kd-ls": loss(build(), s, t)})
