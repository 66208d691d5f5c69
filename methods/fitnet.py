"""FitNets (Romero et al. 2015): regress the teacher's hint-layer map from the student's through a conv regressor."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.errors import NotApplicable
from kdbench.method import Batch, Method, MethodConfig, MethodContext
from kdbench.models.base import ModelOutput


@dataclass
class FitNetConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 100.0
    hint_layer: int = 2

    RANGES = {**MethodConfig.RANGES, "hint_layer": ">=0"}


def make_regressor(s_channels: int, s_size: int, t_channels: int, t_size: int) -> nn.Module:
    """The conv that maps a (s_channels, s_size, s_size) map onto (t_channels, t_size, t_size).

    Same rule as the reference regressor: a 3x3 stride-2 conv when the student map is twice the teacher's,
    a 4x4 stride-2 transposed conv when it is half, else a valid conv of kernel 1 + s - t (1x1 when equal).
    The reference fails for a student map smaller than the teacher's by any other ratio; we mirror its valid
    conv with a stride-1 transposed conv of kernel 1 + t - s, which grows the map by exactly t - s.
    """
    if s_size == 2 * t_size:
        return nn.Conv2d(s_channels, t_channels, kernel_size=3, stride=2, padding=1)
    if 2 * s_size == t_size:
        return nn.ConvTranspose2d(s_channels, t_channels, kernel_size=4, stride=2, padding=1)
    if s_size >= t_size:
        return nn.Conv2d(s_channels, t_channels, kernel_size=1 + s_size - t_size)
    return nn.ConvTranspose2d(s_channels, t_channels, kernel_size=1 + t_size - s_size)


class FitNet(Method):
    """FitNet hints, single stage as in the CRD benchmark: loss = 1 CE + 100 MSE(regressor(s_hint), t_hint).

    Taps: ``feats[hint_layer]`` of both networks (default 2, the output of the second block group; the
    reference's ``feat[2]``).
    Regressor (``self.regressor``, trained with the student): conv (see ``make_regressor`` for the rule that
    picks it from the two spatial sizes at the run's image size) + BatchNorm + ReLU, mapping the student's map
    to the teacher's channels and size. Loss: mean squared error over all elements (batch, channels, pixels),
    as the reference's ``nn.MSELoss``. Defaults: gamma 1, alpha 0, beta 100, hint_layer 2.

    Choices and departures from the reference code (HobbitLong/RepDistiller):
    - The reference regressor raises for a student map smaller than the teacher's by a ratio other than 2
      (and, as written, raises a TypeError rather than its intended NotImplementedError); we use a transposed
      conv of kernel 1 + t - s there instead (documented in ``make_regressor``).
    - A ``hint_layer`` that one of the two networks does not have makes the pair not applicable.
    - The original paper's two-stage schedule (pre-train up to the hint, then KD) is not used; the CRD
      benchmark trains FitNet in one stage with CE, and so do we.
    """

    name = "fitnet"
    paper = (
        "Romero, Ballas, Ebrahimi Kahou, Chassang, Gatta & Bengio. FitNets: Hints for Thin Deep Nets. ICLR 2015"
    )
    url = "https://arxiv.org/abs/1412.6550"
    Config = FitNetConfig
    needs = frozenset({"feats"})

    @classmethod
    def not_applicable(cls, cfg: MethodConfig, ctx: MethodContext) -> str | None:
        layer = getattr(cfg, "hint_layer", 2)
        if ctx.teacher is None:
            return "FitNet needs a teacher"
        for side, info in (("student", ctx.student), ("teacher", ctx.teacher)):
            if not 0 <= layer < len(info.channels):
                return f"hint_layer {layer} does not exist in the {side} ({len(info.channels)} feature maps)"
        return None

    def __init__(self, cfg: FitNetConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        reason = self.not_applicable(cfg, ctx)
        if reason is not None:
            raise NotApplicable(reason)
        assert ctx.teacher is not None
        i = cfg.hint_layer
        s_size = ctx.student.spatial(i, ctx.image_size)
        t_size = ctx.teacher.spatial(i, ctx.image_size)
        t_channels = ctx.teacher.channels[i]
        self.regressor = nn.Sequential(
            make_regressor(ctx.student.channels[i], s_size, t_channels, t_size),
            nn.BatchNorm2d(t_channels),
            nn.ReLU(inplace=True),
        )

    def loss(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        i = self.cfg.hint_layer
        f_s = self.regressor(student.feats[i])
        f_t = teacher.feats[i]
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            hint = F.mse_loss(f_s.float(), f_t.float())
        return {"fitnet": self.cfg.weight * hint}
