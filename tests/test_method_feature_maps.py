"""AT and NST, both a distance between the student's and the teacher's block-group maps, on the checks they share: a
sum over block groups that leaves the stem out, the larger map average-pooled to the smaller, a deeper teacher's
extra trailing block groups ignored, the gradient reaching every student map but the stem. Each method runs at its
own batch size (AT 3, NST 2); their own values and invariances are in test_method_at.py and test_method_nst.py."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.methods.at import AT
from kdbench.methods.nst import NST
from tests.method_helpers import (
    START,
    STUDENT,
    TEACHER,
    TEACHER_X,
    build_method,
    from_feats,
    make_batch,
    make_out,
    method_loss,
)

# (method, batch size of the random outputs)
MAP_METHODS = pytest.mark.parametrize(("cls", "b"), [(AT, 3), (NST, 2)], ids=["at", "nst"])


@MAP_METHODS
def test_sum_over_layers_and_stem_unused(cls, b):
    gen = torch.Generator().manual_seed(2)
    s, t = make_out(STUDENT, b, gen), make_out(TEACHER, b, gen)
    m = build_method(cls)
    total = method_loss(m, s, t)
    per_layer = [
        method_loss(m, from_feats([s.feats[0], s.feats[i]]), from_feats([t.feats[0], t.feats[i]])) for i in (1, 2, 3)
    ]
    assert total == pytest.approx(sum(per_layer), rel=1e-5)
    s.feats[0] = s.feats[0] * 5.0 + 1.0
    assert method_loss(m, s, t) == pytest.approx(total, rel=1e-6)


@pytest.mark.parametrize("cls", [AT, NST], ids=["at", "nst"])
def test_larger_map_is_average_pooled_to_the_smaller(cls):
    gen = torch.Generator().manual_seed(4)
    small = torch.rand(2, 3, 2, 2, generator=gen)
    big = torch.rand(2, 5, 4, 4, generator=gen)
    stem = torch.zeros(2, 1, 4, 4)
    m = build_method(cls)
    pooled = F.avg_pool2d(big, 2)  # 4x4 -> 2x2: what adaptive pooling gives for an exact ratio
    # teacher larger
    assert method_loss(m, from_feats([stem, small]), from_feats([stem, big])) == pytest.approx(
        method_loss(m, from_feats([stem, small]), from_feats([stem, pooled])), rel=1e-6
    )
    # student larger
    assert method_loss(m, from_feats([stem, big]), from_feats([stem, small])) == pytest.approx(
        method_loss(m, from_feats([stem, pooled]), from_feats([stem, small])), rel=1e-6
    )


@MAP_METHODS
def test_extra_trailing_block_groups_are_ignored(cls, b):
    gen = torch.Generator().manual_seed(5)
    s, t = make_out(STUDENT, b, gen), make_out(TEACHER_X, b, gen)
    m = build_method(cls, STUDENT, TEACHER_X)
    full = method_loss(m, s, t)
    assert full == pytest.approx(method_loss(m, s, from_feats(t.feats[:4])), rel=1e-6)
    assert math.isfinite(full) and full > 0


@MAP_METHODS
def test_gradient_reaches_student_maps(cls, b):
    gen = torch.Generator().manual_seed(6)
    s, t = make_out(STUDENT, b, gen), make_out(TEACHER, b, gen)
    for f in s.feats:
        f.requires_grad_(True)
    build_method(cls).loss(s, t, make_batch(b), START)[cls.name].backward()
    assert s.feats[0].grad is None
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s.feats[1:])
