"""Training-level fidelity: kdbench's own training step, in float64, against a plain re-implementation of the
reference loop (RepDistiller's ``train_distill`` and ``helper/pretrain.py``), written here from the published
protocol (shared/reference/methods.md), never copied from the authors' code.

kdbench side: the harness's real functions in the order the sweep calls them (``build_member``, ``run_init_stage``,
``train_cohort``), the teacher held by ``freeze`` as the teacher store holds it. Reference side: SGD written out
(momentum 0.9, weight decay 5e-4 on every trainable parameter, BN included), the learning rate set at the start of
each 1-based epoch to lr * 0.1^(number of milestones passed), the student and the method's modules in train mode,
the teacher in eval mode under no_grad, loss = gamma CE + alpha KD + beta L_method, and AB's init stage
(student in eval mode but its feature layers and the connectors in train mode, constant lr, its own SGD).

Both sides start from the same weights (the reference loads kdbench's freshly built student and method modules),
the same teacher (two copies of one) and the same batches: kdbench's own loaders' batches, cast to float64 and
recorded as the harness draws them, are replayed to the reference. CRD's negatives are kdbench's own sampled indices
(recorded from ``sample_contrast``), fed to the reference's contrast step. After every step both sides' loss, logits,
every parameter, BN running statistics, momentum buffers, method buffers (CRD's memory banks and Z) and the teacher's
state are compared: they agree to ~1e-14. The mutation tests change one detail of kdbench's step and check that the
comparison then fails, so this test keeps its power.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import kdbench.train as harness
from kdbench.config import DataSpec, Protocol, RunSpec, TeacherSpec
from kdbench.data import Batch, load_dataset
from kdbench.models import create_model, freeze
from kdbench.train import Member, build_member, run_init_stage, train_cohort

CPU = torch.device("cpu")
TOL = 1e-10  # float64: the two codes order the same maths differently, so they agree to ~1e-14, not bit for bit
DIVERGED = 1e-6  # a changed detail of the step moves some state by far more than this within the run
STUDENT, TEACHER = "resnet8", "resnet8x4"  # the teacher is wider: AB's connectors and FitNet's regressor are convs
DATA_OPTIONS = {"num_classes": 4, "train_size": 30, "test_size": 8, "seed": 0}  # batches of 8, 8, 8 and 6
IMAGE_SIZE = 8
# 3 epochs of 4 steps, the lr decayed after epochs 1 and 2 (0.05, 0.005, 0.0005); AB's init stage takes 2 epochs.
PROTOCOL = Protocol(
    name="lockstep",
    epochs=3,
    batch_size=8,
    lr=0.05,
    lr_small=0.01,
    small_lr_students=(),
    momentum=0.9,
    weight_decay=5e-4,
    milestones=(1, 2),
    lr_decay=0.1,
    init_epochs=2,
)
# The published protocol, as the reference loop below uses it (not read from kdbench's Protocol).
REF_LR, REF_MOMENTUM, REF_WD, REF_MILESTONES, REF_EPOCHS, REF_INIT_EPOCHS = 0.05, 0.9, 5e-4, (1, 2), 3, 2


@contextlib.contextmanager
def float64() -> Iterator[None]:
    """Build models and method state in float64 (kdbench builds them in the default dtype)."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


# ---------------------------------------------------------------------------------------------- data and teacher


class RecordingLoader:
    """A kdbench loader whose batches come out as float64 images and are recorded as they are drawn."""

    def __init__(self, loader: Any, record: list[list[Batch]] | None):
        self.loader, self.record = loader, record

    def __len__(self) -> int:
        return len(self.loader)

    def epoch(self, e: int = 0) -> Iterator[Batch]:
        served: list[Batch] = []
        if self.record is not None:
            self.record.append(served)
        for b in self.loader.epoch(e):
            batch = Batch(b.images.double(), b.labels, b.index)
            served.append(batch)
            yield batch


class Float64Data:
    """kdbench's data set as the harness sees it, with float64 batches; ``passes`` records every pass over the
    training split (init-stage epochs, then main-stage epochs) so that the reference replays the same batches."""

    def __init__(self, data: Any):
        self.data = data
        self.passes: list[list[Batch]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.data, name)

    def train_loader(self, *args: Any, **kwargs: Any) -> RecordingLoader:
        return RecordingLoader(self.data.train_loader(*args, **kwargs), self.passes)

    def test_loader(self, *args: Any, **kwargs: Any) -> RecordingLoader:
        return RecordingLoader(self.data.test_loader(*args, **kwargs), None)


@functools.cache
def dataset() -> Any:
    return load_dataset("synthetic", None, image_size=IMAGE_SIZE, **DATA_OPTIONS)


@functools.cache
def teacher_weights() -> dict[str, torch.Tensor]:
    """A float64 teacher with non-trivial BN running statistics (eval and train mode then differ a lot)."""
    with float64(), torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        model = create_model(TEACHER, num_classes=dataset().num_classes)
        model.train()
        with torch.no_grad():
            for b in Float64Data(dataset()).train_loader(8, seed=5).epoch(0):
                model(b.images)
    return copy.deepcopy(model.state_dict())


def make_teacher() -> nn.Module:
    with float64():
        model = create_model(TEACHER, num_classes=dataset().num_classes)
    model.load_state_dict(teacher_weights())
    return freeze(model, CPU)  # as the teacher store holds a teacher: eval mode, no gradients


def spec(method: str) -> RunSpec:
    data = DataSpec("synthetic", image_size=IMAGE_SIZE, options=tuple(sorted(DATA_OPTIONS.items())))
    return RunSpec(STUDENT, method, {}, 0, PROTOCOL, data, TeacherSpec(TEACHER, data, PROTOCOL, 0))


# ---------------------------------------------------------------------------------------------- traces


@dataclass
class Step:
    stage: str  # "init" or "main"
    loss: torch.Tensor
    logits: torch.Tensor | None  # main stage only
    state: dict[str, torch.Tensor]  # after the step


@dataclass
class Trace:
    steps: list[Step] = field(default_factory=list)
    lrs: list[float] = field(default_factory=list)  # per main-stage epoch


def snapshot(
    student: nn.Module, method: nn.Module, momentum: dict[str, torch.Tensor], teacher: nn.Module
) -> dict[str, torch.Tensor]:
    """Every parameter and buffer of the student, the method and the teacher, and the momentum buffers."""
    out = {f"student.{k}": v.detach().clone() for k, v in student.state_dict().items()}
    out.update({f"method.{k}": v.detach().clone() for k, v in method.state_dict().items()})
    out.update({f"teacher.{k}": v.detach().clone() for k, v in teacher.state_dict().items()})
    out.update({f"momentum.{k}": v.detach().clone() for k, v in momentum.items()})
    return out


def keep_logits(store: dict[int, torch.Tensor], key: int) -> Callable[..., None]:
    """A forward hook keeping the model's latest logits under ``key``."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        store[key] = out.logits.detach().clone()

    return hook


@dataclass
class KdbenchRun:
    """kdbench's harness trained on one cohort, recording each member's steps and what the reference must replay."""

    traces: dict[str, Trace]
    starts: dict[str, dict[str, dict[str, torch.Tensor]]]  # method -> {"student": ..., "method": ...}
    passes: list[list[Batch]]
    contrast: dict[str, list[torch.Tensor]]  # method -> the negatives kdbench sampled, step by step
    members: list[Member]


def run_kdbench(methods: list[str], mutate: Callable[[list[Member], nn.Module], None] | None = None) -> KdbenchRun:
    """The sweep's order (``Sweep._run_cohort``): build every member, run each one's init stage, train the cohort."""
    data = Float64Data(dataset())
    teacher = make_teacher()
    with float64():
        members = [build_member(spec(name), data, teacher, CPU) for name in methods]
    starts = {
        m.spec.method: {
            "student": copy.deepcopy(m.student.state_dict()),
            "method": copy.deepcopy(m.method.state_dict()),
        }
        for m in members
    }
    if mutate is not None:
        mutate(members, teacher)
    traces = {m.spec.method: Trace() for m in members}
    contrast: dict[str, list[torch.Tensor]] = {m.spec.method: [] for m in members}
    owner: dict[int, Member] = {}
    names: dict[int, str] = {}
    logits: dict[int, torch.Tensor] = {}
    for m in members:
        for prefix, mod in (("student", m.student), ("method", m.method)):
            for n, p in mod.named_parameters():
                owner[id(p)], names[id(p)] = m, f"{prefix}.{n}"
        m.student.register_forward_hook(keep_logits(logits, id(m)), with_kwargs=True)
        if hasattr(m.method, "sample_contrast"):
            sample = m.method.sample_contrast

            def recorded(index: torch.Tensor, sample=sample, seen=contrast[m.spec.method]) -> torch.Tensor:
                idx = sample(index)
                seen.append(idx.clone())
                return idx

            m.method.sample_contrast = recorded
    real_step = harness.optimizer_step

    def recording_step(optimizer: torch.optim.Optimizer, terms: dict[str, torch.Tensor], sums: dict) -> None:
        m = owner[id(optimizer.param_groups[0]["params"][0])]
        stage = "main" if optimizer is m.optimizer else "init"
        loss = sum(terms.values()).detach().clone()
        real_step(optimizer, terms, sums)
        momentum = {
            names[id(p)]: optimizer.state[p]["momentum_buffer"]
            for g in optimizer.param_groups
            for p in g["params"]
            if "momentum_buffer" in optimizer.state.get(p, {})
        }
        traces[m.spec.method].steps.append(
            Step(
                stage,
                loss,
                logits[id(m)] if stage == "main" else None,
                snapshot(m.student, m.method, momentum, teacher),
            )
        )

    harness.optimizer_step = recording_step
    try:
        for m in members:
            run_init_stage(m, data, teacher, CPU, save=False)
        train_cohort(members, data, teacher, CPU, save=False)
    finally:
        harness.optimizer_step = real_step
    for m in members:
        assert m.failed is None, m.failed
        traces[m.spec.method].lrs = list(m.curve["lr"])
    return KdbenchRun(traces, starts, data.passes, contrast, members)


@functools.cache
def solo(method: str) -> KdbenchRun:
    return run_kdbench([method])


# ---------------------------------------------------------------------------------------------- the reference loop


class PlainSGD:
    """SGD as the protocol states it, per parameter: d = grad + wd * p; buf = d on the first step, else
    momentum * buf + d; p -= lr * buf. Parameters without a gradient are left alone."""

    def __init__(self, params: dict[str, nn.Parameter], lr: float):
        self.params, self.lr, self.buf = params, lr, {}

    def zero_grad(self) -> None:
        for p in self.params.values():
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for name, p in self.params.items():
            if p.grad is None:
                continue
            d = p.grad + REF_WD * p
            self.buf[name] = d.clone() if name not in self.buf else self.buf[name] * REF_MOMENTUM + d
            p -= self.lr * self.buf[name]


def ref_kl(logit_s: torch.Tensor, logit_t: torch.Tensor, temperature: float) -> torch.Tensor:
    """Hinton's term: sum_b KL(softmax(t/T) || softmax(s/T)) * T^2 / B."""
    log_p_s = F.log_softmax(logit_s / temperature, dim=1)
    p_t = F.softmax(logit_t / temperature, dim=1)
    return (p_t * (torch.log(p_t) - log_p_s)).sum() * temperature**2 / logit_s.shape[0]


class RefMethod(nn.Module):
    """A method as the reference loop sees it: weights (gamma, alpha, beta), its trainable modules (the module's own
    parameters), the main-stage term and, for AB, the init-stage loss. Module names follow kdbench's method state, so
    the start weights load by name (strictly: the structures must match) and the states compare by name."""

    gamma, alpha, beta, temperature = 1.0, 0.0, 0.0, 4.0
    preact = False

    def term(self, s_out: Any, t_out: Any, batch: Batch, step: int) -> torch.Tensor:
        return torch.zeros(())

    def init_loss(self, s_out: Any, t_out: Any) -> torch.Tensor | None:
        return None

    def state(self) -> dict[str, torch.Tensor]:
        return self.state_dict()

    def main_parameters(self) -> dict[str, nn.Parameter]:
        """What the main stage trains besides the student (extra modules are optimised with it)."""
        return {f"method.{k}": p for k, p in self.named_parameters()}


class RefKD(RefMethod):
    gamma, alpha = 0.1, 0.9


class RefFitNet(RefMethod):
    """A 1x1 conv (equal map sizes here) with a bias, BN, ReLU, from the student's hint map (feats[2]) onto the
    teacher's; beta * MSE."""

    beta = 100.0

    def __init__(self, s_channels: int, t_channels: int):
        super().__init__()
        self.regressor = nn.Sequential(nn.Conv2d(s_channels, t_channels, 1), nn.BatchNorm2d(t_channels), nn.ReLU())

    def term(self, s_out: Any, t_out: Any, batch: Batch, step: int) -> torch.Tensor:
        return ((self.regressor(s_out.feats[2]) - t_out.feats[2]) ** 2).mean()


class RefAB(RefMethod):
    """Init stage: per pre-ReLU block-group output l (n = 3 of them), a bias-free 1x1 conv + BN connector and
    2^(l-n+1) * sum of the margin-1 squared hinge / B / 1000 * 3. Main stage: CE alone; connectors not trained."""

    preact = True

    def __init__(self, s_channels: tuple[int, ...], t_channels: tuple[int, ...]):
        super().__init__()
        self.connectors = nn.ModuleList(
            nn.Sequential(nn.Conv2d(s, t, 1, bias=False), nn.BatchNorm2d(t)) for s, t in zip(s_channels, t_channels)
        )

    def init_loss(self, s_out: Any, t_out: Any) -> torch.Tensor:
        n, total = len(self.connectors), torch.zeros(())
        for i, (conn, s, t) in enumerate(zip(self.connectors, s_out.preact[1:], t_out.preact[1:])):
            src = conn(s)
            hinge = (src + 1.0) ** 2 * ((src > -1.0) & (t <= 0)) + (src - 1.0) ** 2 * ((src <= 1.0) & (t > 0))
            total = total + 2.0 ** (i - n + 1) * hinge.sum() / src.shape[0] / 1000 * 3
        return total

    def main_parameters(self) -> dict[str, nn.Parameter]:
        return {}  # the main stage trains the student alone

    def init_parameters(self) -> dict[str, nn.Parameter]:
        return {f"method.{k}": p for k, p in self.named_parameters()}


class RefEmbed(nn.Module):
    """Linear map, then each row divided by its L2 norm."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = self.linear(x.view(x.shape[0], -1))
        return v / v.pow(2).sum(1, keepdim=True).sqrt()


class RefCRD(RefMethod):
    """CRD's contrast step as the paper and its code describe it: the rows of each memory at [own index, negatives]
    are gathered, scored against the other side's embedding (exp(<v, m> / 0.07)), divided by Z (mean score * N,
    fixed on the first batch), NCE loss in both directions; then the batch's rows of each memory become
    normalize(0.5 * row + 0.5 * v). The negatives are kdbench's own draws, fed in step by step."""

    beta = 0.8
    nce_t, nce_m, eps = 0.07, 0.5, 1e-7

    def __init__(self, s_dim: int, t_dim: int, n_data: int, negatives: list[torch.Tensor], feat_dim: int = 128):
        super().__init__()
        self.embed_s, self.embed_t = RefEmbed(s_dim, feat_dim), RefEmbed(t_dim, feat_dim)
        self.register_buffer("memory_s", torch.zeros(n_data, feat_dim))
        self.register_buffer("memory_t", torch.zeros(n_data, feat_dim))
        self.n_data, self.negatives, self.z = n_data, negatives, [-1.0, -1.0]

    def load_state_dict(self, state: dict[str, torch.Tensor], strict: bool = True) -> Any:
        state = dict(state)
        self.z = [float(v) for v in state.pop("nce_z")]
        return super().load_state_dict(state, strict=strict)

    def state(self) -> dict[str, torch.Tensor]:
        return {**self.state_dict(), "nce_z": torch.tensor(self.z, dtype=torch.float64)}

    def _scores(self, memory: torch.Tensor, idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        rows = memory.index_select(0, idx.view(-1)).view(idx.shape[0], idx.shape[1], -1)
        return torch.exp(torch.bmm(rows, v.unsqueeze(2)).squeeze(2) / self.nce_t)

    def _nce(self, x: torch.Tensor) -> torch.Tensor:
        m = x.shape[1] - 1
        noise = m / self.n_data
        log_d1 = torch.log(x[:, 0] / (x[:, 0] + noise + self.eps))
        log_d0 = torch.log(noise / (x[:, 1:] + noise + self.eps))
        return -(log_d1.sum() + log_d0.sum()) / x.shape[0]

    def term(self, s_out: Any, t_out: Any, batch: Batch, step: int) -> torch.Tensor:
        v_s, v_t = self.embed_s(s_out.pooled), self.embed_t(t_out.pooled)
        idx = self.negatives[step]
        assert torch.equal(idx[:, 0], batch.index)  # the positive is the sample itself
        out_s = self._scores(self.memory_t, idx, v_s)  # student anchor against the teacher's memory
        out_t = self._scores(self.memory_s, idx, v_t)
        for i, out in enumerate((out_s, out_t)):
            if self.z[i] < 0:
                self.z[i] = (out.mean() * self.n_data).item()
        loss = self._nce(out_s / self.z[0]) + self._nce(out_t / self.z[1])
        with torch.no_grad():
            for memory, v in ((self.memory_s, v_s), (self.memory_t, v_t)):
                rows = memory.index_select(0, batch.index) * self.nce_m + v * (1 - self.nce_m)
                memory.index_copy_(0, batch.index, rows / rows.pow(2).sum(1, keepdim=True).sqrt())
        return loss


def ref_method(name: str, run: KdbenchRun) -> RefMethod:
    s, t = create_model(STUDENT, num_classes=4).feature_info, create_model(TEACHER, num_classes=4).feature_info
    if name == "kd":
        return RefKD()
    if name == "fitnet":
        return RefFitNet(s.channels[2], t.channels[2])
    if name == "ab":
        return RefAB(s.channels[1:], t.channels[1:])
    if name == "crd":
        return RefCRD(s.pooled_dim, t.pooled_dim, DATA_OPTIONS["train_size"], run.contrast["crd"])
    raise AssertionError(name)


def run_reference(name: str, run: KdbenchRun) -> Trace:
    """RepDistiller's loop, written from the protocol, on kdbench's start weights, teacher and batches."""
    with float64():
        student = create_model(STUDENT, num_classes=dataset().num_classes)
        method = ref_method(name, run)
    student.load_state_dict(run.starts[name]["student"])
    method.load_state_dict(run.starts[name]["method"])
    teacher = create_model(TEACHER, num_classes=dataset().num_classes).double()
    teacher.load_state_dict(teacher_weights())
    teacher.eval()
    trace = Trace()
    passes = iter(run.passes)

    def forward(x: torch.Tensor) -> tuple[Any, Any]:
        s_out = student(x, preact=method.preact)
        with torch.no_grad():
            t_out = teacher(x, preact=method.preact)
        return s_out, t_out

    def record(stage: str, loss: torch.Tensor, logits: torch.Tensor | None, opt: PlainSGD) -> None:
        state = {f"student.{k}": v.detach().clone() for k, v in student.state_dict().items()}
        state.update({f"method.{k}": v.detach().clone() for k, v in method.state().items()})
        state.update({f"teacher.{k}": v.detach().clone() for k, v in teacher.state_dict().items()})
        state.update({f"momentum.{k}": v.clone() for k, v in opt.buf.items()})
        trace.steps.append(Step(stage, loss.detach().clone(), logits, state))

    if isinstance(method, RefAB):  # helper/pretrain.py: the student's feature layers and the connectors, lr constant
        feature = {f"student.{k}": p for k, p in student.named_parameters() if not k.startswith("fc.")}
        opt = PlainSGD({**method.init_parameters(), **feature}, REF_LR)
        for _ in range(REF_INIT_EPOCHS):
            student.eval()
            teacher.eval()
            for mod in (*[m for n, m in student.named_children() if n != "fc"], method):
                mod.train()
            for batch in next(passes):
                s_out, t_out = forward(batch.images)
                loss = method.init_loss(s_out, t_out)
                opt.zero_grad()
                loss.backward()
                opt.step()
                record("init", loss, None, opt)

    params = {f"student.{k}": p for k, p in student.named_parameters()}
    params.update(method.main_parameters())
    opt = PlainSGD(params, REF_LR)
    step = 0
    for epoch in range(1, REF_EPOCHS + 1):
        opt.lr = REF_LR * 0.1 ** sum(epoch > m for m in REF_MILESTONES)
        trace.lrs.append(opt.lr)
        student.train()
        method.train()
        teacher.eval()
        for batch in next(passes):
            s_out, t_out = forward(batch.images)
            loss = method.gamma * F.cross_entropy(s_out.logits, batch.labels)
            loss = loss + method.alpha * ref_kl(s_out.logits, t_out.logits, method.temperature)
            loss = loss + method.beta * method.term(s_out, t_out, batch, step)
            opt.zero_grad()
            loss.backward()
            opt.step()
            record("main", loss, s_out.logits.detach().clone(), opt)
            step += 1
    assert next(passes, None) is None, "kdbench drew more passes over the data than the reference replayed"
    return trace


# ---------------------------------------------------------------------------------------------- comparison


def gap(a: Trace, b: Trace, skip: str = "\0") -> tuple[float, str]:
    """The largest absolute difference between two traces (loss, logits, every state entry, step by step) and
    where it is, leaving out the state entries whose name starts with ``skip``. Both must have the same steps,
    stages and state entries."""
    assert [s.stage for s in a.steps] == [s.stage for s in b.steps]
    worst, where = 0.0, "nowhere"
    for i, (x, y) in enumerate(zip(a.steps, b.steps)):
        assert x.state.keys() == y.state.keys(), f"step {i}: {sorted(x.state.keys() ^ y.state.keys())}"
        pairs = [("loss", x.loss, y.loss), *((k, x.state[k], y.state[k]) for k in x.state if not k.startswith(skip))]
        if x.logits is not None or y.logits is not None:
            pairs.append(("logits", x.logits, y.logits))
        for key, u, v in pairs:
            assert u.dtype == v.dtype and u.shape == v.shape, (i, key, u.dtype, v.dtype, u.shape, v.shape)
            d = (u.double() - v.double()).abs().max().item() if u.numel() else 0.0
            if not d <= worst:  # NaN counts as the worst
                worst, where = d, f"{x.stage} step {i}: {key}"
    return worst, where


def assert_lockstep(name: str, run: KdbenchRun) -> None:
    ref = run_reference(name, run)
    got = run.traces[name]
    assert got.lrs == ref.lrs  # the same expression on both sides: bit for bit
    d, where = gap(got, ref)
    assert d < TOL, f"kdbench's {name} step departs from the reference loop by {d:.3g} ({where})"


# ---------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("method", ["kd", "fitnet", "ab", "crd"])
def test_kdbench_step_equals_reference_loop(method: str) -> None:
    run = solo(method)
    steps = run.traces[method].steps
    assert [s.stage for s in steps].count("main") == 12  # 3 epochs of 4 batches
    assert [s.stage for s in steps].count("init") == (8 if method == "ab" else 0)
    assert steps[0].loss.dtype == torch.float64 and steps[-1].state["student.fc.weight"].dtype == torch.float64
    assert_lockstep(method, run)


def test_crd_negatives_and_banks_are_exercised() -> None:
    """The CRD comparison covers a real contrast step: negatives of other classes, banks that move, Z set once."""
    run = solo("crd")
    labels = dataset().train_labels
    for idx in run.contrast["crd"]:
        assert idx.shape[1] > 10
        assert (labels[idx[:, 1:]] != labels[idx[:, :1]]).all()
    first, last = run.traces["crd"].steps[0].state, run.traces["crd"].steps[-1].state
    assert (first["method.nce_z"] > 0).all() and torch.equal(first["method.nce_z"], last["method.nce_z"])
    assert not torch.equal(first["method.memory_s"], last["method.memory_s"])


@pytest.mark.slow  # a cohort of four on top of the four solo runs: seconds of CPU
def test_cohort_equals_solo_exactly() -> None:
    """Four methods trained side by side (one teacher forward per batch, shared batches) give, step by step and
    bit for bit, what each gives alone (and so what the reference loop gives)."""
    methods = ["kd", "fitnet", "ab", "crd"]
    cohort = run_kdbench(methods)
    for name in methods:
        alone = solo(name).traces[name]
        together = cohort.traces[name]
        assert together.lrs == alone.lrs
        assert len(together.steps) == len(alone.steps)
        for x, y in zip(together.steps, alone.steps):
            assert x.stage == y.stage and torch.equal(x.loss, y.loss)
            assert (x.logits is None) == (y.logits is None) and (x.logits is None or torch.equal(x.logits, y.logits))
            assert x.state.keys() == y.state.keys()
            assert all(torch.equal(x.state[k], y.state[k]) for k in x.state), name


# One detail of kdbench's step changed at a time (after the members are built, before they train): the lock-step
# must then fail.


def _regroup(m: Member, no_decay: set[int]) -> None:
    """The member's optimizer with the parameters in ``no_decay`` moved to a group without weight decay."""
    (group,) = m.optimizer.param_groups
    m.optimizer.param_groups = []
    m.optimizer.add_param_group({**group, "params": [p for p in group["params"] if id(p) not in no_decay]})
    m.optimizer.add_param_group(
        {**group, "params": [p for p in group["params"] if id(p) in no_decay], "weight_decay": 0.0}
    )


def _bn_without_weight_decay(members: list[Member], teacher: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    for m in members:
        _regroup(m, {id(p) for mod in m.student.modules() if isinstance(mod, nn.BatchNorm2d) for p in mod.parameters()})


def _method_modules_without_weight_decay(
    members: list[Member], teacher: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    for m in members:
        _regroup(m, {id(p) for p in m.method.parameters()})


def _init_stage_without_weight_decay(
    members: list[Member], teacher: nn.Module, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = harness._sgd  # the main optimizers are built already: only the init stage's gets the change
    monkeypatch.setattr(
        harness,
        "_sgd",
        lambda params, spec, lr: real(
            params, dataclasses.replace(spec, protocol=dataclasses.replace(spec.protocol, weight_decay=0.0)), lr
        ),
    )


def _teacher_in_train_mode(members: list[Member], teacher: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher.eval = lambda: teacher.train()  # the harness's teacher.eval() now leaves it in train mode


def _lr_decay_one_epoch_late(members: list[Member], teacher: nn.Module, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        Protocol, "lr_at", lambda self, base, epoch: base * self.lr_decay ** sum(epoch > m for m in self.milestones)
    )


MUTATIONS: dict[str, tuple[str, Callable[[list[Member], nn.Module, pytest.MonkeyPatch], None]]] = {
    "bn-without-weight-decay": ("kd", _bn_without_weight_decay),
    "teacher-in-train-mode": ("kd", _teacher_in_train_mode),
    "lr-decay-one-epoch-late": ("kd", _lr_decay_one_epoch_late),
    "embeddings-without-weight-decay": ("crd", _method_modules_without_weight_decay),
    "init-stage-without-weight-decay": ("ab", _init_stage_without_weight_decay),
}


@pytest.mark.parametrize("mutation", list(MUTATIONS))
def test_lockstep_fails_when_one_detail_of_the_step_changes(mutation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    method, change = MUTATIONS[mutation]
    run = run_kdbench([method], mutate=lambda members, teacher: change(members, teacher, monkeypatch))
    monkeypatch.undo()
    ref = run_reference(method, run)
    d, where = gap(run.traces[method], ref, skip="teacher.")  # the student's own training diverges
    assert d > DIVERGED, f"{mutation}: the lock-step did not notice ({d:.3g} at {where})"
