"""RKD: zero on identical, similarity-transform invariance, a hand-computed value, the golden-value cases."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from kdbench.method import discover
from kdbench.methods.rkd import RKD, RKDConfig
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START, STUDENT, TEACHER, from_pooled, make_batch, make_ctx, rand_pooled

TERMS = {"rkd_distance", "rkd_angle"}

# One forward + backward through real networks: a cross-family pair by default, three more marked slow.


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, image_size: int = 8, **cfg) -> RKD:
    torch.manual_seed(0)
    return RKD(RKDConfig(**cfg), make_ctx(student, teacher, image_size))


def rkd_terms(m: RKD, s: ModelOutput, t: ModelOutput) -> dict[str, float]:
    return {k: v.item() for k, v in m.loss(s, t, make_batch(s.pooled.shape[0]), START).items()}


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def by_hand(s: list[list[float]], t: list[list[float]]) -> tuple[float, float]:
    """The two unweighted RKD terms with plain Python loops (for tiny batches)."""
    b = len(s)

    def dists(p):
        d = [[math.dist(p[i], p[j]) for j in range(b)] for i in range(b)]
        mean = sum(map(sum, d)) / (b * (b - 1))
        return [[x / mean for x in row] for row in d]

    def cosines(p):
        out = []
        for i, j, k in itertools.product(range(b), repeat=3):
            u = [a - c for a, c in zip(p[j], p[i])]
            v = [a - c for a, c in zip(p[k], p[i])]
            nu, nv = math.hypot(*u), math.hypot(*v)
            out.append(0.0 if nu == 0 or nv == 0 else sum(x * y for x, y in zip(u, v)) / (nu * nv))
        return out

    ds, dt = dists(s), dists(t)
    loss_d = sum(huber(ds[i][j] - dt[i][j]) for i in range(b) for j in range(b)) / b**2
    loss_a = sum(huber(x - y) for x, y in zip(cosines(s), cosines(t))) / b**3
    return loss_d, loss_a


def test_registered_with_reference_defaults():
    assert discover()["rkd"].cls is RKD
    cfg = RKDConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight) == (1.0, 0.0, 1.0)
    assert (cfg.distance_weight, cfg.angle_weight) == (25.0, 50.0)
    assert RKD.needs == {"pooled"}
    assert list(build().parameters()) == [] and list(build().buffers()) == []


def test_zero_on_identical_outputs():
    out = rand_pooled(STUDENT, 5, torch.Generator().manual_seed(1))
    terms = rkd_terms(build(STUDENT, STUDENT), out, out)
    assert set(terms) == TERMS
    assert terms["rkd_distance"] == pytest.approx(0.0, abs=1e-7)
    assert terms["rkd_angle"] == pytest.approx(0.0, abs=1e-7)


def test_hand_computed_collinear_vs_triangle():
    # student: three collinear points; teacher: a right isosceles triangle.
    s = [[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]]
    t = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    # distances worked out: student 1, 2, 1 (mean 4/3) -> 3/4, 3/2, 3/4; teacher 1, 1, sqrt 2 (mean (2 + sqrt 2)/3)
    ds = [0.75, 1.5, 0.75]
    dt = [3 / (2 + math.sqrt(2)), 3 / (2 + math.sqrt(2)), 3 * math.sqrt(2) / (2 + math.sqrt(2))]
    loss_d = 2 * sum(huber(a - b) for a, b in zip(ds, dt)) / 9  # each pair appears twice, diagonal 0
    hand_d, hand_a = by_hand(s, t)
    assert hand_d == pytest.approx(loss_d, rel=1e-12)
    info = FeatureInfo(channels=(1,), reduction=(1,), pooled_dim=2, num_classes=5)
    m = build(info, info)
    terms = rkd_terms(m, from_pooled(torch.tensor(s)), from_pooled(torch.tensor(t)))
    assert terms["rkd_distance"] == pytest.approx(25.0 * loss_d, rel=1e-5)
    assert terms["rkd_angle"] == pytest.approx(50.0 * hand_a, rel=1e-5)
    assert hand_a > 0


def test_matches_loops_on_random_points():
    gen = torch.Generator().manual_seed(2)
    s, t = torch.randn(4, 3, generator=gen), torch.randn(4, 5, generator=gen)
    hand_d, hand_a = by_hand(s.tolist(), t.tolist())
    m = build(FeatureInfo((1,), (1,), 3, 5), FeatureInfo((1,), (1,), 5, 5), weight=2.0)
    terms = rkd_terms(m, from_pooled(s), from_pooled(t))
    assert terms["rkd_distance"] == pytest.approx(2.0 * 25.0 * hand_d, rel=1e-5)
    assert terms["rkd_angle"] == pytest.approx(2.0 * 50.0 * hand_a, rel=1e-5)


def test_invariant_to_similarity_transforms_of_the_student():
    gen = torch.Generator().manual_seed(3)
    s, t = torch.randn(5, 4, generator=gen), torch.randn(5, 6, generator=gen)
    info_s, info_t = FeatureInfo((1,), (1,), 4, 5), FeatureInfo((1,), (1,), 6, 5)
    m = build(info_s, info_t)
    ref = rkd_terms(m, from_pooled(s), from_pooled(t))
    q, _ = torch.linalg.qr(torch.randn(4, 4, generator=gen))  # a random orthogonal matrix
    moved = 3.5 * s @ q + torch.randn(1, 4, generator=gen)
    got = rkd_terms(m, from_pooled(moved), from_pooled(t))
    for key in TERMS:
        assert got[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key


def test_batch_of_one_is_zero():
    terms = rkd_terms(build(), rand_pooled(STUDENT, 1, torch.Generator()), rand_pooled(TEACHER, 1, torch.Generator()))
    assert terms == {"rkd_distance": 0.0, "rkd_angle": 0.0}


def test_gradient_reaches_student_and_is_finite_with_duplicates():
    gen = torch.Generator().manual_seed(4)
    s, t = rand_pooled(STUDENT, 4, gen), rand_pooled(TEACHER, 4, gen)
    s.pooled[1] = s.pooled[0]  # two coincident student points: the eps clamp keeps the gradient finite
    s.pooled.requires_grad_(True)
    total = sum(build().loss(s, t, make_batch(4), START).values())
    total.backward()
    assert torch.isfinite(s.pooled.grad).all() and s.pooled.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Inputs from a seeded generator, the method built under torch.manual_seed(0)."""
    m = build()
    gen = torch.Generator().manual_seed(100)
    return rkd_terms(m, rand_pooled(STUDENT, 6, gen), rand_pooled(TEACHER, 6, gen))
