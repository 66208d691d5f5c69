"""FitNets (Romero et al. 2015): regress the teacher's hint-layer map from the student's through a conv regressor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.losses import widen
from kdbench.method import Batch, Method, MethodConfig, MethodContext, Progress
from kdbench.method_parts import regressor_conv
from kdbench.models.base import ModelOutput


@dataclass
class FitNetConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 100.0
    hint_layer: int = 2

    RANGES = {**MethodConfig.RANGES, "hint_layer": ">=0"}


class FitNet(Method):
    """L = gamma CE + beta * mean (relu(BN(conv(f_s^h))) - f_t^h)^2, the mean over batch, channels and pixels.

    Taps: ``feats[hint_layer]`` of both networks (default 2, the second block group's output; the reference's
    ``feat[2]``). ``self.regressor``: conv (``regressor_conv``, picked from the two spatial sizes at the run's
    image size, with a bias) + BatchNorm + ReLU onto the teacher's channels and size, trained with the student.
    Defaults: gamma 1, alpha 0, beta 100, hint_layer 2.

    Departures: single stage, as the CRD benchmark (the paper pre-trains up to the hint first). Where the
    reference regressor raises (a student map smaller by a ratio other than 2), ``regressor_conv`` uses a
    transposed conv. A ``hint_layer`` that one network lacks makes the pair not applicable.
    """

    name = "fitnet"
    paper = "Romero, Ballas, Ebrahimi Kahou, Chassang, Gatta & Bengio. FitNets: Hints for Thin Deep Nets. ICLR 2015"
    Config = FitNetConfig
    needs = frozenset({"feats"})

    @classmethod
    def not_applicable(cls, cfg: MethodConfig, ctx: MethodContext) -> str | None:
        layer = getattr(cfg, "hint_layer", 2)
        for side, info in (("student", ctx.student), ("teacher", ctx.teacher)):
            if not 0 <= layer < len(info.channels):
                return f"hint_layer {layer} does not exist in the {side} ({len(info.channels)} feature maps)"
        return None

    def __init__(self, cfg: FitNetConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        i = cfg.hint_layer
        s_size = ctx.student.spatial(i, ctx.image_size)
        t_size = ctx.teacher.spatial(i, ctx.image_size)
        t_channels = ctx.teacher.channels[i]
        self.regressor = nn.Sequential(
            regressor_conv(ctx.student.channels[i], s_size, t_channels, t_size, bias=True),
            nn.BatchNorm2d(t_channels),
            nn.ReLU(inplace=True),
        )

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        i = self.cfg.hint_layer
        f_s = self.regressor(student.feats[i])
        f_t = teacher.feats[i]
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            hint = F.mse_loss(widen(f_s), widen(f_t))
        return {"fitnet": self.cfg.weight * hint}
