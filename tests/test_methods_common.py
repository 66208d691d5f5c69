"""Every registered method, through the real harness step: finite losses, gradients everywhere they belong, a frozen
teacher. Parametrised over the registry, so a newly registered method is tested the moment it exists."""

from __future__ import annotations

import copy

import pytest
import torch

from kdbench.config import load_bench
from kdbench.method import discover
from kdbench.models import create_model
from kdbench.sweep import Request, expand, method_order
from kdbench.train import build_member, main_terms, not_applicable_reason

CPU = torch.device("cpu")
BUILTINS = method_order([n for n, e in discover().items() if e.ok and e.builtin])


@pytest.fixture(scope="module")
def teacher(tiny_data):
    torch.manual_seed(123)
    t = create_model("resnet14", num_classes=tiny_data.num_classes).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


def _batch(data, n=16, offset=0):
    from kdbench.data import GPULoader

    loader = GPULoader(data.train_images, data.train_labels, batch_size=n, train=True, mean=data.mean, std=data.std,
                       seed=offset)
    return next(iter(loader.epoch(0)))


def test_all_methods_registered():
    expected = {"ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "crd+kd",
                "crcd", "rrd", "rrd+kd", "rrd-2025"}
    reg = discover()
    assert expected <= set(reg)
    broken = {n: e.error for n, e in reg.items() if n in expected and not e.ok}
    assert not broken
    for n in expected:
        cls = reg[n].cls
        assert cls.name == n and cls.paper, n
        assert cls.__module__.startswith("kdbench.methods."), "built-ins ship inside the kdbench distribution"


@pytest.mark.parametrize("name", BUILTINS)
def test_method_trains_through_the_harness(name, tiny_toml, tiny_data, teacher):
    (spec,) = [s for s in expand(load_bench(tiny_toml), Request([name], ["tiny"])) if s.method == name]
    assert not_applicable_reason(spec, tiny_data, teacher) is None
    t = teacher if (spec.teacher is not None) else None
    m = build_member(spec, tiny_data, t, CPU)
    t_before = copy.deepcopy(teacher.state_dict())
    trained: set[int] = set()

    stage = m.method.init_stage()
    if stage is not None:
        params = list(stage.parameters)
        assert params, "an init stage trains something"
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        batch = _batch(tiny_data, offset=1)
        s_out = m.student(batch.images)
        with torch.no_grad():
            t_out = t(batch.images)
        terms = stage.loss(s_out, t_out, batch)
        total = sum(terms.values())
        assert torch.isfinite(total)
        grads = torch.autograd.grad(total, params, allow_unused=True)
        for p, g in zip(params, grads):
            if g is not None and g.abs().sum() > 0:
                trained.add(id(p))
        for p, f in zip(params, flags):
            p.requires_grad_(f)

    for step in range(3):
        batch = _batch(tiny_data, offset=step + 10)
        with torch.no_grad():
            t_out = t(batch.images) if t is not None else None
        s_out = m.student(batch.images)
        terms = main_terms(m, s_out, t_out, batch)
        assert terms and all(torch.isfinite(v) for v in terms.values()), terms
        m.optimizer.zero_grad(set_to_none=True)
        sum(terms.values()).backward()
        for p in list(m.student.parameters()) + list(m.method.parameters()):
            if p.grad is not None and p.grad.abs().sum() > 0:
                trained.add(id(p))
        m.optimizer.step()

    # Every student parameter the evaluated model uses is trained (SimKD leaves the student's own head unused).
    unused = {id(p) for u in getattr(m.evaluated, "unused_modules", ()) for p in u.parameters()}
    missing_student = [n for n, p in m.student.named_parameters() if id(p) not in trained and id(p) not in unused]
    assert not missing_student, f"student parameters without gradient: {missing_student[:5]}"
    init_params = {id(p) for p in stage.parameters} if stage is not None else set()
    missing_method = [n for n, p in m.method.named_parameters()
                      if (p.requires_grad or id(p) in init_params) and id(p) not in trained]
    assert not missing_method, f"method parameters never trained (init or main stage): {missing_method}"
    assert all(p.grad is None for p in teacher.parameters())
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in t_before.items()), "the teacher must not change"
    # Everything the method keeps is checkpointed: its persistent buffers are in its state_dict (a buffer
    # registered persistent=False must be derivable again from the context, e.g. the training labels).
    sd = m.method.state_dict()
    for mod_name, mod in m.method.named_modules():
        for bname in mod._buffers:
            if bname not in mod._non_persistent_buffers_set:
                assert (f"{mod_name}.{bname}" if mod_name else bname) in sd


@pytest.mark.parametrize("name", ["fitnet", "crd", "rrd"])
def test_any_method_combines_with_kd(name, tiny_toml):
    (spec,) = expand(load_bench(tiny_toml), Request([f"{name}+kd" if name == "fitnet" else name], ["tiny"]))
    if name == "fitnet":
        assert spec.method_config["kd_weight"] == 1.0 and spec.method == "fitnet+kd"
    (kd_set,) = expand(load_bench(tiny_toml), Request([name], ["tiny"], sets=[f"methods.{name}.kd_weight=0.5"]))
    assert kd_set.method_config["kd_weight"] == 0.5


def test_method_groups(tiny_toml):
    from kdbench.sweep import MODERN

    def methods(group: str) -> list[str]:
        return [s.method for s in expand(load_bench(tiny_toml), Request([group], ["tiny"]))]

    mission = ["ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst", "crd", "crd+kd",
               "crcd", "rrd", "rrd+kd", "rrd-2025"]
    builtin_all = [n for n in methods("all") if discover()[n].builtin]
    assert builtin_all == mission, "--methods all keeps meaning the mission's methods and variants"
    assert methods("modern") == MODERN
    assert set(methods("everything")) == set(methods("all")) | set(MODERN)
    assert methods("modern,kd") == MODERN + ["kd"]


CRD_PAIRS = ["wrn_40_2:wrn_16_2", "wrn_40_2:wrn_40_1", "resnet56:resnet20", "resnet110:resnet20", "resnet110:resnet32",
             "resnet32x4:resnet8x4", "vgg13:vgg8", "vgg13:mobilenetv2", "resnet50:mobilenetv2", "resnet50:vgg8",
             "resnet32x4:shufflenetv1", "resnet32x4:shufflenetv2", "wrn_40_2:shufflenetv1"]


@pytest.mark.parametrize("pair", CRD_PAIRS)
def test_modern_methods_apply_to_every_crd_pair(pair):
    from kdbench.method import MethodContext, make_config, resolve
    from kdbench.sweep import MODERN
    from kdbench.train import _preact_bn

    t_arch, s_arch = pair.split(":")
    teacher = create_model(t_arch, num_classes=100)  # real weights: OFD reads its BN statistics
    with torch.device("meta"):
        student = create_model(s_arch, num_classes=100)
    ctx = MethodContext(student=student.feature_info, teacher=teacher.feature_info, num_classes=100, num_train=8,
                        train_labels=torch.arange(8) % 2, image_size=32, student_arch=s_arch, teacher_arch=t_arch,
                        student_head=student.head, teacher_head=teacher.head, teacher_preact_bn=_preact_bn(teacher))
    for name in MODERN:
        entry = resolve(name)
        cfg = make_config(entry)
        assert entry.cls.not_applicable(cfg, ctx) is None, (name, pair)
        with torch.device("meta"):
            entry.cls(cfg, ctx)
