"""The one plugin interface (Method), its context, init stages, and the entry-point registry.

A method is an ``nn.Module`` subclass. Its constructor receives its ``Config`` and a ``MethodContext``;
it registers adapters as submodules and memory banks / queues as buffers, so they are optimised and
checkpointed with no hand-kept lists. ``loss(student, teacher, batch, progress)`` returns the method's weighted
terms; the harness adds ``ce_weight * CE`` and ``kd_weight * KD`` itself, so nothing outside ``methods/``
branches on a name. The harness, never a method, checks ``requires_teacher`` and calls ``not_applicable``; it
asks the models only for the outputs in the cohort's ``needs``. Built-in methods are found through the
``kdbench.methods`` entry-point group exactly like third-party ones.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from kdbench.data.loader import Batch  # re-exported: plugins import Batch from here
from kdbench.errors import KdbenchError
from kdbench.models.base import FeatureInfo, ModelOutput

ENTRY_POINT_GROUP = "kdbench.methods"
# What a method may read: ModelOutput fields (logits, feats, preact, pooled) and the batch's sample index.
# The models compute ``preact`` only when a cohort member declares it.
NEEDS = frozenset({"logits", "feats", "preact", "pooled", "index"})


# Field metadata of a setting added after runs were recorded: it enters the run id only when set away from its
# default (``config_identity``), so the ids of existing runs do not change; the run JSON records it always.
ID_WHEN_SET = {"id": "when_set"}


def absent_means(value: Any) -> dict[str, Any]:
    """Field metadata of a setting added with a new default: a run recorded before the field existed (its spec has
    no such key) ran with ``value``. Tables then show such a run as a run of that setting, not of the new default."""
    return {"absent": value}


def absent_values(cfg_cls: type) -> dict[str, Any]:
    """{field: value} for the Config's fields declared with ``absent_means``."""
    return {f.name: f.metadata["absent"] for f in dataclasses.fields(cfg_cls) if "absent" in f.metadata}


@dataclass
class MethodConfig:
    """Loss weights shared by every method: loss = ce_weight*CE + kd_weight*KD + the method's own terms.

    ce_weight is the papers' gamma, kd_weight their alpha; ``weight`` is beta, the scale of the method's
    own term (each method sets its reference default). ``temperature`` is the KD softmax temperature T.
    """

    ce_weight: float = 1.0
    kd_weight: float = 0.0
    temperature: float = 4.0
    weight: float = 0.0

    #: The valid range of each numeric field, checked (with every number finite) before any run starts:
    #: ">0", ">=0", ">=1", "[0,1)", or a tuple of the allowed values. Fields named ``*weight`` default to ">=0".
    #: A subclass extends it (``RANGES = {**MethodConfig.RANGES, "tau": ">0"}``) and may override ``check``.
    RANGES: ClassVar[dict[str, Any]] = {"temperature": ">0"}

    def check(self, where: str = "methods") -> None:
        """Raise KdbenchError naming the first setting that is not finite or out of its range."""
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            rule = self.RANGES.get(f.name, ">=0" if f.name.endswith("weight") else None)
            key = f"{where}.{f.name}"
            if isinstance(value, float) and not math.isfinite(value):
                raise KdbenchError(f"{key} must be a finite number, got {value!r}")
            if rule is None or value is None:
                continue
            if isinstance(rule, tuple):
                if value not in rule:
                    raise KdbenchError(f"{key} must be one of {', '.join(map(str, rule))}, got {value!r}")
                continue
            ok = {
                ">0": lambda v: v > 0,
                ">=0": lambda v: v >= 0,
                ">=1": lambda v: v >= 1,
                "[0,1)": lambda v: 0 <= v < 1,
            }[rule](value)
            if not ok:
                raise KdbenchError(f"{key} must be {_RULE_WORDS[rule]}, got {value!r}")


_RULE_WORDS = {">0": "> 0", ">=0": ">= 0", ">=1": ">= 1", "[0,1)": "in [0, 1)"}


@dataclass(frozen=True)
class Progress:
    """Where training stands when ``loss`` is called (the main stage only).

    ``epoch`` is the 0-based epoch of the main stage and ``epochs`` the protocol's main-stage epochs; ``step`` is
    the 0-based step within the epoch and ``steps`` the steps per epoch. A method that follows a reference written
    with 1-based epochs (mdistiller's ``kwargs["epoch"]``) uses ``epoch + 1``.
    """

    epoch: int = 0
    epochs: int = 1
    step: int = 0
    steps: int = 1


@dataclass(frozen=True, eq=False)
class MethodContext:
    """What a method may know when it is built: shapes, class count, training-set size and labels.

    ``student_head`` / ``teacher_head`` are the final linear classifiers (for methods that need the
    gradient of the cross-entropy with respect to the pooled features). Do not register them as
    submodules of the method: they belong to the student (optimised by the harness) and the frozen teacher.

    ``teacher_preact_bn[i]`` is the (weight, bias) of the teacher's BatchNorm whose output is (the residual branch
    of) ``preact[i]``, copied at build time (detached, on the CPU), or None where the teacher has no such BN at
    tap i; empty when there is no teacher (OFD reads its margins from it).
    """

    student: FeatureInfo
    teacher: FeatureInfo | None
    num_classes: int
    num_train: int
    train_labels: torch.Tensor
    image_size: int = 32
    student_arch: str = ""
    teacher_arch: str | None = None
    student_head: nn.Module | None = None
    teacher_head: nn.Module | None = None
    teacher_preact_bn: tuple[tuple[torch.Tensor, torch.Tensor] | None, ...] = ()


@dataclass
class InitStage:
    """A pre-training phase run before the main stage (AB, FT, FSP), as RepDistiller's ``helper/pretrain.py``.

    The stage optimises ``parameters`` (the method's own, e.g. AB's connectors) and every parameter of
    ``student_modules`` (the student layers it trains, e.g. ``student.feature_modules()``), with SGD at the
    protocol's momentum and weight decay, at ``lr`` (default the run's base learning rate) held constant, for
    ``epochs`` epochs (None: the protocol's ``init_epochs``), on ``loss(student_out, teacher_out, batch)``
    instead of the main loss. Modes, as the reference (``model_s.eval(); model_t.eval(); init_modules.train()``):
    the teacher and the student run in eval mode except ``student_modules``, which run in train mode (batch
    statistics), and the method runs in train mode. With ``needs_student=False`` (FT) the student is not run at
    all and ``student_out`` is None. After the stage, the main stage optimises the student and the method's
    parameters that still require a gradient.
    """

    parameters: list[nn.Parameter]
    loss: Callable[[ModelOutput | None, ModelOutput, Batch], dict[str, torch.Tensor]]
    student_modules: list[nn.Module] = field(default_factory=list)
    epochs: int | None = None
    lr: float | None = None
    needs_student: bool = True

    def all_parameters(self) -> list[nn.Parameter]:
        """``parameters`` then those of ``student_modules``, each once."""
        seen: set[int] = set()
        out: list[nn.Parameter] = []
        for p in [*self.parameters, *(p for mod in self.student_modules for p in mod.parameters())]:
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out


class Method(nn.Module):
    """Base class of every distillation method (built-in or plugin).

    Class attributes: ``name`` (the entry-point name), ``paper``, ``Config`` (a ``MethodConfig`` dataclass),
    ``needs`` (what ``loss`` reads, from ``NEEDS``: declare it exactly, the models compute ``preact`` only when
    a member of the cohort needs it), ``requires_teacher`` (False only for a method that never reads the
    teacher; the harness records a run without one as n/a), ``couples_batch`` (below).

    ``couples_batch``: True when ``loss`` is not a mean of per-sample terms, so that it couples the samples of a
    batch (SP's batch similarity matrix, RKD's pairwise distances and angles, PKT's batch kernel, CC's pairs of
    rows, DIST's intra-class Pearson correlation over the batch, OFD's teacher forward on the batch's BN statistics). On
    several processes (DDP) each rank would compute it on its own share of the global batch, which is not the
    run one device trains, so kdbench refuses such a method on more than one process before anything trains
    (``couples_batch_why`` adds a few words to that message). A method that gathers what it needs from every rank
    (CRD, CRCD and RRD gather the global batch for their banks and queue) leaves it False. Default False: a plugin
    whose loss couples the batch must set it.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    Config: ClassVar[type] = MethodConfig
    needs: ClassVar[frozenset[str]] = frozenset({"logits"})
    requires_teacher: ClassVar[bool] = True
    couples_batch: ClassVar[bool] = False
    couples_batch_why: ClassVar[str] = ""

    def __init__(self, cfg: MethodConfig, ctx: MethodContext):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        # A generator seeded from (seed, method) by the harness: use it for any sampling (negatives).
        self.rng: torch.Generator | None = None

    @classmethod
    def not_applicable(cls, cfg: MethodConfig, ctx: MethodContext) -> str | None:
        """A reason when the method cannot apply to this pair (recorded as n/a), else None.

        Called by the harness only, after its own ``requires_teacher`` check (so ``ctx.teacher`` is set when
        the method requires one), and before the method is built.
        """
        return None

    def init_stage(self, student: nn.Module) -> InitStage | None:
        """The pre-training stage run before the main one, or None (the default)."""
        return None

    def loss(
        self, student: ModelOutput, teacher: ModelOutput | None, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        """The method's own weighted loss terms (CE and KD are added by the harness)."""
        return {}

    @property
    def teacher_batch_stats(self) -> bool:
        """True when ``loss`` must see the teacher's outputs with its BNs on the batch's statistics (OFD, as its
        references run the teacher in train mode) instead of the shared eval-mode forward. The harness then runs a
        second forward of the frozen teacher for it, leaving the teacher's running statistics untouched."""
        return False

    def evaluated_model(self, student: nn.Module) -> nn.Module | None:
        """The model that is evaluated, whose final metrics are reported and whose weights are saved, when it is
        not the student itself (SimKD: the student, its projector and the teacher's frozen classifier).

        None (the default): the student. The returned module must return a ``ModelOutput`` and must not register
        the teacher's parameters as trainable; the harness counts its parameters and says so in the run JSON.
        """
        return None


# ---------------------------------------------------------------------------------------------- registry


@dataclass
class MethodEntry:
    """One registered method: its class when it loaded, its error when it did not."""

    name: str
    value: str
    dist: str
    version: str
    cls: type[Method] | None = None
    error: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.cls is not None

    @property
    def builtin(self) -> bool:
        return self.dist == "kdbench"


def _allowed(ep_name: str, dist: str) -> bool:
    if dist == "kdbench":
        return True
    if os.environ.get("KDBENCH_BUILTIN_ONLY", "") not in ("", "0"):
        return False
    allow = os.environ.get("KDBENCH_PLUGINS")
    if allow is None:
        return True
    return ep_name in {a.strip() for a in allow.split(",") if a.strip()}


def discover() -> dict[str, MethodEntry]:
    """Every method in the entry-point group; a plugin that fails to import is kept with its error.

    ``KDBENCH_BUILTIN_ONLY=1`` keeps only the methods shipped with kdbench; ``KDBENCH_PLUGINS=a,b`` is an
    allow-list of third-party method names (built-ins are always available).
    """
    found: dict[str, MethodEntry] = {}
    for ep in md.entry_points(group=ENTRY_POINT_GROUP):
        dist = ep.dist.name if ep.dist is not None else "?"
        version = ep.dist.version if ep.dist is not None else "?"
        if not _allowed(ep.name, dist):
            continue
        entry = MethodEntry(ep.name, ep.value, dist, version)
        try:
            cls = ep.load()
            if not (isinstance(cls, type) and issubclass(cls, Method)):
                raise TypeError(f"{ep.value} is not a kdbench.method.Method subclass")
            if cls.name != ep.name:
                raise TypeError(f"{ep.value}.name is {cls.name!r}, but the entry point is {ep.name!r}")
            unknown = set(cls.needs) - NEEDS
            if unknown:
                raise TypeError(f"{ep.value}.needs has {sorted(unknown)}; known: {', '.join(sorted(NEEDS))}")
            entry.cls = cls
        except Exception as exc:  # a broken plugin is reported, never fatal
            entry.error = f"{type(exc).__name__}: {exc}"
        prev = found.get(ep.name)
        if prev is not None and prev.builtin and not entry.builtin:
            continue  # a plugin cannot shadow a built-in
        found[ep.name] = entry
    return found


def resolve(name: str, registry: dict[str, MethodEntry] | None = None) -> MethodEntry:
    """A method by name. ``X+kd`` for any registered X that has no variant of its own adds KD (weight 1)."""
    registry = discover() if registry is None else registry
    entry = registry.get(name)
    if entry is None and name.endswith("+kd") and name[:-3] in registry and not name[:-3].endswith("+kd"):
        base = registry[name[:-3]]
        entry = dataclasses.replace(base, name=name, overrides={**base.overrides, "kd_weight": 1.0})
    if entry is None:
        import difflib

        close = difflib.get_close_matches(name, list(registry), n=3, cutoff=0.5)
        hint = f"did you mean {', '.join(close)}?" if close else f"known: {', '.join(sorted(registry))}"
        raise KdbenchError(f"unknown method {name!r}: {hint}")
    if not entry.ok:
        raise KdbenchError(f"method {name!r} ({entry.dist}) failed to load: {entry.error}")
    return entry


def make_config(entry: MethodEntry, values: dict[str, Any] | None = None) -> MethodConfig:
    """The entry's Config with its variant overrides and then ``values`` applied, with type checks."""
    assert entry.cls is not None
    cfg_cls = entry.cls.Config
    valid = {f.name: f for f in dataclasses.fields(cfg_cls)}
    merged = {**entry.overrides, **(values or {})}
    kwargs: dict[str, Any] = {}
    for key, val in merged.items():
        if key not in valid:
            raise KdbenchError(f"unknown setting {key!r} for method {entry.name!r}; valid: {', '.join(sorted(valid))}")
        kwargs[key] = coerce(val, valid[key].type, f"methods.{entry.name}.{key}")
    cfg = cfg_cls(**kwargs)
    check = getattr(cfg, "check", None)
    if callable(check):
        check(f"methods.{entry.name}")
    return cfg


def config_identity(cfg: MethodConfig) -> dict[str, Any]:
    """The settings that identify a run: every field, except an ``ID_WHEN_SET`` field left at its default."""
    out = dataclasses.asdict(cfg)
    for f in dataclasses.fields(cfg):
        if f.metadata.get("id") == "when_set" and out[f.name] == f.default:
            del out[f.name]
    return out


def coerce(value: Any, typ: Any, where: str) -> Any:
    """Check / convert a config value to a dataclass field's declared type (given as a string annotation)."""
    t = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
    t = t.replace(" ", "")
    optional = t.endswith("|None") or t.startswith("None|")
    t = t.replace("|None", "").replace("None|", "")
    if value is None and optional:
        return None
    try:
        if t == "float" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t == "int" and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t == "bool" and isinstance(value, bool):
            return value
        if t == "str" and isinstance(value, str):
            return value
        if t.startswith("tuple") and isinstance(value, (list, tuple)):
            return tuple(value)
        if t not in ("float", "int", "bool", "str") and not t.startswith("tuple"):
            return value
    except (TypeError, ValueError):
        pass
    raise KdbenchError(f"{where} must be {t}, got {value!r}")


def refuse_coupled(methods: list[str], processes: int) -> None:
    """One line naming the first method whose loss couples the samples of a batch, when more than one process
    would train it (the run would not be the single-device run its id names)."""
    if processes <= 1:
        return
    for name in dict.fromkeys(methods):
        cls = resolve(name).cls
        if cls is not None and cls.couples_batch:
            why = f" ({cls.couples_batch_why})" if cls.couples_batch_why else ""
            raise KdbenchError(
                f"method {name!r} cannot run on {processes} processes: its loss couples the samples of a batch{why}, "
                "so each rank's loss on its share differs from the loss on the global batch; run it with one process"
            )
