"""Activation-boundary distillation (Heo et al. 2019): an init stage teaches the student's pre-activations the
teacher's on/off pattern with a margin; the main stage is cross-entropy only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdbench.errors import NotApplicable
from kdbench.method import Batch, InitStage, Method, MethodConfig, MethodContext
from kdbench.models.base import ModelOutput


@dataclass
class ABConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 1.0
    margin: float = 1.0
    init_weight: float = 1.0
    connect_equal_shapes: bool = False

    RANGES = {**MethodConfig.RANGES, "margin": ">=0"}


def make_connector(s_channels: int, s_size: int, t_channels: int, t_size: int, always: bool = False) -> nn.Module:
    """The map from a student pre-activation (s_channels, s_size^2) onto the teacher's (t_channels, t_size^2).

    Equal shapes: identity (the reference's ``Connector``), unless ``always``. Otherwise a bias-free conv + BN,
    the conv picked by the reference's regressor rule: 3x3 stride 2 when the student map is twice the teacher's,
    4x4 stride-2 transposed conv when it is half, a valid conv of kernel 1 + s - t when it is larger or equal
    (1x1 at equal sizes). For a student map smaller by another ratio (the reference raises) a stride-1
    transposed conv of kernel 1 + t - s, which grows the map by exactly t - s.
    """
    if s_channels == t_channels and s_size == t_size and not always:
        return nn.Identity()
    if s_size == 2 * t_size:
        conv: nn.Module = nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1, bias=False)
    elif 2 * s_size == t_size:
        conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1, bias=False)
    elif s_size >= t_size:
        conv = nn.Conv2d(s_channels, t_channels, kernel_size=1 + s_size - t_size, bias=False)
    else:
        conv = nn.ConvTranspose2d(s_channels, t_channels, kernel_size=1 + t_size - s_size, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(t_channels))


def boundary_loss(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over all elements of the squared hinge that pushes ``source`` to the side of 0 where ``target`` is.

    Where the teacher neuron is off (target <= 0) the student pays (s + m)^2 while s > -m; where it is on
    (target > 0) it pays (s - m)^2 while s <= m.
    """
    off = (target <= 0) & (source > -margin)
    on = (target > 0) & (source <= margin)
    return ((source + margin).pow(2) * off + (source - margin).pow(2) * on).sum()


class AB(Method):
    """Activation boundaries: a 30-epoch init stage on the AB loss, then CE only (``loss`` returns ``{}``).

    Taps: ``preact[1:]`` of both networks (block-group outputs BEFORE their final ReLU; the reference's
    ``feat[1:-1]`` with ``preact=True``). Per tap l a connector (``self.connectors[l]``) maps the student's
    pre-activation onto the teacher's shape (see ``make_connector``). The init-stage loss, as the reference
    ``ABLoss``: for n taps, w_l = 2^(l - n + 1) (the last tap 1, each earlier one half the next);
    L = sum_l w_l * boundary_loss(connector_l(s_l), t_l) / B / 1000 * 3, with margin 1.0 and B the batch size.
    The init stage (``init_stage``: ``InitStage.epochs`` None, so the protocol's ``init_epochs``, 30 in the
    paper protocol) trains the connectors and every student parameter except its ``head`` (the reference's
    ``get_feat_modules()``). The connectors are frozen (``requires_grad`` False) outside it: the main stage
    does not use them, as in the reference. Defaults: gamma 1, alpha 0, beta 1, margin 1.0, init_weight 1.0.

    Choices and departures:
    - Connector: the reference (RepDistiller ``models/util.py: Connector``) uses an identity where the
      student and teacher maps have the same channels and size (most same-architecture pairs), else its FitNet
      regressor without ReLU (conv + BN: a 1x1 conv at equal sizes). The authors' code (bhheo/AB_distillation)
      also leaves equal widths unconnected and otherwise uses a bias-free 1x1 conv + BN. We do the same by
      default; ``connect_equal_shapes=True`` puts a conv + BN connector on every tap. Our convs have no bias
      (a bias before BN is redundant; the authors' code has none) and PyTorch's default init (as RepDistiller;
      the authors' code draws He-normal fan-out weights); for a student map smaller than the teacher's by a
      ratio other than 2, where the reference raises, see ``make_connector``.
    - Weights: the init-stage loss is multiplied by ``init_weight`` (default 1). The reference's pre-training
      loop (``helper/pretrain.py``) sums the AB loss groups WITHOUT beta, and its main stage adds no AB term,
      so beta (``weight``, 1 on the published command line) has no effect there; we keep it at 1 and also leave
      it unused. ``init_weight = weight`` is the other reading of "beta in the init stage" (identical at the
      defaults).
    - Taps are paired by index (the reference's ``zip``); n, in the weights above, is the number of pairs.
      When the student has more block groups than the teacher (resnet20 -> mobilenetv2), its extra trailing
      groups, like any layer after its last paired tap (a final 1x1 conv before pooling), get no gradient in
      the init stage, as in the reference.
    """

    name = "ab"
    paper = (
        "Heo, Lee, Yun & Choi. Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden "
        "Neurons. AAAI 2019"
    )
    url = "https://arxiv.org/abs/1811.03233"
    Config = ABConfig
    needs = frozenset({"preact"})

    def __init__(self, cfg: ABConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        if ctx.teacher is None:
            raise NotApplicable("AB needs a teacher")
        s_info, t_info = ctx.student, ctx.teacher
        n = min(len(s_info.channels), len(t_info.channels)) - 1
        self.connectors = nn.ModuleList(
            make_connector(
                s_info.channels[i],
                s_info.spatial(i, ctx.image_size),
                t_info.channels[i],
                t_info.spatial(i, ctx.image_size),
                always=cfg.connect_equal_shapes,
            )
            for i in range(1, n + 1)
        )
        # Trained only in the init stage (the harness turns their gradients on for it).
        self.connectors.requires_grad_(False)
        self.layer_weights = [2.0 ** (i - n + 1) for i in range(n)]

    def bind_student(self, student: nn.Module) -> None:
        """Keep a reference to the student (not a submodule) so that the init stage can train its features."""
        object.__setattr__(self, "_student", student)

    def student_feature_parameters(self) -> list[nn.Parameter]:
        student = self.__dict__.get("_student")
        if student is None:
            raise RuntimeError("AB.init_stage needs the student: call bind_student(student) first")
        head = getattr(student, "head", None)
        if head is None:
            head = self.ctx.student_head
        if head is None:
            raise RuntimeError("AB.init_stage cannot tell the student's head from its feature layers")
        skip = {id(p) for p in head.parameters()}
        return [p for p in student.parameters() if id(p) not in skip]

    def ab_loss(self, student: ModelOutput, teacher: ModelOutput) -> torch.Tensor:
        """The reference ABLoss summed over taps (unweighted by beta or init_weight)."""
        m = self.cfg.margin
        total = None
        for w, conn, s, t in zip(self.layer_weights, self.connectors, student.preact[1:], teacher.preact[1:]):
            src = conn(s).float()
            with torch.autocast(device_type=src.device.type, enabled=False):
                term = w * boundary_loss(src, t.float(), m) / src.shape[0] / 1000 * 3
            total = term if total is None else total + term
        assert total is not None, "AB found no tap pairs"
        return total

    def init_stage(self) -> InitStage:
        params = [p for p in self.connectors.parameters()] + self.student_feature_parameters()

        def stage_loss(student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
            return {"ab": self.cfg.init_weight * self.ab_loss(student, teacher)}

        return InitStage(parameters=params, loss=stage_loss, epochs=None)

    def loss(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {}
