"""SimKD: the training loss, the evaluated model (projector + the teacher's own classifier object), its parameter
count in the run record, spatial alignment, a probe can load the student from the saved composite, golden values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdbench.method import MethodContext, discover
from kdbench.methods.simkd import SimKD, SimKDConfig, SimKDModel
from kdbench.models import create_model
from kdbench.models.base import FeatureInfo, ModelOutput
from tests.method_helpers import ONE_STEP, assert_matches_golden, make_ctx, method_loss

STUDENT = FeatureInfo(channels=(4, 6), reduction=(1, 1), pooled_dim=6, num_classes=5)
TEACHER = FeatureInfo(channels=(8, 12), reduction=(1, 2), pooled_dim=12, num_classes=5)


def ctx(head: nn.Module, student=STUDENT, teacher=TEACHER, image_size=8) -> MethodContext:
    return make_ctx(student, teacher, image_size, num_train=4, num_classes=5, teacher_head=head)


def outputs(info: FeatureInfo, b: int, gen: torch.Generator, size: int = 8) -> ModelOutput:
    maps = [
        torch.randn(b, c, size // r, size // r, generator=gen).relu() for c, r in zip(info.channels, info.reduction)
    ]
    return ModelOutput(logits=torch.zeros(b, 5), feats=maps, preact=maps, pooled=torch.zeros(b, info.pooled_dim))


def loss(m: SimKD, s: ModelOutput, t: ModelOutput) -> float:
    return method_loss(m, s, t, ONE_STEP)


def test_registered_with_reference_defaults():
    assert discover()["simkd"].cls is SimKD
    c = SimKDConfig()  # the reference's -c 0 -d 0 -b 1, factor 2
    assert (c.ce_weight, c.kd_weight, c.weight, c.factor) == (0.0, 0.0, 1.0, 2)
    assert SimKD.needs == {"feats"}


def test_loss_is_the_mse_of_the_projected_map_at_the_smaller_size():
    torch.manual_seed(0)
    head = nn.Linear(12, 5)
    m = SimKD(SimKDConfig(), ctx(head))
    convs = [mod for mod in m.projector if isinstance(mod, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size[0]) for c in convs] == [(6, 6, 1), (6, 6, 3), (6, 12, 1)]
    assert not any(p is q for p in m.parameters() for q in head.parameters()), "the teacher head is not the method's"
    gen = torch.Generator().manual_seed(1)
    s, t = outputs(STUDENT, 3, gen), outputs(TEACHER, 3, gen)  # student 8x8, teacher 4x4 at the last tap
    expected = F.mse_loss(m.projector(F.adaptive_avg_pool2d(s.feats[-1], 4)), t.feats[-1]).item()
    assert loss(m, s, t) == pytest.approx(expected, rel=1e-6)
    # a perfect projection costs nothing: replace the projector by one that outputs the teacher's map
    m.projector = nn.Sequential(nn.Conv2d(6, 12, 1, bias=False))
    nn.init.zeros_(m.projector[0].weight)
    zero_t = ModelOutput(t.logits, [t.feats[0], torch.zeros_like(t.feats[-1])], t.preact, t.pooled)
    assert loss(m, s, zero_t) == 0.0


def test_evaluated_model_uses_the_teachers_classifier():
    torch.manual_seed(0)
    student = create_model("resnet8", num_classes=5).eval()
    teacher = create_model("resnet14", num_classes=5).eval()
    c = ctx(teacher.head, student.feature_info, teacher.feature_info, 16)
    m = SimKD(SimKDConfig(), c).eval()
    model = m.evaluated_model(student)
    assert isinstance(model, SimKDModel) and model.classifier is teacher.head
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        out = model(x)
        proj = m.projector(student(x).feats[-1])
        pooled = proj.mean(dim=(2, 3))
        assert torch.allclose(out.pooled, pooled, atol=1e-6)
        assert torch.allclose(out.logits, teacher.head(pooled), atol=1e-6)
    # train()/eval() of the composite leaves the teacher's classifier alone
    model.train()
    assert not teacher.head.training and student.training and m.projector.training
    # saved weights: the student under "student.", loadable alone (what the probe does)
    sd = model.state_dict()
    assert {k.split(".")[0] for k in sd} == {"student", "projector", "classifier"}
    fresh = create_model("resnet8", num_classes=5)
    fresh.load_state_dict({k[len("student.") :]: v for k, v in sd.items() if k.startswith("student.")})


def test_run_record_counts_the_evaluated_model(tiny_toml, tiny_data):
    from kdbench.config import load_bench
    from kdbench.sweep import Request, expand
    from kdbench.train import build_member, model_record, parameter_count

    (spec,) = expand(load_bench(tiny_toml), Request(["simkd"], ["tiny"]))
    torch.manual_seed(0)
    teacher = create_model(spec.teacher.arch, num_classes=tiny_data.num_classes).eval()
    m = build_member(spec, tiny_data, teacher, torch.device("cpu"))
    rec = model_record(m)
    expected = (
        parameter_count(m.student)
        - parameter_count(m.student.head)
        + parameter_count(m.method.projector)
        + parameter_count(teacher.head)
    )
    assert rec["evaluated"] == "SimKDModel" and rec["parameters"] == expected
    assert rec["student_parameters"] == parameter_count(m.student) and rec["student_prefix"] == "student."
    (kd,) = expand(load_bench(tiny_toml), Request(["kd"], ["tiny"]))
    plain = model_record(build_member(kd, tiny_data, teacher, torch.device("cpu")))
    assert plain["evaluated"] == "student" and plain["parameters"] == plain["student_parameters"]


def golden_values() -> dict[str, float]:
    torch.manual_seed(0)
    head = nn.Linear(12, 5)
    m = SimKD(SimKDConfig(), ctx(head))
    gen = torch.Generator().manual_seed(100)
    s, t = outputs(STUDENT, 4, gen), outputs(TEACHER, 4, gen)
    with torch.no_grad():
        logits = head(m.projector(F.adaptive_avg_pool2d(s.feats[-1], 4)).mean(dim=(2, 3)))
    return {"loss": loss(m, s, t), "logit_sum": logits.sum().item()}


def test_golden_values():
    assert_matches_golden("simkd", golden_values())


def test_probe_loads_the_student_out_of_the_saved_composite(tmp_path):
    from kdbench.probe import load_student
    from kdbench.teachers import save_weights

    torch.manual_seed(0)
    student, teacher = create_model("resnet8", num_classes=5), create_model("resnet14", num_classes=5)
    m = SimKD(SimKDConfig(), ctx(teacher.head, student.feature_info, teacher.feature_info, 16))
    (tmp_path / "weights").mkdir()
    save_weights(tmp_path / "weights" / "run.safetensors", m.evaluated_model(student).state_dict())
    run = {
        "status": "done",
        "run_id": "x",
        "weights": "weights/run.safetensors",
        "data": {"num_classes": 5},
        "spec": {"student": "resnet8"},
        "model": {"evaluated": "SimKDModel", "student_prefix": "student."},
    }
    loaded = load_student(run, tmp_path, torch.device("cpu"))
    assert all(torch.equal(v, student.state_dict()[k]) for k, v in loaded.state_dict().items())


def test_students_own_head_is_neither_trained_nor_decayed(tiny_toml, tiny_data):
    """The docstring's claim: the head gets no gradient, so SGD (weight decay included) leaves it as initialised,
    while the rest of the student moves."""
    from kdbench.config import load_bench
    from kdbench.sweep import Request, expand
    from kdbench.train import build_member, train_cohort

    (spec,) = expand(load_bench(tiny_toml), Request(["simkd"], ["tiny"], sets=["protocol.epochs=1"]))
    assert spec.protocol.weight_decay > 0
    torch.manual_seed(0)
    teacher = create_model(spec.teacher.arch, num_classes=tiny_data.num_classes).eval()
    m = build_member(spec, tiny_data, teacher, torch.device("cpu"))
    head = {k: v.clone() for k, v in m.student.head.state_dict().items()}
    body = {k: v.clone() for k, v in m.student.state_dict().items() if not k.startswith("head.")}
    train_cohort([m], tiny_data, teacher, torch.device("cpu"), save=False)
    assert m.failed is None
    assert all(torch.equal(v, m.student.head.state_dict()[k]) for k, v in head.items())
    assert any(not torch.equal(v, m.student.state_dict()[k]) for k, v in body.items())
