"""One training loop for every method, for teachers (method ``ce``, no teacher) and students.

A *cohort* is a list of runs that share a data stream and a teacher (same data, teacher, seed, protocol): the
teacher's outputs are computed once per batch and every student steps on the same batch. A run trained alone is
a cohort of one. Each run owns its student, method, optimizer and generator, all seeded from (seed, method),
so on the CPU a run gives the same numbers alone or in a cohort.

The harness holds the method contract (``kdbench.method``): it checks ``requires_teacher`` and
``not_applicable`` before a method is built, passes the student to ``init_stage``, passes a ``Progress`` to every
main-stage ``loss`` call, and asks the models for ``preact`` only when a method that declares it will read it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from kdbench import distributed
from kdbench.config import RunSpec
from kdbench.data import Dataset
from kdbench.errors import KdbenchError
from kdbench.evaluate import evaluate
from kdbench.files import atomic_torch_save
from kdbench.losses import kd_loss, widen
from kdbench.method import Batch, Method, MethodContext, MethodEntry, Progress, make_config, resolve
from kdbench.models import ModelOutput, create_model
from kdbench.progress import method_label
from kdbench.seeds import derive_seed
from kdbench.system import environment

CHECKPOINT_FORMAT = 1
TEST_BATCH = 256


class Diverged(RuntimeError):
    pass


# ---------------------------------------------------------------------------------------------- precision, layout


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """The forward's numeric context: nothing for fp32, ``torch.autocast`` to bfloat16 for bf16.

    Under bf16 the convolutions and linear layers run in bfloat16; the losses that need fp32 (CE, KD, and every
    method's guarded maths) disable autocast or cast to float themselves. The backward pass runs outside it.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)
    raise ValueError(f"unknown precision {precision!r}")


def prepare_model(model: nn.Module, *, channels_last: bool = False, compile: bool | str = False) -> nn.Module:
    """In place: channels_last memory format and/or ``torch.compile`` of the model's forward.

    ``compile``: True compiles with the default backend (inductor); a string names another torch.compile backend
    (the tests use "aot_eager": the same graph capture and autograd, no code generation). ``nn.Module.compile``
    keeps the module and its state-dict keys (no ``_orig_mod.`` prefix), so checkpoints and weights written from a
    compiled model load into an eager one and back. Every instance of an architecture reuses the compiled graph
    (its parameters are graph inputs), so a cohort compiles each architecture once per mode (train / eval).
    """
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile and not getattr(model, "_kdbench_compiled", False):
        model.compile(**({"backend": compile} if isinstance(compile, str) else {}))
        model._kdbench_compiled = True
    return model


def prepare_input(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if channels_last and x.dim() == 4 else x


def _batch_for(batch: Batch, channels_last: bool) -> Batch:
    return dataclasses.replace(batch, images=prepare_input(batch.images, True)) if channels_last else batch


@dataclass
class Member:
    """One run inside a cohort."""

    spec: RunSpec
    student: nn.Module
    method: Method
    optimizer: torch.optim.Optimizer
    base_lr: float
    epoch: int = 0  # next epoch of the main stage to run
    init_done: int = 0  # init-stage epochs done
    curve: dict[str, Any] = field(
        default_factory=lambda: {"epoch": [], "lr": [], "loss": {}, "test_top1": [], "test_top5": [], "eval_epoch": []}
    )
    best: dict[str, Any] = field(default_factory=lambda: {"top1": -1.0, "top5": -1.0, "epoch": -1})
    last_eval: dict[str, Any] = field(default_factory=dict)
    epoch_seconds: list[float] = field(default_factory=list)
    epoch_members: list[int] = field(default_factory=list)  # members that trained in each of those epochs
    init_seconds: float = 0.0
    failed: str | None = None
    failed_epoch: int | None = None
    checkpoint_path: Any = None
    compiled: bool | str = False  # the student's forward is torch.compile'd (True, or the backend's name); an
    # execution detail, recorded in the run JSON but not in the run id
    init_optimizer_state: dict[str, Any] | None = None  # the init stage's SGD state while the stage is unfinished
    discarded: str | None = None  # why an existing checkpoint could not be used (the run then starts again)

    @property
    def done(self) -> bool:
        return self.failed is not None or self.epoch >= self.spec.protocol.epochs

    @property
    def preact(self) -> bool:
        """Whether this member's method reads ``preact`` (the models compute it only then)."""
        return "preact" in self.method.needs

    @property
    def evaluated(self) -> nn.Module:
        """The model evaluated, reported and saved: the student, unless the method defines another (SimKD)."""
        model = self.method.evaluated_model(self.student)
        return self.student if model is None else model


def parameter_count(model: nn.Module) -> int:
    """Distinct parameters of a model (a tensor shared by two submodules counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def _preact_bn(teacher: nn.Module | None) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, ...]:
    if teacher is None or not hasattr(teacher, "preact_bn"):
        return ()
    return tuple(
        None if bn is None else (bn.weight.detach().float().cpu().clone(), bn.bias.detach().float().cpu().clone())
        for bn in teacher.preact_bn()
    )


def method_context(spec: RunSpec, data: Dataset, student: nn.Module, teacher: nn.Module | None) -> MethodContext:
    return MethodContext(
        student=student.feature_info,
        teacher=teacher.feature_info if teacher is not None else None,
        num_classes=data.num_classes,
        num_train=len(data.train_labels),
        train_labels=data.train_labels,
        image_size=data.image_size,
        student_arch=spec.student,
        teacher_arch=spec.teacher.arch if spec.teacher else None,
        student_head=student.head,
        teacher_head=teacher.head if teacher is not None else None,
        teacher_preact_bn=_preact_bn(teacher),
    )


def missing_teacher(entry: MethodEntry, teacher: nn.Module | None) -> str | None:
    """The one check of ``requires_teacher``: a reason when the method needs a teacher and has none."""
    if teacher is None and entry.cls.requires_teacher:
        return f"method {entry.name} needs a teacher"
    return None


def build_member(
    spec: RunSpec, data: Dataset, teacher: nn.Module | None, device: torch.device, *, compile: bool | str = False
) -> Member:
    """Student, method and optimizer for one run, initialised from its own seed (independent of any cohort).

    The student is moved to ``spec.channels_last``'s memory format and, with ``compile``, its forward compiled."""
    entry = resolve(spec.method)
    reason = missing_teacher(entry, teacher)
    if reason is not None:
        raise KdbenchError(f"{spec.label}: {reason}")
    cfg = make_config(entry, spec.method_config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec.seed, spec.method, "init"))
        student = create_model(spec.student, num_classes=data.num_classes)
        method = entry.cls(cfg, method_context(spec, data, student, teacher))
    student.to(device)
    # Under DDP the student's BatchNorms see the global batch: N ranks train what one device would.
    student = distributed.sync_batchnorm(student, device)
    prepare_model(student, channels_last=spec.channels_last, compile=compile)
    method.to(device)
    # ...and so do the method's own BatchNorms (FitNet's regressor, AB's connectors, FT's paraphraser, OFD's
    # connector, ReviewKD's ABF, SimKD's projector), which otherwise normalise each rank's share on its own.
    method = distributed.sync_batchnorm(method, device)
    method.rng = new_generator(device)
    method.rng.manual_seed(derive_seed(spec.seed, spec.method, "rng"))
    base_lr = spec.protocol.base_lr(spec.student)
    optimizer = _sgd(list(student.parameters()) + [p for p in method.parameters() if p.requires_grad], spec, base_lr)
    return Member(spec, student, method, optimizer, base_lr, compiled=compile)


def new_generator(device: torch.device) -> torch.Generator:
    """A method's private generator, on the device where it draws (the fake-CUDA tests substitute it)."""
    return torch.Generator(device=device)


def _sgd(params: list[nn.Parameter], spec: RunSpec, lr: float) -> torch.optim.SGD:
    p = spec.protocol
    return torch.optim.SGD(params, lr=lr, momentum=p.momentum, weight_decay=p.weight_decay)


def not_applicable_reason(spec: RunSpec, data: Dataset, teacher: nn.Module | None) -> str | None:
    """Why the run cannot be trained (recorded as n/a), else None: no teacher for a method that requires one,
    then the method's own ``not_applicable``. The harness's only calls of either."""
    entry = resolve(spec.method)
    reason = missing_teacher(entry, teacher)
    if reason is not None:
        return reason
    cfg = make_config(entry, spec.method_config)
    with torch.device("meta"):
        student = create_model(spec.student, num_classes=data.num_classes)
    return entry.cls.not_applicable(cfg, method_context(spec, data, student, teacher))


# ---------------------------------------------------------------------------------------------- checkpoints


def save_checkpoint(m: Member) -> None:
    """Write the member's checkpoint (rank 0 only: the other ranks hold the same state)."""
    if not distributed.is_main():
        return
    state = {
        "format": CHECKPOINT_FORMAT,
        "run_id": m.spec.run_id,
        "epoch": m.epoch,
        "init_done": m.init_done,
        "student": m.student.state_dict(),
        "method": m.method.state_dict(),
        "optimizer": m.optimizer.state_dict(),
        "init_optimizer": m.init_optimizer_state,
        "rng": m.method.rng.get_state() if m.method.rng is not None else None,
        "curve": m.curve,
        "best": m.best,
        "last_eval": m.last_eval,
        "epoch_seconds": m.epoch_seconds,
        "epoch_members": m.epoch_members,
        "init_seconds": m.init_seconds,
    }
    atomic_torch_save(m.checkpoint_path, state)


def load_checkpoint(m: Member) -> bool:
    """Restore a member from its checkpoint (weights-only load), all or nothing: False when there is none or it is
    unusable, and then the member is exactly as built (``m.discarded`` says why an existing one was not used)."""
    path = m.checkpoint_path
    if path is None or not path.is_file():
        return False
    snapshot = _snapshot(m)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"not a kdbench checkpoint of format {CHECKPOINT_FORMAT}")
        if state.get("run_id") != m.spec.run_id:
            raise ValueError(f"it belongs to run {state.get('run_id')!r}")
        m.student.load_state_dict(state["student"])
        m.method.load_state_dict(state["method"])
        if state["epoch"] > 0:
            m.optimizer.load_state_dict(state["optimizer"])
        if state["rng"] is not None and m.method.rng is not None:
            m.method.rng.set_state(state["rng"])
        epoch, init_done = int(state["epoch"]), int(state["init_done"])
        curve, best, last_eval = dict(state["curve"]), dict(state["best"]), dict(state["last_eval"])
        epoch_seconds, init_seconds = list(state["epoch_seconds"]), float(state["init_seconds"])
        epoch_members = [int(k) for k in state.get("epoch_members") or []]  # absent from older checkpoints
        init_opt = state.get("init_optimizer")
    except Exception as exc:  # truncated, foreign or from another version of the method: start the run again
        _restore(m, snapshot)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        m.discarded = f"checkpoint {path} not used ({first}): the run starts again from epoch 0"
        return False
    m.epoch, m.init_done = epoch, init_done
    m.curve, m.best, m.last_eval = curve, best, last_eval
    m.epoch_seconds, m.init_seconds = epoch_seconds, init_seconds
    m.epoch_members = epoch_members
    m.init_optimizer_state = init_opt
    return True


def _snapshot(m: Member) -> dict[str, Any]:
    import copy

    return {
        "student": copy.deepcopy(m.student.state_dict()),
        "method": copy.deepcopy(m.method.state_dict()),
        "optimizer": copy.deepcopy(m.optimizer.state_dict()),
        "rng": m.method.rng.get_state() if m.method.rng is not None else None,
    }


def _restore(m: Member, snap: dict[str, Any]) -> None:
    m.student.load_state_dict(snap["student"])
    m.method.load_state_dict(snap["method"])
    m.optimizer.load_state_dict(snap["optimizer"])
    if snap["rng"] is not None:
        m.method.rng.set_state(snap["rng"])


# ---------------------------------------------------------------------------------------------- steps


def teacher_outputs(
    teacher: nn.Module | None, x: torch.Tensor, preact: bool = False, batch_stats: bool = False
) -> ModelOutput | None:
    """The frozen teacher's outputs on a batch (no autograd graph), or None without a teacher.

    ``batch_stats``: its BatchNorms normalise with the batch's own statistics (as a teacher left in train mode) but
    update none of their running statistics, so the shared eval-mode teacher is unchanged."""
    if teacher is None:
        return None
    with torch.no_grad():
        if not batch_stats:
            return teacher(x, preact=preact)
        bns = [m for m in teacher.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [(m.training, m.track_running_stats) for m in bns]
        try:
            for m in bns:  # training without tracking: batch statistics, running buffers neither read nor written
                m.training, m.track_running_stats = True, False
            return teacher(x, preact=preact)
        finally:
            for m, (training, track) in zip(bns, saved):
                m.training, m.track_running_stats = training, track


def main_terms(
    m: Member, s_out: ModelOutput, t_out: ModelOutput | None, batch: Batch, progress: Progress | None = None
) -> dict[str, torch.Tensor]:
    """The loss terms of one step: ce_weight*CE + kd_weight*KD (added here for every method) + the method's own.

    ``progress`` defaults to the first step of the main stage."""
    cfg = m.method.cfg
    terms: dict[str, torch.Tensor] = {}
    if cfg.ce_weight:
        terms["ce"] = cfg.ce_weight * F.cross_entropy(widen(s_out.logits), batch.labels)
    if cfg.kd_weight:
        if t_out is None:
            raise RuntimeError(f"method {m.spec.method} has kd_weight > 0 but no teacher")
        terms["kd"] = cfg.kd_weight * kd_loss(s_out.logits, t_out.logits, cfg.temperature)
    if progress is None:
        progress = Progress(epoch=0, epochs=m.spec.protocol.epochs, step=0, steps=1)
    own = m.method.loss(s_out, t_out, batch, progress)
    clash = set(own) & set(terms)
    if clash:
        raise RuntimeError(f"method {m.spec.method} returned reserved term names {sorted(clash)}")
    terms.update(own)
    return terms


class StepModule(nn.Module):
    """The student and the method as one module whose forward is one step's loss terms, so that one
    DistributedDataParallel wrapper averages the gradients of the student and of every learnable part of the
    method (the teacher is frozen and replicated, never wrapped)."""

    def __init__(self, student: nn.Module, method: nn.Module, step: Callable[..., dict[str, torch.Tensor]]):
        super().__init__()
        self.student = student
        self.method = method
        self._step = step

    def forward(self, *args: Any) -> dict[str, torch.Tensor]:
        return self._step(*args)


def ddp_step(
    student: nn.Module, method: nn.Module, step: Callable[..., dict[str, torch.Tensor]], device: torch.device
) -> Callable[..., dict[str, torch.Tensor]]:
    """``step`` itself on one process; under DDP, ``step`` run through a DistributedDataParallel wrapper of the
    student and the method (built now: it registers the parameters that require a gradient at this moment).

    Buffers are not broadcast at each step (``broadcast_buffers=False``): the BatchNorm statistics are synchronised
    and every rank applies the same memory-bank update, and a broadcast of CRD's banks would cost their size per
    step. ``find_unused_parameters``: a method may leave some of its parameters out of a step."""
    if not distributed.active():
        return step
    import warnings

    from torch.nn.parallel import DistributedDataParallel

    with warnings.catch_warnings():  # torch >= 2.10 renames broadcast_buffers; its replacement still syncs at init
        warnings.simplefilter("ignore", FutureWarning)
        return DistributedDataParallel(
            StepModule(student, method, step),
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
            find_unused_parameters=True,
        )


def shared_terms(terms: dict[str, torch.Tensor], batch: Batch) -> dict[str, torch.Tensor]:
    """The loss terms of this rank's share of a global batch, scaled so that DDP's equal-weight mean over the ranks
    is the mean over the global batch's rows (``distributed.share_weight``; unscaled on one process and whenever the
    shares are equal, i.e. every full batch): an epoch's last, partial batch gets the one-device gradient."""
    factor = distributed.share_weight(int(batch.labels.shape[0]), batch.global_rows)
    return terms if factor is None else {k: v * factor for k, v in terms.items()}


def epoch_means(sums: dict[str, torch.Tensor], steps: int) -> dict[str, float]:
    """Per-term means over an epoch's steps, averaged over the ranks (each rank's terms are means over its rows,
    scaled by ``shared_terms`` where the shares are unequal, so this is the mean one process computes over the
    global batches)."""
    return {k: float(distributed.all_mean(v)) / steps for k, v in sums.items()}


def optimizer_step(
    optimizer: torch.optim.Optimizer, terms: dict[str, torch.Tensor], sums: dict[str, torch.Tensor]
) -> None:
    """One SGD step on the sum of the loss terms; adds each term (and the total) to ``sums`` without a sync."""
    total = sum(terms.values())
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    optimizer.step()
    for k, v in terms.items():
        d = v.detach().float()
        sums[k] = sums[k] + d if k in sums else d
    sums["total"] = sums["total"] + total.detach().float() if "total" in sums else total.detach().float()


def fail_member(m: Member, exc: Exception, epoch: int) -> None:
    """Record an exception raised by one member's step as that run's failure (epoch is 0-based; -1: init stage)."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    m.failed = f"{type(exc).__name__}: {first}" + (f" in epoch {epoch + 1}" if epoch >= 0 else "")
    m.failed_epoch = epoch + 1


def _check_finite(m: Member, means: dict[str, float], epoch: int) -> None:
    bad = [k for k, v in means.items() if not math.isfinite(v)]
    if bad:
        m.failed = f"non-finite loss ({', '.join(bad)}) in epoch {epoch + 1}"
        m.failed_epoch = epoch + 1


def run_init_stage(
    m: Member,
    data: Dataset,
    teacher: nn.Module | None,
    device: torch.device,
    on_batch: Callable[[], None] | None = None,
    save: bool = True,
) -> None:
    """The method's init stage (AB, FT, FSP), run by this member alone on its own data stream."""
    stage = m.method.init_stage(m.student)
    if stage is None:
        return
    epochs = stage.epochs if stage.epochs is not None else m.spec.protocol.init_epochs
    if m.init_done >= epochs:
        return
    params = stage.all_parameters()
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    opt = _sgd(params, m.spec, stage.lr if stage.lr is not None else m.base_lr)
    if m.init_optimizer_state is not None:  # resumed inside the stage: its momentum goes on where it stopped
        opt.load_state_dict(m.init_optimizer_state)
    loader = data.train_loader(
        m.spec.protocol.batch_size,
        seed=derive_seed(m.spec.seed, m.spec.method, "init-data"),
        drop_last=m.spec.protocol.drop_last,
        device=device,
    )

    def init_terms(batch: Batch) -> dict[str, torch.Tensor]:
        with autocast(device, m.spec.precision):
            t_out = teacher_outputs(teacher, batch.images, m.preact)
            s_out = m.student(batch.images, preact=m.preact) if stage.needs_student else None
            return stage.loss(s_out, t_out, batch)

    step = ddp_step(m.student, m.method, init_terms, device)
    try:
        if teacher is not None:
            teacher.eval()
        while m.init_done < epochs:
            t0 = time.perf_counter()
            m.student.eval()  # as RepDistiller's helper/pretrain.py: the trained feature layers alone in train mode
            for mod in stage.student_modules:
                mod.train()
            m.method.train()
            sums: dict[str, torch.Tensor] = {}
            for batch in loader.epoch(m.init_done):
                batch = _batch_for(batch, m.spec.channels_last)
                optimizer_step(opt, shared_terms(step(batch), batch), sums)
                if on_batch:
                    on_batch()
            means = epoch_means(sums, len(loader))
            _check_finite(m, means, -1)
            if m.failed:
                m.failed = "init stage: " + m.failed
                return
            m.curve.setdefault("init_loss", []).append(means.get("total", 0.0))
            m.init_done += 1
            m.init_seconds += time.perf_counter() - t0
            m.init_optimizer_state = opt.state_dict() if m.init_done < epochs else None
            if save:
                save_checkpoint(m)
    finally:
        for p, f in zip(params, flags):
            p.requires_grad_(f)


def train_cohort(
    members: list[Member],
    data: Dataset,
    teacher: nn.Module | None,
    device: torch.device,
    *,
    progress: Any = None,
    on_epoch: Callable[[Member], None] | None = None,
    save: bool = True,
) -> None:
    """Train the members' main stage side by side on one data stream (all must be at the same epoch)."""
    active = [m for m in members if not m.done]
    if not active:
        return
    start = {m.epoch for m in active}
    if len(start) != 1:
        raise ValueError("cohort members must resume from the same epoch")
    proto = active[0].spec.protocol
    precision, layout = active[0].spec.precision, active[0].spec.channels_last
    if any((m.spec.precision, m.spec.channels_last) != (precision, layout) for m in active):
        raise ValueError("cohort members must share precision and memory layout (the teacher's forward is shared)")
    loader = data.train_loader(
        proto.batch_size, seed=derive_seed(active[0].spec.seed, "data"), drop_last=proto.drop_last, device=device
    )
    test_loader = data.test_loader(TEST_BATCH, device=device)
    if teacher is not None:
        teacher.eval()
    task = None
    steps_of: dict[int, Callable[..., dict[str, torch.Tensor]]] = {}
    for m in active:

        def member_terms(images, t_out, batch, where, m=m) -> dict[str, torch.Tensor]:
            with autocast(device, precision):
                s_out = m.student(images, preact=m.preact)
                return main_terms(m, s_out, t_out, batch, where)

        steps_of[id(m)] = ddp_step(m.student, m.method, member_terms, device)
    if progress is not None and distributed.is_main():
        from rich.markup import escape

        names = ", ".join(method_label(m.spec) for m in active)
        task = progress.add_task(escape(f"{active[0].spec.pair} s{active[0].spec.seed} [{names}]"), total=len(loader))
    for epoch in range(start.pop(), proto.epochs):
        active = [m for m in active if not m.done]
        if not active:
            break
        t0 = time.perf_counter()
        sums = {id(m): {} for m in active}
        for m in active:
            for g in m.optimizer.param_groups:
                g["lr"] = proto.lr_at(m.base_lr, epoch)
            m.student.train()
            m.method.train()
        if task is not None:
            progress.reset(task, total=len(loader))
        teacher_preact = any(m.preact for m in active)
        steps = len(loader)
        for step, batch in enumerate(loader.epoch(epoch)):
            batch = _batch_for(batch, layout)
            batch_stats = [m for m in active if m.method.teacher_batch_stats]
            with autocast(device, precision):
                t_out = teacher_outputs(teacher, batch.images, teacher_preact)
                t_batch = (
                    teacher_outputs(teacher, batch.images, any(m.preact for m in batch_stats), batch_stats=True)
                    if batch_stats
                    else None
                )
            where = Progress(epoch=epoch, epochs=proto.epochs, step=step, steps=steps)
            for m in active:
                if m.failed is not None:
                    continue
                try:
                    t_for = t_batch if m.method.teacher_batch_stats else t_out
                    terms = shared_terms(steps_of[id(m)](batch.images, t_for, batch, where), batch)
                    optimizer_step(m.optimizer, terms, sums[id(m)])
                except Exception as exc:  # one member's error must not cost its cohort-mates their results
                    if distributed.active():  # ...except under DDP: the other ranks wait in a collective
                        raise
                    fail_member(m, exc, epoch)
            if task is not None:
                progress.advance(task)
        seconds = time.perf_counter() - t0
        for m in active:
            means = epoch_means(sums[id(m)], len(loader))
            m.curve["epoch"].append(epoch + 1)
            m.curve["lr"].append(proto.lr_at(m.base_lr, epoch))
            for k, v in means.items():
                m.curve["loss"].setdefault(k, []).append(v if math.isfinite(v) else None)
            m.epoch_seconds.append(seconds)
            m.epoch_members.append(len(active))
            if m.failed is None:
                _check_finite(m, means, epoch)
            m.epoch = epoch + 1
            if m.failed is None and (m.epoch % proto.eval_every == 0 or m.epoch == proto.epochs):
                with autocast(device, precision):
                    ev = evaluate(m.evaluated, test_loader)
                m.last_eval = {**ev, "epoch": m.epoch}
                m.curve["eval_epoch"].append(m.epoch)
                m.curve["test_top1"].append(ev["top1"])
                m.curve["test_top5"].append(ev["top5"])
                if ev["top1"] > m.best["top1"]:
                    m.best = {"top1": ev["top1"], "top5": ev["top5"], "epoch": m.epoch}
            if save:
                save_checkpoint(m)
            if on_epoch:
                on_epoch(m)
        if task is not None:  # every member's top-1, named (rich markup escaped: method names may hold brackets)
            tops = ", ".join(
                f"{m.spec.method} {m.last_eval['top1']:.2f}" if "top1" in m.last_eval else f"{m.spec.method} -"
                for m in active
            )
            progress.update(
                task,
                description=escape(
                    f"{active[0].spec.pair} s{active[0].spec.seed} ep {epoch + 1}/{proto.epochs} top1: {tops}"
                ),
            )
    if task is not None:
        progress.remove_task(task)


def run_record(
    spec: RunSpec,
    data: Dataset,
    teacher_card: dict[str, Any] | None,
    device: torch.device,
    *,
    status: str,
    reason: str | None = None,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    **parts: Any,
) -> dict[str, Any]:
    """The per-run JSON (status done, failed or n/a): the one builder of its common fields; ``parts`` (curve,
    timings, failed_epoch, ...) are added after them. ``config`` is the method's full resolved config (default:
    the spec's, which leaves out settings that enter the run id only when set)."""
    from kdbench.results import SCHEMA_VERSION

    entry = resolve(spec.method)
    return {
        "schema": SCHEMA_VERSION,
        "run_id": spec.run_id,
        "status": status,
        **({"reason": reason} if reason is not None else {}),
        **({"failed_epoch": parts.pop("failed_epoch")} if "failed_epoch" in parts else {}),
        "spec": spec.to_dict(),
        "pair": spec.pair,
        "method": {
            "name": spec.method,
            "dist": entry.dist,
            "version": entry.version,
            "paper": entry.cls.paper,
            "config": dict(spec.method_config if config is None else config),
        },
        **({"settings": spec.settings.to_dict()} if spec.settings is not None else {}),
        "teacher": teacher_card,
        "data": {
            "name": data.name,
            "checksum": data.checksum,
            "num_classes": data.num_classes,
            "image_size": data.image_size,
            "train_size": len(data.train_labels),
            "test_size": len(data.test_labels),
        },
        "metrics": metrics or {},
        **parts,
        "environment": environment(device),
    }


def model_record(m: Member) -> dict[str, Any]:
    """Which model the metrics and the saved weights are of, and its parameter count (without the modules it holds
    but does not use at inference, ``unused_modules``: SimKD's student classifier)."""
    evaluated = m.evaluated
    own = evaluated is m.student
    return {
        "evaluated": "student" if own else type(evaluated).__name__,
        "description": "the student alone" if own else (type(evaluated).__doc__ or "").strip().split("\n")[0],
        "parameters": parameter_count(evaluated)
        - sum(parameter_count(u) for u in getattr(evaluated, "unused_modules", ())),
        "student_parameters": parameter_count(m.student),
        **({} if own else {"student_prefix": getattr(evaluated, "student_prefix", None)}),
    }


def result_record(
    m: Member,
    data: Dataset,
    teacher_card: dict[str, Any] | None,
    device: torch.device,
    cohort_size: int,
    extra_metrics: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The per-run JSON of a finished (or failed) member."""
    n = len(data.train_labels)
    steady = m.epoch_seconds[1:] or m.epoch_seconds
    mean_epoch = sum(steady) / len(steady) if steady else None
    metrics: dict[str, Any] = {}
    if m.failed is None:
        metrics = {
            "top1_last": m.last_eval["top1"],
            "top5_last": m.last_eval["top5"],
            "top1_best": m.best["top1"],
            "top5_best": m.best["top5"],
            "best_epoch": m.best["epoch"],
            **(extra_metrics or {}),
        }
    failed = {"reason": m.failed, "failed_epoch": m.failed_epoch} if m.failed else {}
    return run_record(
        m.spec,
        data,
        teacher_card,
        device,
        status="failed" if m.failed else "done",
        metrics=metrics,
        **failed,
        model=model_record(m),
        config=dataclasses.asdict(m.method.cfg),
        curve=m.curve,
        timings={
            "epoch_seconds": m.epoch_seconds,
            "init_seconds": m.init_seconds,
            "total_seconds": sum(m.epoch_seconds) + m.init_seconds,
            "images_per_second": (n / mean_epoch) if mean_epoch else None,
            "cohort_size": cohort_size,
            "epoch_cohort_sizes": m.epoch_members,
            "note": "epoch_seconds is the wall time of the whole cohort's epoch; epoch_cohort_sizes the members that "
            "trained in it (from the first epoch this code recorded it)",
        },
        execution={
            "precision": m.spec.precision,
            "channels_last": m.spec.channels_last,
            "compile": m.compiled,
            # one run on several processes (DDP): not part of the run id, since the student's and the method's
            # BatchNorms are synchronised, every rank sees its share of the same global batches (a partial one
            # weighted by its share) and methods whose loss couples the batch are refused (kdbench.distributed)
            **({"processes": distributed.world_size(), "sync_batchnorm": True} if distributed.active() else {}),
        },
    )
