"""AT: zero on identical maps, a hand-computed value, invariance to scaling, the paper's mode, the golden-value cases
(the checks AT shares with NST, over layers, sizes and tap counts, are in test_method_feature_maps.py)."""

from __future__ import annotations

import math

import pytest
import torch

from kdbench.errors import KdbenchError
from kdbench.method import discover
from kdbench.methods.at import AT, ATConfig
from kdbench.models.base import FeatureInfo
from tests.method_helpers import STUDENT, TEACHER, build_method, from_feats, golden_cases, make_out, method_loss


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, **cfg) -> AT:
    return build_method(AT, student, teacher, **cfg)


def test_registered_with_reference_defaults():
    assert discover()["at"].cls is AT
    cfg = ATConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.attention_power) == (1.0, 0.0, 1000.0, 2.0)
    assert AT.needs == {"feats"}
    assert list(build().parameters()) == [] and list(build().buffers()) == []


def test_zero_on_identical_outputs():
    out = make_out(STUDENT, 4, torch.Generator().manual_seed(1))
    assert method_loss(build(STUDENT, STUDENT), out, out) == 0.0


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
    assert method_loss(m, from_feats([stem, s1]), from_feats([stem, t1])) == pytest.approx(expected, rel=1e-6)
    # p = 1: channel means [2, 1] -> [2, 1] / sqrt(5)
    m1 = build(attention_power=1.0)
    expected1 = 1000.0 * ((2 / math.sqrt(5) - c) ** 2 + (1 / math.sqrt(5) - c) ** 2) / 2
    assert method_loss(m1, from_feats([stem, s1]), from_feats([stem, t1])) == pytest.approx(expected1, rel=1e-6)


def test_invariant_to_positive_scaling_of_each_network():
    gen = torch.Generator().manual_seed(3)
    s, t = make_out(STUDENT, 3, gen), make_out(TEACHER, 3, gen)
    m = build()
    ref = method_loss(m, s, t)
    s2 = from_feats([f * 3.0 for f in s.feats])
    t2 = from_feats([f * 0.2 for f in t.feats])
    assert method_loss(m, s2, t2) == pytest.approx(ref, rel=1e-5)


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Each case: inputs from a seeded generator, the method built under torch.manual_seed(0)."""
    values = {}
    for name, si, ti, s, t in golden_cases(4):
        values[name] = method_loss(build(si, ti), s, t)
        values[f"paper/{name}"] = method_loss(build(si, ti, mode="paper"), s, t)
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
    got = method_loss(build(mode="paper"), from_feats([stem, s1]), from_feats([stem, t1]))
    assert got == pytest.approx(expected, rel=1e-6)
    assert build().cfg.mode == "code"
    with pytest.raises(KdbenchError, match="mode"):
        build(mode="papers")


def test_paper_mode_mean_over_the_batch_and_zero_on_identical_maps():
    gen = torch.Generator().manual_seed(11)
    s, t = make_out(STUDENT, 3, gen), make_out(TEACHER, 3, gen)
    m = build(mode="paper")
    per_sample = [
        method_loss(m, from_feats([f[i : i + 1] for f in s.feats]), from_feats([f[i : i + 1] for f in t.feats]))
        for i in range(3)
    ]
    assert method_loss(m, s, t) == pytest.approx(sum(per_sample) / 3, rel=1e-5)
    assert method_loss(build(STUDENT, STUDENT, mode="paper"), s, s) == 0.0


def test_mode_enters_the_run_id_only_when_set(tiny_toml):
    from kdbench.config import load_bench
    from kdbench.sweep import Request, expand

    (code,) = expand(load_bench(tiny_toml), Request(["at"], ["tiny"], sets=["methods.at.mode=code"]))
    (default,) = [s for s in expand(load_bench(tiny_toml), Request(["at"], ["tiny"])) if s.method == "at"]
    (paper,) = expand(load_bench(tiny_toml), Request(["at"], ["tiny"], sets=["methods.at.mode=paper"]))
    assert code.run_id == default.run_id != paper.run_id
    assert "mode" not in default.method_config and paper.method_config["mode"] == "paper"
