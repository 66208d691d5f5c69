"""NST: zero on identical maps, a hand-computed MMD, invariance to scaling and channel order, the golden-value cases
(the checks NST shares with AT, over layers, sizes and tap counts, are in test_method_feature_maps.py)."""

from __future__ import annotations

import pytest
import torch

from kdbench.method import discover
from kdbench.methods.nst import NST, NSTConfig
from kdbench.models.base import FeatureInfo
from tests.method_helpers import STUDENT, TEACHER, build_method, from_feats, golden_cases, make_out, method_loss


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, **cfg) -> NST:
    return build_method(NST, student, teacher, **cfg)


def test_registered_with_reference_defaults():
    assert discover()["nst"].cls is NST
    cfg = NSTConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.kernel_degree, cfg.kernel_offset) == (1.0, 0.0, 50.0, 2, 0.0)
    assert NST.needs == {"feats"}
    assert list(build().parameters()) == [] and list(build().buffers()) == []


def test_zero_on_identical_outputs():
    out = make_out(STUDENT, 3, torch.Generator().manual_seed(1))
    assert method_loss(build(STUDENT, STUDENT), out, out) == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_value():
    # one sample, one block group, maps of 1 x 2 pixels.
    # student: one channel [3, 0] -> normalised s = [1, 0]
    # teacher: two channels [0, 2] and [5, 0] -> t1 = [0, 1], t2 = [1, 0]
    # k(x, y) = (x . y)^2: mean k(s, s) = 1; mean k(t, t) over 4 pairs = (1 + 0 + 0 + 1) / 4 = 1/2;
    # mean k(s, t) = (0 + 1) / 2 = 1/2 -> MMD^2 = 1/2 + 1 - 2 * 1/2 = 1/2; times beta 50 = 25.
    stem = torch.zeros(1, 1, 1, 2)
    s1 = torch.tensor([[[[3.0, 0.0]]]])
    t1 = torch.tensor([[[[0.0, 2.0]], [[5.0, 0.0]]]])
    assert method_loss(build(), from_feats([stem, s1]), from_feats([stem, t1])) == pytest.approx(25.0, rel=1e-6)
    # d = 1, c = 1: k = x . y + 1 -> mean k(s, s) = 2, mean k(t, t) = (2 + 1 + 1 + 2) / 4 = 3/2,
    # mean k(s, t) = (1 + 2) / 2 = 3/2 -> 3/2 + 2 - 3 = 1/2 (a linear kernel compares the means only)
    m = build(kernel_degree=1, kernel_offset=1.0)
    assert method_loss(m, from_feats([stem, s1]), from_feats([stem, t1])) == pytest.approx(25.0, rel=1e-6)


def test_invariant_to_scaling_and_channel_order():
    gen = torch.Generator().manual_seed(3)
    s, t = make_out(STUDENT, 2, gen), make_out(TEACHER, 2, gen)
    m = build()
    ref = method_loss(m, s, t)
    s2 = from_feats([f * 4.0 for f in s.feats])
    t2 = from_feats([f.flip(1) * 0.3 for f in t.feats])  # channels are a set: their order does not matter
    assert method_loss(m, s2, t2) == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Each case: inputs from a seeded generator, the method built under torch.manual_seed(0)."""
    return {name: method_loss(build(si, ti), s, t) for name, si, ti, s, t in golden_cases(4)}
