"""CUDA-readiness without a GPU: the harness's device placement checked under PyTorch's ``FakeTensorMode``.

Inside the mode, tensors created on ``cuda`` are fake (shapes, dtypes and devices, no data), and an operation that
mixes devices raises ``FakeTensorDeviceMismatchError`` exactly where a real GPU run would fail. Every registered
method (parametrised over the registry: a method is covered the moment it is registered) is built for a CUDA
student and teacher and runs its forward-side work: the teacher's and the student's forward, the loss terms
(negative sampling, memory-bank and queue updates included), an init stage's loss, an optimizer step (on synthetic
gradients: ``backward()`` needs a CUDA context that a machine without a GPU cannot create), evaluation's forward and
the assembly of a checkpoint. Two more properties come with the mode:

- a random draw whose generator lives on another device than the tensor it makes fails on a real GPU but not under
  the fake mode, so ``GeneratorCheck`` (a ``TorchFunctionMode``) raises on it; the method's CUDA generator, which
  cannot be constructed without a CUDA driver, is stood in for by a CPU generator that reports ``cuda``;
- reading a device value back to the host (``.item()``, ``float(t)``, ``if t:``) has no data to read and raises, so
  these steps are also proven free of host synchronisations (they would stall a GPU's queue every step).

What this cannot prove (see the README, "Running on a GPU"): kernels, numerics and speed; bf16 autocast on CUDA (the
fake mode runs CUDA autocast regions in fp32; bf16 is tested on the CPU instead); the backward pass; torch.compile
for CUDA; writing a checkpoint of fake tensors (they cannot be pickled).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError, FakeTensorMode, unset_fake_temporarily
from torch.overrides import TorchFunctionMode

from kdbench import train
from kdbench.config import load_bench
from kdbench.evaluate import predict
from kdbench.method import discover
from kdbench.models import create_model
from kdbench.sweep import Request, expand, method_order

CUDA = torch.device("cuda", 0)
METHODS = method_order([n for n, e in discover().items() if e.ok])  # every registered method


class CudaGenerator(torch.Generator):
    """A CPU generator that says it is on ``cuda:0``: the stand-in for a CUDA generator under the fake mode."""

    @property
    def device(self) -> torch.device:
        return CUDA


class GeneratorCheck(TorchFunctionMode):
    """Raises when a random draw's generator is on another device type than the tensor it returns."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        gen = kwargs.get("generator")
        if isinstance(gen, torch.Generator) and isinstance(out, torch.Tensor) and out.device.type != gen.device.type:
            raise RuntimeError(
                f"{getattr(func, '__name__', func)}: a {gen.device.type} generator drew a "
                f"{out.device.type} tensor (fails on a real GPU)"
            )
        return out


def _real(fn):
    """``fn`` run outside the fake mode: modules are built as real CPU tensors, as the harness builds them (seeded on
    the CPU), and then moved to the fake device by the harness's own ``.to(device)`` (moving a module of fake CPU
    tensors is not possible: their weak references block the parameter swap)."""

    def wrapped(*args, **kwargs):
        with unset_fake_temporarily():
            return fn(*args, **kwargs)

    return wrapped


@pytest.fixture
def fake_cuda(monkeypatch):
    monkeypatch.setattr(
        train,
        "new_generator",
        lambda device: CudaGenerator() if torch.device(device).type == "cuda" else torch.Generator(device=device),
    )
    monkeypatch.setattr(train, "create_model", _real(train.create_model))
    real_resolve = train.resolve

    def resolve(name):
        entry = real_resolve(name)
        cls = entry.cls

        class BuiltOutsideTheFakeMode(cls):
            def __new__(klass, *args, **kwargs):  # an instance of cls itself, so __init__ is not run twice
                return _real(cls)(*args, **kwargs)

        return dataclasses.replace(entry, cls=BuiltOutsideTheFakeMode)

    monkeypatch.setattr(train, "resolve", resolve)
    with FakeTensorMode(allow_non_fake_inputs=True), GeneratorCheck():
        yield CUDA


def _on_cuda(tensors, what: str) -> None:
    for name, t in tensors:
        assert t.device.type == "cuda", f"{what} {name} is on {t.device}"


def _outputs_on_cuda(out, what: str) -> None:
    _on_cuda([("logits", out.logits), ("pooled", out.pooled)], what)
    _on_cuda([(f"feats[{i}]", f) for i, f in enumerate(out.feats)], what)
    _on_cuda([(f"preact[{i}]", f) for i, f in enumerate(out.preact or [])], what)


# ---------------------------------------------------------------------------------------------- the checks work


def test_the_fake_mode_catches_what_a_gpu_would_reject(fake_cuda):
    x = torch.zeros(4, 10, device="cuda")
    with pytest.raises(FakeTensorDeviceMismatchError):
        x + torch.ones(4, 10)  # a CPU tensor in a CUDA op
    with pytest.raises(RuntimeError, match="cpu generator drew a cuda"):
        torch.rand(3, device="cuda", generator=torch.Generator())
    with pytest.raises(RuntimeError, match="cuda generator drew a cpu"):
        torch.randperm(5, generator=CudaGenerator())
    memory = torch.zeros(10, 4, device="cuda")
    with pytest.raises(RuntimeError, match="same device"):
        memory.index_copy_(0, torch.tensor([1, 2]), torch.ones(2, 4, device="cuda"))  # a CPU index
    with pytest.raises(Exception, match="_local_scalar_dense"):
        float(memory.sum())  # a host read: no data under the fake mode


def test_fake_checkpoints_cannot_be_written(fake_cuda, tmp_path):
    """Writing fake tensors is not possible (they cannot be pickled): checkpoints are checked up to their assembly."""
    with pytest.raises(Exception):  # noqa: B017 - pickling fails with whatever the fake tensor's internals raise
        torch.save({"w": torch.zeros(3, device="cuda")}, tmp_path / "x.pt")


# ---------------------------------------------------------------------------------------------- the loader


@pytest.mark.parametrize("channels_last", [False, True])
def test_loader_batches_stay_on_the_device(tiny_data, fake_cuda, channels_last):
    loader = tiny_data.train_loader(32, device=fake_cuda, seed=3)
    assert loader.images.device.type == "cuda" and loader.mean.device.type == "cuda"
    n = 0
    for batch in loader.epoch(1):
        batch = train._batch_for(batch, channels_last)
        _on_cuda([("images", batch.images), ("labels", batch.labels), ("index", batch.index)], "train batch")
        assert batch.images.dtype == torch.float32
        n += batch.images.shape[0]
    assert n == len(tiny_data.train_labels)
    test = list(tiny_data.test_loader(20, device=fake_cuda).epoch(0))
    assert sum(b.images.shape[0] for b in test) == len(tiny_data.test_labels)
    for b in test:
        _on_cuda([("images", b.images), ("labels", b.labels), ("index", b.index)], "test batch")


# ---------------------------------------------------------------------------------------------- every method


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    from tests.conftest import TINY_TOML

    path = tmp_path_factory.mktemp("fake") / "bench.toml"
    path.write_text(TINY_TOML)
    return {s.method: s for s in expand(load_bench(path), Request(METHODS, ["tiny"]))}


@pytest.mark.parametrize("name", METHODS)
def test_method_forward_side_work_stays_on_the_device(name, specs, tiny_data, fake_cuda, monkeypatch):
    spec = specs[name]
    teacher = None
    if spec.teacher is not None:
        teacher = _real(create_model)(spec.teacher.arch, num_classes=tiny_data.num_classes).to(fake_cuda).eval()
        teacher.requires_grad_(False)
    with unset_fake_temporarily():
        reason = train.not_applicable_reason(spec, tiny_data, teacher)
    if reason is not None:
        pytest.skip(f"{name} does not apply to the test pair")
    m = train.build_member(spec, tiny_data, teacher, fake_cuda)
    _on_cuda(m.student.state_dict().items(), "student")
    _on_cuda(m.method.state_dict().items(), "method")
    _on_cuda(m.method.named_buffers(), "method buffer")  # non-persistent ones too (e.g. the sampler's labels)
    assert m.method.rng is not None and m.method.rng.device.type == "cuda"

    loader = tiny_data.train_loader(spec.protocol.batch_size, device=fake_cuda, seed=1)
    batches = list(loader.epoch(0))[:2]

    stage = m.method.init_stage(m.student)
    if stage is not None:
        batch = batches[0]
        t_out = train.teacher_outputs(teacher, batch.images, m.preact)
        s_out = m.student(batch.images, preact=m.preact) if stage.needs_student else None
        terms = stage.loss(s_out, t_out, batch)
        assert terms
        _on_cuda(terms.items(), "init-stage term")

    m.student.train()
    m.method.train()
    for batch in batches:  # two steps: the first sets CRD's Z and fills RRD's queue, the second reads them
        t_out = train.teacher_outputs(teacher, batch.images, m.preact)
        if t_out is not None:
            _outputs_on_cuda(t_out, "teacher output")
        s_out = m.student(batch.images, preact=m.preact)
        _outputs_on_cuda(s_out, "student output")
        terms = train.main_terms(m, s_out, t_out, batch)
        assert terms
        _on_cuda(terms.items(), "loss term")
        total = sum(terms.values())
        assert total.device.type == "cuda" and total.dim() == 0
        # backward() needs a CUDA context: step the optimizer on synthetic gradients instead.
        m.optimizer.zero_grad(set_to_none=True)
        for group in m.optimizer.param_groups:
            for p in group["params"]:
                p.grad = torch.full_like(p, 1e-3)
        m.optimizer.step()
        _on_cuda(m.method.named_buffers(), "method buffer after a step")
    for p, state in m.optimizer.state.items():
        _on_cuda([("param", p)] + [(k, v) for k, v in state.items() if isinstance(v, torch.Tensor)], "optimizer")

    logits, pooled, labels = predict(m.evaluated, tiny_data.test_loader(64, device=fake_cuda).epoch(0))
    _on_cuda([("logits", logits), ("pooled", pooled), ("labels", labels)], "evaluation")
    assert logits.shape == (len(tiny_data.test_labels), tiny_data.num_classes)

    saved = {}
    monkeypatch.setattr(train, "atomic_torch_save", lambda path, state: saved.update(state))
    m.checkpoint_path = "unused"
    train.save_checkpoint(m)
    assert saved["rng"].device.type == "cpu" and saved["rng"].dtype == torch.uint8  # generator state: host bytes
    _on_cuda(saved["student"].items(), "checkpointed student")
