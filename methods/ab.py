"""Activation-boundary distillation (Heo et al. 2019): an init stage teaches the student's pre-activations the
teacher's on/off pattern with a margin; the main stage is cross-entropy only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdbench.losses import widen
from kdbench.method import Batch, InitStage, Method, MethodConfig, MethodContext, Progress
from kdbench.method_parts import regressor_conv
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

    Equal shapes: identity (the reference's ``Connector``), unless ``always``. Otherwise a bias-free
    ``regressor_conv`` + BN (the reference's regressor without its ReLU).
    """
    if s_channels == t_channels and s_size == t_size and not always:
        return nn.Identity()
    return nn.Sequential(regressor_conv(s_channels, s_size, t_channels, t_size, bias=False), nn.BatchNorm2d(t_channels))


def boundary_loss(source: torch.Tensor, target: torch.Tensor, margin: float) -> torch.Tensor:
    """Sum over all elements of the squared hinge that pushes ``source`` to the side of 0 where ``target`` is.

    Where the teacher neuron is off (target <= 0) the student pays (s + m)^2 while s > -m; where it is on
    (target > 0) it pays (s - m)^2 while s <= m.
    """
    off = (target <= 0) & (source > -margin)
    on = (target > 0) & (source <= margin)
    return ((source + margin).pow(2) * off + (source - margin).pow(2) * on).sum()


class AB(Method):
    """Init stage: L = init_weight * sum_l 2^(l-n+1) * boundary(c_l(p_s^l), p_t^l; m) / B / 1000 * 3; main: CE.

    p^l: ``preact[1:]`` of both networks (block-group outputs BEFORE their final ReLU; the reference's
    ``feat[1:-1]`` with ``preact=True``), paired by index, n pairs; c_l: ``self.connectors[l]`` (see
    ``make_connector``); ``boundary_loss`` the squared hinge with margin m; B the batch size. The init stage
    (the protocol's ``init_epochs``) trains the connectors and the student's ``feature_modules()`` (the
    reference's ``get_feat_modules()``: a WRN's final ``bn1`` is not one, so it stays frozen in eval mode while
    the last tap reads it); the connectors are frozen afterwards. ``loss`` returns ``{}``.
    Defaults: gamma 1, alpha 0, beta 1 (unused), margin 1, init_weight 1.

    Departures: connectors as RepDistiller (identity at equal shapes, else conv + BN without a bias, PyTorch's
    default init; ``connect_equal_shapes`` puts one on every tap); a student map smaller by a ratio other than 2
    uses a transposed conv where the reference raises. beta has no effect in the reference (its pre-training
    loop sums the AB terms without it and the main stage adds none), so it is unused here too and
    ``init_weight`` scales the init stage. Layers after the last paired tap get no init-stage gradient.
    """

    name = "ab"
    paper = (
        "Heo, Lee, Yun & Choi. Knowledge Transfer via Distillation of Activation Boundaries Formed by Hidden "
        "Neurons. AAAI 2019"
    )
    Config = ABConfig
    needs = frozenset({"preact"})

    def __init__(self, cfg: ABConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
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

    def ab_loss(self, student: ModelOutput, teacher: ModelOutput) -> torch.Tensor:
        """The reference ABLoss summed over taps (unweighted by beta or init_weight)."""
        m = self.cfg.margin
        total = None
        for w, conn, s, t in zip(self.layer_weights, self.connectors, student.preact[1:], teacher.preact[1:]):
            src = widen(conn(s))
            with torch.autocast(device_type=src.device.type, enabled=False):
                term = w * boundary_loss(src, widen(t), m) / src.shape[0] / 1000 * 3
            total = term if total is None else total + term
        assert total is not None, "AB found no tap pairs"
        return total

    def init_stage(self, student: nn.Module) -> InitStage:
        def stage_loss(s_out: ModelOutput, t_out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
            return {"ab": self.cfg.init_weight * self.ab_loss(s_out, t_out)}

        return InitStage(
            parameters=list(self.connectors.parameters()), loss=stage_loss, student_modules=student.feature_modules()
        )

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        return {}
