"""ReviewKD: the hierarchical context loss by hand, the review path's shapes and fusion, level pairing across
families, the warm-up, golden values."""

from __future__ import annotations

import pytest
import torch

from kdbench.method import MethodContext, Progress, discover
from kdbench.methods.reviewkd import ABF, ReviewKD, ReviewKDConfig, hcl
from kdbench.models.base import FeatureInfo, ModelOutput, feature_info
from tests.method_helpers import assert_matches_golden, make_ctx, method_loss

STUDENT = FeatureInfo(channels=(4, 4, 6, 8), reduction=(1, 1, 2, 4), pooled_dim=8, num_classes=5)
TEACHER = FeatureInfo(channels=(8, 8, 12, 16), reduction=(1, 1, 2, 4), pooled_dim=16, num_classes=5)
DONE = Progress(epoch=239, epochs=240, step=0, steps=1)


def ctx(student=STUDENT, teacher=TEACHER, image_size=8) -> MethodContext:
    return make_ctx(student, teacher, image_size, num_train=4, num_classes=5)


def outputs(info: FeatureInfo, b: int, gen: torch.Generator, size: int = 8) -> ModelOutput:
    maps = [torch.randn(b, c, size // r, size // r, generator=gen) for c, r in zip(info.channels, info.reduction)]
    return ModelOutput(
        logits=torch.zeros(b, 5),
        feats=[m.relu() for m in maps],
        preact=maps,
        pooled=torch.randn(b, info.pooled_dim, generator=gen).relu(),
    )


def loss(m: ReviewKD, s: ModelOutput, t: ModelOutput, progress: Progress = DONE) -> float:
    return method_loss(m, s, t, progress)


def test_registered_with_reference_defaults():
    assert discover()["reviewkd"].cls is ReviewKD
    c = ReviewKDConfig()
    assert (c.ce_weight, c.kd_weight, c.weight, c.warmup, c.max_mid_channels) == (1.0, 0.0, 5.0, 20.0, 512)
    assert ReviewKD.needs == {"feats", "preact", "pooled"}


def test_hcl_by_hand():
    # A 4x4 checkerboard of +-1 against zeros: MSE 1; pooled to 2x2 and 1x1 it is all zeros (4x4 is skipped, not
    # smaller than the map): (1 + 0.5 * 0 + 0.25 * 0) / (1 + 0.5 + 0.25).
    board = (torch.arange(4).view(4, 1) + torch.arange(4).view(1, 4)) % 2 * 2.0 - 1.0
    assert hcl(board.view(1, 1, 4, 4), torch.zeros(1, 1, 4, 4)).item() == pytest.approx(1 / 1.75)
    # A constant offset a survives every pooling: a^2 at every level, so a^2 after normalising (8x8: 4, 2, 1 used).
    assert hcl(torch.full((2, 3, 8, 8), 0.5), torch.zeros(2, 3, 8, 8)).item() == pytest.approx(0.25)
    # A 1x1 level (the pooled vector) is a plain MSE.
    a, b = torch.randn(3, 5, 1, 1), torch.randn(3, 5, 1, 1)
    assert hcl(a, b).item() == pytest.approx(torch.mean((a - b) ** 2).item())


def test_abf_fuses_with_attention_and_resizes():
    torch.manual_seed(0)
    abf = ABF(in_channels=3, mid=4, out_channels=5, fuse=True)
    x, residual = torch.randn(2, 3, 4, 4), torch.randn(2, 4, 2, 2)
    y, fused = abf(x, residual, out_size=8)
    assert y.shape == (2, 5, 8, 8) and fused.shape == (2, 4, 8, 8)
    # the fused map is a per-pixel blend a0 * conv1(x) + a1 * upsampled residual, weights in (0, 1)
    with torch.no_grad():
        base = abf.conv1(x)
        up = torch.nn.functional.interpolate(residual, size=(4, 4), mode="nearest")
        a = abf.att(torch.cat([base, up], 1))
        blend = base * a[:, 0:1] + up * a[:, 1:2]
        assert torch.allclose(fused, torch.nn.functional.interpolate(blend, size=(8, 8), mode="nearest"))
    deepest = ABF(3, 4, 5, fuse=False)
    assert deepest.att is None and deepest(x, None, 4)[0].shape == (2, 5, 4, 4)


def test_levels_pair_from_the_deepest_and_the_loss_is_finite():
    m = ReviewKD(ReviewKDConfig(), ctx())
    assert [abf.conv2[0].out_channels for abf in m.abfs] == [8, 12, 16, 16]  # teacher feats[1:] + pooled
    assert [abf.conv1[0].in_channels for abf in m.abfs] == [4, 6, 8, 8]
    assert m.t_sizes == [8, 4, 2, 1]
    # vgg (5 taps) -> resnet (4 taps): the shallowest extra level is dropped
    with torch.device("meta"):
        cross = ReviewKD(ReviewKDConfig(), ctx(feature_info("resnet8"), feature_info("vgg13"), 32))
    assert cross.t_start == 1 and cross.s_start == 0 and len(cross.abfs) == 4
    gen = torch.Generator().manual_seed(0)
    assert loss(m, outputs(STUDENT, 3, gen), outputs(TEACHER, 3, gen)) > 0


def test_warmup_scales_the_loss():
    torch.manual_seed(0)
    m = ReviewKD(ReviewKDConfig(), ctx()).eval()
    gen = torch.Generator().manual_seed(1)
    s, t = outputs(STUDENT, 3, gen), outputs(TEACHER, 3, gen)
    full = loss(m, s, t)
    assert loss(m, s, t, Progress(0, 240, 0, 1)) == pytest.approx(full / 20, rel=1e-5)
    assert loss(m, s, t, Progress(1, 40, 0, 1)) == pytest.approx(full * 2 / (20 * 40 / 240), rel=1e-5)
    assert loss(m, s, t, Progress(3, 40, 0, 1)) == pytest.approx(full, rel=1e-6)


def golden_values() -> dict[str, float]:
    torch.manual_seed(0)
    m = ReviewKD(ReviewKDConfig(), ctx())
    gen = torch.Generator().manual_seed(100)
    return {"default": loss(m, outputs(STUDENT, 4, gen), outputs(TEACHER, 4, gen))}


def test_golden_values():
    assert_matches_golden("reviewkd", golden_values())
