"""NST: zero on identical, a hand-computed MMD, invariances, size/channel/length mismatches, the golden-value cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.method import discover
from kdbench.methods.nst import NST, NSTConfig
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START, STUDENT, TEACHER, TEACHER_X, from_feats, make_batch, make_ctx, make_out

# Tiny made-up networks at image size 8: taps of 8, 8, 4, 2 pixels a side.
# A VGG-like teacher (one more tap, everything one stride coarser).

# One forward + backward through real networks: a cross-family pair by default, three more marked slow.


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, image_size: int = 8, **cfg) -> NST:
    torch.manual_seed(0)
    return NST(NSTConfig(**cfg), make_ctx(student, teacher, image_size))


def nst_loss(m: NST, s: ModelOutput, t: ModelOutput) -> float:
    return m.loss(s, t, make_batch(s.feats[0].shape[0]), START)["nst"].item()


def test_registered_with_reference_defaults():
    assert discover()["nst"].cls is NST
    cfg = NSTConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.kernel_degree, cfg.kernel_offset) == (1.0, 0.0, 50.0, 2, 0.0)
    assert NST.needs == {"feats"}
    assert list(build().parameters()) == [] and list(build().buffers()) == []


def test_zero_on_identical_outputs():
    out = make_out(STUDENT, 3, torch.Generator().manual_seed(1))
    assert nst_loss(build(STUDENT, STUDENT), out, out) == pytest.approx(0.0, abs=1e-6)


def test_hand_computed_value():
    # one sample, one block group, maps of 1 x 2 pixels.
    # student: one channel [3, 0] -> normalised s = [1, 0]
    # teacher: two channels [0, 2] and [5, 0] -> t1 = [0, 1], t2 = [1, 0]
    # k(x, y) = (x . y)^2: mean k(s, s) = 1; mean k(t, t) over 4 pairs = (1 + 0 + 0 + 1) / 4 = 1/2;
    # mean k(s, t) = (0 + 1) / 2 = 1/2 -> MMD^2 = 1/2 + 1 - 2 * 1/2 = 1/2; times beta 50 = 25.
    stem = torch.zeros(1, 1, 1, 2)
    s1 = torch.tensor([[[[3.0, 0.0]]]])
    t1 = torch.tensor([[[[0.0, 2.0]], [[5.0, 0.0]]]])
    assert nst_loss(build(), from_feats([stem, s1]), from_feats([stem, t1])) == pytest.approx(25.0, rel=1e-6)
    # d = 1, c = 1: k = x . y + 1 -> mean k(s, s) = 2, mean k(t, t) = (2 + 1 + 1 + 2) / 4 = 3/2,
    # mean k(s, t) = (1 + 2) / 2 = 3/2 -> 3/2 + 2 - 3 = 1/2 (a linear kernel compares the means only)
    m = build(kernel_degree=1, kernel_offset=1.0)
    assert nst_loss(m, from_feats([stem, s1]), from_feats([stem, t1])) == pytest.approx(25.0, rel=1e-6)


def test_sum_over_layers_and_stem_unused():
    gen = torch.Generator().manual_seed(2)
    s, t = make_out(STUDENT, 2, gen), make_out(TEACHER, 2, gen)
    m = build()
    total = nst_loss(m, s, t)
    per_layer = [
        nst_loss(m, from_feats([s.feats[0], s.feats[i]]), from_feats([t.feats[0], t.feats[i]])) for i in (1, 2, 3)
    ]
    assert total == pytest.approx(sum(per_layer), rel=1e-5)
    s.feats[0] = s.feats[0] * 5.0 + 1.0
    assert nst_loss(m, s, t) == pytest.approx(total, rel=1e-6)


def test_invariant_to_scaling_and_channel_order():
    gen = torch.Generator().manual_seed(3)
    s, t = make_out(STUDENT, 2, gen), make_out(TEACHER, 2, gen)
    m = build()
    ref = nst_loss(m, s, t)
    s2 = from_feats([f * 4.0 for f in s.feats])
    t2 = from_feats([f.flip(1) * 0.3 for f in t.feats])  # channels are a set: their order does not matter
    assert nst_loss(m, s2, t2) == pytest.approx(ref, rel=1e-5)


def test_larger_map_is_average_pooled_to_the_smaller():
    gen = torch.Generator().manual_seed(4)
    small = torch.rand(2, 3, 2, 2, generator=gen)
    big = torch.rand(2, 5, 4, 4, generator=gen)
    stem = torch.zeros(2, 1, 4, 4)
    m = build()
    pooled = F.avg_pool2d(big, 2)
    assert nst_loss(m, from_feats([stem, small]), from_feats([stem, big])) == pytest.approx(
        nst_loss(m, from_feats([stem, small]), from_feats([stem, pooled])), rel=1e-6
    )
    assert nst_loss(m, from_feats([stem, big]), from_feats([stem, small])) == pytest.approx(
        nst_loss(m, from_feats([stem, pooled]), from_feats([stem, small])), rel=1e-6
    )


def test_extra_trailing_block_groups_are_ignored():
    gen = torch.Generator().manual_seed(5)
    s, t = make_out(STUDENT, 2, gen), make_out(TEACHER_X, 2, gen)
    m = build(STUDENT, TEACHER_X)
    full = nst_loss(m, s, t)
    assert full == pytest.approx(nst_loss(m, s, from_feats(t.feats[:4])), rel=1e-6)
    assert math.isfinite(full) and full > 0


def test_gradient_reaches_student_maps():
    gen = torch.Generator().manual_seed(6)
    s, t = make_out(STUDENT, 2, gen), make_out(TEACHER, 2, gen)
    for f in s.feats:
        f.requires_grad_(True)
    build().loss(s, t, make_batch(2), START)["nst"].backward()
    assert s.feats[0].grad is None
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s.feats[1:])


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Each case: inputs from a seeded generator, the method built under torch.manual_seed(0)."""
    cases = {"same_shape": (STUDENT, TEACHER), "cross_shape": (STUDENT, TEACHER_X)}
    values = {}
    for k, (name, (si, ti)) in enumerate(cases.items()):
        m = build(si, ti)
        gen = torch.Generator().manual_seed(100 + k)
        values[name] = nst_loss(m, make_out(si, 4, gen), make_out(ti, 4, gen))
    return values
