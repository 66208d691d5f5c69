"""AT: zero on identical maps, a hand-computed value, invariances, size/length mismatches, the golden-value cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.method import discover
from kdbench.methods.at import AT, ATConfig
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import START, STUDENT, TEACHER, TEACHER_X, from_feats, make_batch, make_ctx, make_out

# Tiny made-up networks at image size 8: taps of 8, 8, 4, 2 pixels a side.
# A VGG-like teacher (one more tap, everything one stride coarser).

# One forward + backward through real networks: a cross-family pair by default, three more marked slow.


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, image_size: int = 8, **cfg) -> AT:
    torch.manual_seed(0)
    return AT(ATConfig(**cfg), make_ctx(student, teacher, image_size))


def at_loss(m: AT, s: ModelOutput, t: ModelOutput) -> float:
    return m.loss(s, t, make_batch(s.feats[0].shape[0]), START)["at"].item()


def test_registered_with_reference_defaults():
    assert discover()["at"].cls is AT
    cfg = ATConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.attention_power) == (1.0, 0.0, 1000.0, 2.0)
    assert AT.needs == {"feats"}
    assert list(build().parameters()) == [] and list(build().buffers()) == []


def test_zero_on_identical_outputs():
    out = make_out(STUDENT, 4, torch.Generator().manual_seed(1))
    assert at_loss(build(STUDENT, STUDENT), out, out) == 0.0


def test_hand_computed_value():
    # one sample, one block group, a 1 x 2 map.
    # student: channels [1, 2] and [3, 0] -> mean of squares per pixel [(1 + 9) / 2, (4 + 0) / 2] = [5, 2]
    #          -> normalised [5, 2] / sqrt(29)
    # teacher: one channel [1, 1] -> [1, 1] -> [1, 1] / sqrt(2)
    # loss = 1000 * mean over the 2 pixels of the squared difference
    s1 = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    t1 = torch.tensor([[[[1.0, 1.0]]]])
    stem = torch.zeros(1, 1, 1, 2)
    a, b, c = 5 / math.sqrt(29), 2 / math.sqrt(29), 1 / math.sqrt(2)
    expected = 1000.0 * ((a - c) ** 2 + (b - c) ** 2) / 2
    m = build()
    assert at_loss(m, from_feats([stem, s1]), from_feats([stem, t1])) == pytest.approx(expected, rel=1e-6)
    # p = 1: channel means [2, 1] -> [2, 1] / sqrt(5)
    m1 = build(attention_power=1.0)
    expected1 = 1000.0 * ((2 / math.sqrt(5) - c) ** 2 + (1 / math.sqrt(5) - c) ** 2) / 2
    assert at_loss(m1, from_feats([stem, s1]), from_feats([stem, t1])) == pytest.approx(expected1, rel=1e-6)


def test_sum_over_layers_and_stem_unused():
    gen = torch.Generator().manual_seed(2)
    s, t = make_out(STUDENT, 3, gen), make_out(TEACHER, 3, gen)
    m = build()
    total = at_loss(m, s, t)
    per_layer = [
        at_loss(m, from_feats([s.feats[0], s.feats[i]]), from_feats([t.feats[0], t.feats[i]])) for i in (1, 2, 3)
    ]
    assert total == pytest.approx(sum(per_layer), rel=1e-5)
    s.feats[0] = s.feats[0] * 5.0 + 1.0
    assert at_loss(m, s, t) == pytest.approx(total, rel=1e-6)


def test_invariant_to_positive_scaling_of_each_network():
    gen = torch.Generator().manual_seed(3)
    s, t = make_out(STUDENT, 3, gen), make_out(TEACHER, 3, gen)
    m = build()
    ref = at_loss(m, s, t)
    s2 = from_feats([f * 3.0 for f in s.feats])
    t2 = from_feats([f * 0.2 for f in t.feats])
    assert at_loss(m, s2, t2) == pytest.approx(ref, rel=1e-5)


def test_larger_map_is_average_pooled_to_the_smaller():
    gen = torch.Generator().manual_seed(4)
    small = torch.rand(2, 3, 2, 2, generator=gen)
    big = torch.rand(2, 5, 4, 4, generator=gen)
    stem = torch.zeros(2, 1, 4, 4)
    m = build()
    pooled = F.avg_pool2d(big, 2)  # 4x4 -> 2x2: what adaptive pooling gives for an exact ratio
    # teacher larger
    assert at_loss(m, from_feats([stem, small]), from_feats([stem, big])) == pytest.approx(
        at_loss(m, from_feats([stem, small]), from_feats([stem, pooled])), rel=1e-6
    )
    # student larger
    assert at_loss(m, from_feats([stem, big]), from_feats([stem, small])) == pytest.approx(
        at_loss(m, from_feats([stem, pooled]), from_feats([stem, small])), rel=1e-6
    )


def test_extra_trailing_block_groups_are_ignored():
    gen = torch.Generator().manual_seed(5)
    s, t = make_out(STUDENT, 3, gen), make_out(TEACHER_X, 3, gen)
    m = build(STUDENT, TEACHER_X)
    three = at_loss(m, s, t)
    assert three == pytest.approx(at_loss(m, s, from_feats(t.feats[:4])), rel=1e-6)
    assert math.isfinite(three) and three > 0


def test_gradient_reaches_student_maps():
    gen = torch.Generator().manual_seed(6)
    s, t = make_out(STUDENT, 3, gen), make_out(TEACHER, 3, gen)
    for f in s.feats:
        f.requires_grad_(True)
    build().loss(s, t, make_batch(3), START)["at"].backward()
    assert s.feats[0].grad is None
    assert all(f.grad is not None and f.grad.abs().sum() > 0 for f in s.feats[1:])


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Each case: inputs from a seeded generator, the method built under torch.manual_seed(0)."""
    cases = {"same_shape": (STUDENT, TEACHER), "cross_shape": (STUDENT, TEACHER_X)}
    values = {}
    for k, (name, (si, ti)) in enumerate(cases.items()):
        gen = torch.Generator().manual_seed(100 + k)
        s, t = make_out(si, 4, gen), make_out(ti, 4, gen)
        values[name] = at_loss(build(si, ti), s, t)
        values[f"paper/{name}"] = at_loss(build(si, ti, mode="paper"), s, t)
    return values


# ------------------------------------------------------------------------------------------------ modes


def test_paper_mode_by_hand_and_bad_mode():
    # The hand-computed case above in the paper's form: beta/2 * ||a_s - a_t||_2, beta divided by H*W (= 2) and
    # the batch size (1): 1000 / 2 * sqrt((a - c)^2 + (b - c)^2) / 2.
    s1 = torch.tensor([[[[1.0, 2.0]], [[3.0, 0.0]]]])
    t1 = torch.tensor([[[[1.0, 1.0]]]])
    stem = torch.zeros(1, 1, 1, 2)
    a, b, c = 5 / math.sqrt(29), 2 / math.sqrt(29), 1 / math.sqrt(2)
    expected = 1000.0 / 2 * math.sqrt((a - c) ** 2 + (b - c) ** 2) / 2
    got = at_loss(build(mode="paper"), from_feats([stem, s1]), from_feats([stem, t1]))
    assert got == pytest.approx(expected, rel=1e-6)
    assert build().cfg.mode == "code"
    with pytest.raises(KdbenchError, match="mode"):
        build(mode="papers")


def test_paper_mode_mean_over_the_batch_and_zero_on_identical_maps():
    gen = torch.Generator().manual_seed(11)
    s, t = make_out(STUDENT, 3, gen), make_out(TEACHER, 3, gen)
    m = build(mode="paper")
    per_sample = [
        at_loss(m, from_feats([f[i : i + 1] for f in s.feats]), from_feats([f[i : i + 1] for f in t.feats]))
        for i in range(3)
    ]
    assert at_loss(m, s, t) == pytest.approx(sum(per_sample) / 3, rel=1e-5)
    assert at_loss(build(STUDENT, STUDENT, mode="paper"), s, s) == 0.0


def test_mode_enters_the_run_id_only_when_set(tiny_toml):
    from kdbench.config import load_bench
    from kdbench.sweep import Request, expand

    (code,) = expand(load_bench(tiny_toml), Request(["at"], ["tiny"], sets=["methods.at.mode=code"]))
    (default,) = [s for s in expand(load_bench(tiny_toml), Request(["at"], ["tiny"])) if s.method == "at"]
    (paper,) = expand(load_bench(tiny_toml), Request(["at"], ["tiny"], sets=["methods.at.mode=paper"]))
    assert code.run_id == default.run_id != paper.run_id
    assert "mode" not in default.method_config and paper.method_config["mode"] == "paper"
