"""SP: zero on identical maps, scale invariance, a hand-computed value, shape freedom, the golden-value cases."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.method import discover
from kdbench.methods.sp import SP, SPConfig
from kdbench.models.base import FeatureInfo
from tests.method_helpers import (
    START,
    STUDENT,
    TEACHER,
    TEACHER_X,
    build_method,
    from_feats,
    golden_cases,
    make_batch,
    make_out,
    method_loss,
)


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, **cfg) -> SP:
    return build_method(SP, student, teacher, **cfg)


def test_registered_with_reference_defaults():
    assert discover()["sp"].cls is SP
    cfg = SPConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight) == (1.0, 0.0, 3000.0)
    assert SP.needs == {"feats"}
    assert list(build().parameters()) == [] and list(build().buffers()) == []


def test_zero_on_identical_outputs():
    out = make_out(STUDENT, 4, torch.Generator().manual_seed(1))
    assert method_loss(build(STUDENT, STUDENT), out, out) == pytest.approx(0.0, abs=1e-9)


def test_hand_computed_value():
    # b = 2, flattened features: student [[1, 0], [0, 1]] -> G = I (rows already unit).
    # teacher [[1, 0], [1, 0]] -> G = all ones -> rows [1, 1] / sqrt(2).
    # G_s - G_t: diagonal 1 - 1/sqrt(2), off-diagonal -1/sqrt(2):
    # ||.||^2 = 2 (1 - 1/sqrt(2))^2 + 2 (1/2) = 4 - 2 sqrt(2); divided by b^2 = 4.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]]).view(2, 2, 1, 1)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]]).view(2, 1, 2, 1)  # a different shape: only the batch size matters
    expected = 3000.0 * (4 - 2 * math.sqrt(2)) / 4
    assert method_loss(build(), from_feats([s]), from_feats([t])) == pytest.approx(expected, rel=1e-6)


def test_uses_only_the_last_map():
    gen = torch.Generator().manual_seed(2)
    s, t = make_out(STUDENT, 4, gen), make_out(TEACHER, 4, gen)
    m = build()
    ref = method_loss(m, s, t)
    assert ref > 0
    s.feats[1] = s.feats[1] * 3.0 + 1.0
    t.feats[2] = t.feats[2] + 2.0
    assert method_loss(m, s, t) == pytest.approx(ref, rel=1e-6)


def test_invariant_to_positive_scaling_of_each_network():
    gen = torch.Generator().manual_seed(3)
    s, t = make_out(STUDENT, 4, gen), make_out(TEACHER, 4, gen)
    m = build()
    ref = method_loss(m, s, t)
    assert method_loss(m, from_feats([s.feats[-1] * 7.0]), from_feats([t.feats[-1] * 0.01])) == pytest.approx(
        ref, rel=1e-5
    )


def test_cross_shapes_and_batch_of_one():
    gen = torch.Generator().manual_seed(4)
    m = build(STUDENT, TEACHER_X)
    assert math.isfinite(method_loss(m, make_out(STUDENT, 3, gen), make_out(TEACHER_X, 3, gen)))
    # one sample: both 1x1 Gram matrices normalise to [[1]], so the loss is zero
    assert method_loss(m, make_out(STUDENT, 1, gen), make_out(TEACHER_X, 1, gen)) == pytest.approx(0.0, abs=1e-9)


def test_gradient_reaches_student_last_map_only():
    gen = torch.Generator().manual_seed(5)
    s, t = make_out(STUDENT, 4, gen), make_out(TEACHER, 4, gen)
    for f in s.feats:
        f.requires_grad_(True)
    build().loss(s, t, make_batch(4), START)["sp"].backward()
    assert s.feats[-1].grad is not None and s.feats[-1].grad.abs().sum() > 0
    assert all(f.grad is None for f in s.feats[:-1])


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Each case: inputs from a seeded generator, the method built under torch.manual_seed(0)."""
    return {name: method_loss(build(si, ti), s, t) for name, si, ti, s, t in golden_cases(6)}
