"""PKT: zero on identical, scale invariance, a hand-computed value, golden values, pairs."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch
from kdbench.methods.pkt import PKT, PKTConfig

from kdbench.method import Batch, MethodContext, discover
from kdbench.models.base import FeatureInfo, ModelOutput

GOLDEN = Path(__file__).parent / "golden" / "pkt.json"

STUDENT = FeatureInfo(channels=(4, 4, 6, 8), reduction=(1, 1, 2, 4), pooled_dim=8, num_classes=5)
TEACHER = FeatureInfo(channels=(8, 8, 12, 16), reduction=(1, 1, 2, 4), pooled_dim=16, num_classes=5)

PAIRS = [
    ("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"), ("resnet110", "resnet20"),
    ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"), ("vgg13", "vgg8"), ("vgg13", "mobilenetv2"),
    ("resnet50", "mobilenetv2"), ("resnet50", "vgg8"), ("resnet32x4", "shufflenetv1"),
    ("resnet32x4", "shufflenetv2"), ("wrn_40_2", "shufflenetv1"),
]
# One forward + backward through real networks: a cross-family pair by default, three more marked slow.
REAL_PAIRS = [
    ("resnet32x4", "shufflenetv2"),
    pytest.param("wrn_40_2", "wrn_16_2", marks=pytest.mark.slow),
    pytest.param("resnet32x4", "resnet8x4", marks=pytest.mark.slow),
    pytest.param("vgg13", "mobilenetv2", marks=pytest.mark.slow),
]


def make_ctx(student: FeatureInfo, teacher: FeatureInfo, image_size: int = 8) -> MethodContext:
    return MethodContext(student=student, teacher=teacher, num_classes=student.num_classes, num_train=100,
                         train_labels=torch.zeros(100, dtype=torch.long), image_size=image_size)


def from_pooled(pooled: torch.Tensor) -> ModelOutput:
    b = pooled.shape[0]
    f = torch.zeros(b, 1, 1, 1)
    return ModelOutput(logits=torch.zeros(b, 5), feats=[f], preact=[f], pooled=pooled)


def rand_pooled(info: FeatureInfo, b: int, gen: torch.Generator) -> ModelOutput:
    return from_pooled(torch.randn(b, info.pooled_dim, generator=gen).relu())


def make_batch(b: int) -> Batch:
    return Batch(images=torch.zeros(b, 3, 8, 8), labels=torch.zeros(b, dtype=torch.long), index=torch.arange(b))


def build(student: FeatureInfo = STUDENT, teacher: FeatureInfo = TEACHER, image_size: int = 8, **cfg) -> PKT:
    torch.manual_seed(0)
    return PKT(PKTConfig(**cfg), make_ctx(student, teacher, image_size))


def pkt_loss(m: PKT, s: ModelOutput, t: ModelOutput) -> float:
    return m.loss(s, t, make_batch(s.pooled.shape[0]))["pkt"].item()


def test_registered_with_reference_defaults():
    assert discover()["pkt"].cls is PKT
    cfg = PKTConfig()
    assert (cfg.ce_weight, cfg.kd_weight, cfg.weight, cfg.eps) == (1.0, 0.0, 30000.0, 1e-7)
    assert PKT.needs == {"pooled"}
    assert list(build().parameters()) == [] and list(build().buffers()) == []


def test_zero_on_identical_outputs():
    out = rand_pooled(STUDENT, 5, torch.Generator().manual_seed(1))
    assert pkt_loss(build(STUDENT, STUDENT), out, out) == 0.0


def test_hand_computed_value():
    # student [[1, 0], [0, 1]]: cosines [[1, 0], [0, 1]] -> (cos + 1) / 2 = [[1, .5], [.5, 1]]
    #   -> rows [2/3, 1/3] and [1/3, 2/3]
    # teacher [[1, 0], [1, 0]] (any dimension; here 3): cosines all 1 -> all 1 -> rows [1/2, 1/2]
    # KL terms: 1/2 log(3/4) + 1/2 log(3/2) per row = 1/2 log(9/8); two rows -> log(9/8); mean over 4 entries.
    s = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    t = torch.tensor([[2.0, 0.0, 0.0], [5.0, 0.0, 0.0]])
    expected = 30000.0 * math.log(9 / 8) / 4
    assert pkt_loss(build(), from_pooled(s), from_pooled(t)) == pytest.approx(expected, rel=1e-5)


def test_invariant_to_positive_scaling_of_each_network():
    gen = torch.Generator().manual_seed(2)
    s, t = rand_pooled(STUDENT, 5, gen), rand_pooled(TEACHER, 5, gen)
    m = build()
    ref = pkt_loss(m, s, t)
    assert ref > 0
    assert pkt_loss(m, from_pooled(s.pooled * 9.0), from_pooled(t.pooled * 0.05)) == pytest.approx(ref, rel=1e-4)


def test_zero_vector_gives_finite_loss_and_gradient():
    gen = torch.Generator().manual_seed(3)
    s, t = rand_pooled(STUDENT, 4, gen), rand_pooled(TEACHER, 4, gen)
    s.pooled[2] = 0.0  # a dead student sample: its cosines are 0, no NaN anywhere
    s.pooled.requires_grad_(True)
    loss = build().loss(s, t, make_batch(4))["pkt"]
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(s.pooled.grad).all()
    assert s.pooled.grad.abs().sum() > 0


def test_bf16_autocast_gives_fp32_loss():
    gen = torch.Generator().manual_seed(4)
    s, t = rand_pooled(STUDENT, 4, gen), rand_pooled(TEACHER, 4, gen)
    m = build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = m.loss(s, t, make_batch(4))["pkt"]
    assert low.dtype == torch.float32
    assert low.item() == pytest.approx(pkt_loss(m, s, t), rel=1e-6)


# ------------------------------------------------------------------------------------------------ golden values


def golden_values() -> dict[str, float]:
    """Inputs from a seeded generator, the method built under torch.manual_seed(0)."""
    m = build()
    gen = torch.Generator().manual_seed(100)
    return {"default": pkt_loss(m, rand_pooled(STUDENT, 6, gen), rand_pooled(TEACHER, 6, gen))}


def test_golden_values():
    expected = json.loads(GOLDEN.read_text())
    got = golden_values()
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-5), name


# ------------------------------------------------------------------------------------------------ zoo pairs


@functools.cache
def zoo_info(name: str) -> FeatureInfo:
    try:
        from kdbench.models.base import feature_info, list_models
    except ImportError as exc:  # the zoo is optional for these unit tests
        pytest.skip(f"model zoo not available: {exc}")
    if name not in list_models():
        pytest.skip(f"{name} is not in the zoo yet")
    return feature_info(name, 10)


@pytest.mark.parametrize("teacher,student", PAIRS)
def test_zoo_pair_shapes(teacher, student):
    """Every benchmark pair, with random pooled vectors of the declared sizes (no forward pass): finite loss."""
    ti, si = zoo_info(teacher), zoo_info(student)
    m = build(si, ti, image_size=32)
    gen = torch.Generator().manual_seed(8)
    assert math.isfinite(pkt_loss(m, rand_pooled(si, 3, gen), rand_pooled(ti, 3, gen)))


@pytest.mark.parametrize("teacher,student", REAL_PAIRS)
def test_real_pair_forward_backward(teacher, student):
    ti, si = zoo_info(teacher), zoo_info(student)
    from kdbench.models.base import create_model

    torch.manual_seed(0)
    t_net, s_net = create_model(teacher, 10).eval(), create_model(student, 10)
    m = build(si, ti, image_size=32)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        t_out = t_net(x)
    m.loss(s_net(x), t_out, make_batch(3))["pkt"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s_net.parameters())


if __name__ == "__main__":  # regenerate the golden values: python tests/test_method_pkt.py
    GOLDEN.parent.mkdir(exist_ok=True)
    GOLDEN.write_text(json.dumps(golden_values(), indent=2, sort_keys=True) + "\n")
    print(GOLDEN.read_text())
