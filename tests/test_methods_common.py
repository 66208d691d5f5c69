"""Every registered method, through the real harness step: finite losses, gradients everywhere they belong, a frozen
teacher; then the blocks every method's test file used to repeat: the benchmark pairs at their declared shapes, a
forward and backward through real pairs, the bf16 guard and the golden values (whose cases stay in each method's
file). Parametrised over the registry, so a newly registered method is tested the moment it exists."""

from __future__ import annotations

import copy
import functools
import importlib
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from kdbench.config import load_bench
from kdbench.method import Batch, Method, MethodContext, discover, make_config, resolve
from kdbench.models import ModelOutput, create_model
from kdbench.sweep import Request, expand, method_order
from kdbench.train import _preact_bn, build_member, main_terms, not_applicable_reason
from tests.method_helpers import START, make_out

CPU = torch.device("cpu")
BUILTINS = method_order([n for n, e in discover().items() if e.ok and e.builtin])


@pytest.fixture(scope="module")
def teacher(tiny_data):
    torch.manual_seed(123)
    t = create_model("resnet14", num_classes=tiny_data.num_classes).eval()
    for p in t.parameters():
        p.requires_grad_(False)
    return t


# The mission's 15 methods, the vanilla student and the 3 variants, in the benchmark's table order. Written out
# here (not read from kdbench) so that a change to the registry's order or contents fails these tests.
MISSION = (
    "ce", "kd", "fitnet", "at", "sp", "cc", "vid", "rkd", "pkt", "ab", "ft", "fsp", "nst",
    "crd", "crd+kd", "crcd", "rrd", "rrd+kd", "rrd-2025",
)  # fmt: skip


def _batch(data, n=16, offset=0):
    from kdbench.data import GPULoader

    loader = GPULoader(
        data.train_images, data.train_labels, batch_size=n, train=True, mean=data.mean, std=data.std, seed=offset
    )
    return next(iter(loader.epoch(0)))


def test_all_methods_registered():
    expected = set(MISSION)
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

    stage = m.method.init_stage(m.student)
    if stage is not None:
        params = stage.all_parameters()
        assert params, "an init stage trains something"
        flags = [p.requires_grad for p in params]
        for p in params:
            p.requires_grad_(True)
        batch = _batch(tiny_data, offset=1)
        s_out = m.student(batch.images, preact=m.preact)
        with torch.no_grad():
            t_out = t(batch.images, preact=m.preact)
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
            t_out = t(batch.images, preact=m.preact) if t is not None else None
        s_out = m.student(batch.images, preact=m.preact)
        terms = main_terms(m, s_out, t_out, batch, START)
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
    init_params = {id(p) for p in stage.all_parameters()} if stage is not None else set()
    missing_method = [
        n for n, p in m.method.named_parameters() if (p.requires_grad or id(p) in init_params) and id(p) not in trained
    ]
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


# ---------------------------------------------------------------------------------------------- blocks every
# method file used to repeat, parametrised over the registry (as timm's test_models.py over list_models)

DISTILLERS = [n for n in BUILTINS if discover()[n].cls.requires_teacher]
GOLDEN_DIR = Path(__file__).parent / "golden"
# Golden files whose cases are a ``golden_values()`` in the method's own test file (all but two modern methods').
GOLDEN = sorted(
    p.stem
    for p in GOLDEN_DIR.glob("*.json")
    if "def golden_values" in (GOLDEN_DIR.parent / f"test_method_{p.stem}.py").read_text()
)
# The CRD benchmark's pairs (teacher, student), used at their declared shapes.
PAIRS = [
    ("wrn_40_2", "wrn_16_2"),
    ("wrn_40_2", "wrn_40_1"),
    ("resnet56", "resnet20"),
    ("resnet110", "resnet20"),
    ("resnet110", "resnet32"),
    ("resnet32x4", "resnet8x4"),
    ("vgg13", "vgg8"),
    ("vgg13", "mobilenetv2"),
    ("resnet50", "mobilenetv2"),
    ("resnet50", "vgg8"),
    ("resnet32x4", "shufflenetv1"),
    ("resnet32x4", "shufflenetv2"),
    ("wrn_40_2", "shufflenetv1"),
]
# One forward + backward through real networks: a same-family and a cross-family pair, three more marked slow.
REAL_PAIRS = [
    ("wrn_40_2", "wrn_16_2"),
    ("resnet20", "mobilenetv2"),
    pytest.param("resnet32x4", "resnet8x4", marks=pytest.mark.slow),
    pytest.param("resnet32x4", "shufflenetv2", marks=pytest.mark.slow),
    pytest.param("vgg13", "mobilenetv2", marks=pytest.mark.slow),
]
# Methods whose own loss is exactly 0 on a fresh method's first step: RRD with the batch enqueued after the loss
# has no teacher key yet (its own tests check the positive value from the second step on).
FIRST_STEP_ZERO = {"rrd", "rrd+kd"}
# Methods whose maths run in fp32 even under autocast, adapters included, so bf16 autocast on fp32 inputs leaves
# the value unchanged (rel 1e-6); methods with a trainable adapter run it in bf16 there (rel 5e-2).
BF16_EXACT = {"at", "nst", "pkt", "rkd", "sp"}
BF16_ADAPTER = {"cc", "fitnet"}
NUM_TRAIN = 40
TRAIN_LABELS = torch.arange(NUM_TRAIN) % 10


@functools.cache
def zoo_net(name: str) -> nn.Module:
    """A zoo model with 10 classes (its feature_info and head build the method's context); shared, never trained."""
    torch.manual_seed(0)
    return create_model(name, num_classes=10)


def zoo_context(teacher: nn.Module, student: nn.Module) -> MethodContext:
    return MethodContext(
        student=student.feature_info,
        teacher=teacher.feature_info,
        num_classes=10,
        num_train=NUM_TRAIN,
        train_labels=TRAIN_LABELS,
        image_size=32,
        student_arch="",
        student_head=student.head,
        teacher_head=teacher.head,
        teacher_preact_bn=_preact_bn(teacher),
    )


def build_method(name: str, ctx: MethodContext) -> Method:
    entry = resolve(name)
    torch.manual_seed(0)
    m = entry.cls(make_config(entry), ctx)
    m.rng = torch.Generator().manual_seed(0)
    return m


def zoo_batch(b: int) -> Batch:
    index = torch.arange(b) * 11 % NUM_TRAIN
    return Batch(images=torch.zeros(b, 3, 32, 32), labels=TRAIN_LABELS[index], index=index)


def both_stages(m: Method, student: nn.Module, s_out, t_out, batch: Batch) -> dict[str, torch.Tensor]:
    """The method's own main-stage terms and, prefixed "init:", its init-stage terms."""
    terms = dict(m.loss(s_out, t_out, batch, START))
    stage = m.init_stage(student)
    if stage is not None:
        terms.update(
            {f"init:{k}": v for k, v in stage.loss(s_out if stage.needs_student else None, t_out, batch).items()}
        )
    return terms


def _zoo_cases() -> list:
    # FT's paraphraser on ResNet50's 2048 channels takes seconds to build: those two cases are marked slow.
    return [
        pytest.param(n, t, s, marks=pytest.mark.slow) if (n == "ft" and t == "resnet50") else (n, t, s)
        for n in DISTILLERS
        for t, s in PAIRS
    ]


@pytest.mark.parametrize("name,teacher_name,student_name", _zoo_cases())
def test_zoo_pair_shapes(name, teacher_name, student_name):
    """Every benchmark pair, with random taps of the declared shapes (no forward pass): finite terms, or n/a."""
    teacher, student = zoo_net(teacher_name), zoo_net(student_name)
    ctx = zoo_context(teacher, student)
    entry = resolve(name)
    reason = entry.cls.not_applicable(make_config(entry), ctx)
    if reason is not None:
        assert isinstance(reason, str) and reason
        return
    m = build_method(name, ctx)
    gen = torch.Generator().manual_seed(8)
    s_out, t_out = make_out(student.feature_info, 2, gen, 32), make_out(teacher.feature_info, 2, gen, 32)
    with torch.no_grad():
        terms = both_stages(m, student, s_out, t_out, zoo_batch(2))
    assert all(math.isfinite(float(v)) for v in terms.values()), terms


@pytest.mark.parametrize("teacher_name,student_name", REAL_PAIRS)
@pytest.mark.parametrize("name", DISTILLERS)
def test_real_pair_forward_backward(name, teacher_name, student_name):
    torch.manual_seed(0)
    teacher = create_model(teacher_name, num_classes=10).eval().requires_grad_(False)
    student = create_model(student_name, num_classes=10)
    ctx = zoo_context(teacher, student)
    entry = resolve(name)
    if entry.cls.not_applicable(make_config(entry), ctx) is not None:
        assert name == "fsp" and teacher.feature_info.channels != student.feature_info.channels
        return
    m = build_method(name, ctx).train()
    preact = "preact" in m.needs
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        t_out = teacher(x, preact=preact)
    batch = zoo_batch(4)

    # Main stage: finite terms; every trainable method parameter and the student get a gradient.
    terms = m.loss(student(x, preact=preact), t_out, batch, START)
    if terms:
        loss = sum(terms.values())
        assert all(torch.isfinite(v) for v in terms.values()), terms
        assert loss > 0 or name in FIRST_STEP_ZERO, terms
        loss.backward()
        assert all(p.grad is not None for p in m.parameters() if p.requires_grad)
        assert all(p.grad is None for p in m.parameters() if not p.requires_grad)
        if loss > 0:
            assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
        if loss > 0 and "logits" in m.needs:  # a term on the logits (CRCD's gradients) trains the classifier
            assert student.head.weight.grad is not None and student.head.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())

    # Init stage, as the harness runs it: what it trains gets a gradient, the head and the teacher none, and the
    # student parameters left without one cannot change the stage's loss.
    stage = m.init_stage(student)
    if stage is None:
        return
    params = stage.all_parameters()
    for p in params:
        p.grad = None
        p.requires_grad_(True)
    student.eval()
    for mod in stage.student_modules:
        mod.train()

    def stage_loss() -> torch.Tensor:
        s_out = student(x, preact=preact) if stage.needs_student else None
        return sum(stage.loss(s_out, t_out, batch).values())

    loss = stage_loss()
    assert torch.isfinite(loss) and loss > 0
    loss.backward()
    assert all(p.grad is not None for p in stage.parameters)
    assert all(p.grad is None for p in student.head.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    own = [p for mod in stage.student_modules for p in mod.parameters()]
    idle = [p for p in own if p.grad is None]
    assert len(idle) < max(1, len(own) // 2)
    if idle:
        with torch.no_grad():
            for p in idle:
                p.zero_()
            assert torch.equal(stage_loss(), loss.detach())


@pytest.mark.parametrize("name", DISTILLERS)
def test_bf16_autocast_gives_fp32_terms(name):
    """Under bf16 autocast every term (both stages) comes out fp32 and finite, from fp32 or bf16 taps; where the
    maths never leave fp32 the value is the fp32 one."""
    teacher, student = zoo_net("resnet20"), zoo_net("resnet8")
    m = build_method(name, zoo_context(teacher, student))  # in train mode; each call gets a fresh copy of it
    gen = torch.Generator().manual_seed(7)
    s_out, t_out = make_out(student.feature_info, 4, gen, 32), make_out(teacher.feature_info, 4, gen, 32)
    batch = zoo_batch(4)
    with torch.no_grad():
        ref = both_stages(copy.deepcopy(m), student, s_out, t_out, batch)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = both_stages(copy.deepcopy(m), student, s_out, t_out, batch)
            half = both_stages(copy.deepcopy(m), student, to_bf16(s_out), to_bf16(t_out), batch)
    assert set(low) == set(ref) == set(half)
    for key, value in low.items():
        assert value.dtype == half[key].dtype == torch.float32, key
        assert torch.isfinite(value) and torch.isfinite(half[key]), key
        if ref[key] > 0:
            assert value > 0 and half[key] > 0, key
        if name in BF16_EXACT:
            assert value.item() == pytest.approx(ref[key].item(), rel=1e-6), key
        elif name in BF16_ADAPTER:
            assert value.item() == pytest.approx(ref[key].item(), rel=5e-2), key


def to_bf16(out: ModelOutput) -> ModelOutput:
    return ModelOutput(
        logits=out.logits.bfloat16(),
        feats=[f.bfloat16() for f in out.feats],
        preact=[p.bfloat16() for p in out.preact],
        pooled=out.pooled.bfloat16(),
    )


def golden_module(name: str):
    """The method's own test module: it holds ``golden_values()``, the cases behind tests/golden/<name>.json."""
    return importlib.import_module(f"tests.test_method_{name}")


def test_every_method_with_its_own_loss_has_golden_values():
    own = {discover()[n].cls.__module__.rsplit(".", 1)[-1] for n in DISTILLERS} - {"kd"}
    assert own <= {p.stem for p in GOLDEN_DIR.glob("*.json")}


@pytest.mark.parametrize("name", GOLDEN)
def test_golden_values(name):
    expected = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    got = golden_module(name).golden_values()
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


def regenerate_golden(names: list[str]) -> None:
    """Write tests/golden/<name>.json from the method's ``golden_values()`` (only after a deliberate change)."""
    for name in names:
        path = GOLDEN_DIR / f"{name}.json"
        path.write_text(json.dumps(golden_module(name).golden_values(), indent=2, sort_keys=True) + "\n")
        print(f"wrote {path}")


def test_progress_is_frozen():
    import dataclasses

    from kdbench.method import Progress

    p = Progress(epoch=1, epochs=4, step=5, steps=10)
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.epoch = 2


def test_method_groups(tiny_toml):
    from kdbench.sweep import MODERN

    def methods(group: str) -> list[str]:
        return [s.method for s in expand(load_bench(tiny_toml), Request([group], ["tiny"]))]

    mission = list(MISSION)
    builtin_all = [n for n in methods("all") if discover()[n].builtin]
    assert builtin_all == mission, "--methods all keeps meaning the mission's methods and variants"
    assert methods("modern") == MODERN
    assert set(methods("everything")) == set(methods("all")) | set(MODERN)
    assert methods("modern,kd") == MODERN + ["kd"]


CRD_PAIRS = [
    "wrn_40_2:wrn_16_2",
    "wrn_40_2:wrn_40_1",
    "resnet56:resnet20",
    "resnet110:resnet20",
    "resnet110:resnet32",
    "resnet32x4:resnet8x4",
    "vgg13:vgg8",
    "vgg13:mobilenetv2",
    "resnet50:mobilenetv2",
    "resnet50:vgg8",
    "resnet32x4:shufflenetv1",
    "resnet32x4:shufflenetv2",
    "wrn_40_2:shufflenetv1",
]


@pytest.mark.parametrize("pair", CRD_PAIRS)
def test_modern_methods_apply_to_every_crd_pair(pair):
    from kdbench.method import MethodContext, make_config, resolve
    from kdbench.sweep import MODERN

    t_arch, s_arch = pair.split(":")
    teacher = create_model(t_arch, num_classes=100)  # real weights: OFD reads its BN statistics
    with torch.device("meta"):
        student = create_model(s_arch, num_classes=100)
    ctx = MethodContext(
        student=student.feature_info,
        teacher=teacher.feature_info,
        num_classes=100,
        num_train=8,
        train_labels=torch.arange(8) % 2,
        image_size=32,
        student_arch=s_arch,
        teacher_arch=t_arch,
        student_head=student.head,
        teacher_head=teacher.head,
        teacher_preact_bn=_preact_bn(teacher),
    )
    for name in MODERN:
        entry = resolve(name)
        cfg = make_config(entry)
        assert entry.cls.not_applicable(cfg, ctx) is None, (name, pair)
        with torch.device("meta"):
            entry.cls(cfg, ctx)


if __name__ == "__main__":  # regenerate golden values: python -m tests.test_methods_common [method ...]
    regenerate_golden(sys.argv[1:] or GOLDEN)
