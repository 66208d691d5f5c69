"""SimKD (Chen et al., CVPR 2022): the student's last feature map, projected, is classified by the reused teacher's
frozen classifier; training aligns the projected map with the teacher's."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.method import Batch, Method, MethodConfig, MethodContext, Progress
from kdbench.models.base import ModelOutput


@dataclass
class SimKDConfig(MethodConfig):
    ce_weight: float = 0.0  # the reference's -c 0 -d 0 -b 1: the feature loss alone
    kd_weight: float = 0.0
    weight: float = 1.0
    factor: int = 2  # bottleneck width of the projector: teacher channels / factor

    RANGES = {**MethodConfig.RANGES, "factor": ">=1"}


def projector(s_channels: int, t_channels: int, factor: int) -> nn.Sequential:
    """1x1 conv to t/f channels, BN, ReLU, 3x3 conv, BN, ReLU, 1x1 conv to t channels, BN, ReLU (no conv bias)."""
    mid = max(t_channels // factor, 1)
    return nn.Sequential(
        nn.Conv2d(s_channels, mid, kernel_size=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, mid, kernel_size=3, padding=1, bias=False),
        nn.BatchNorm2d(mid),
        nn.ReLU(inplace=True),
        nn.Conv2d(mid, t_channels, kernel_size=1, bias=False),
        nn.BatchNorm2d(t_channels),
        nn.ReLU(inplace=True),
    )


class SimKDModel(nn.Module):
    """The student's backbone, SimKD's projector and the teacher's frozen classifier (the student's own head unused)."""

    student_prefix = "student."

    def __init__(self, student: nn.Module, method: SimKD):
        super().__init__()
        self.student = student
        self.projector = method.projector
        self.classifier = method.ctx.teacher_head
        self.method_ref = [method]  # a plain list: the method is not a submodule of this model
        # Held but unused at inference (not counted in the evaluated model's size); a plain list, not registered.
        self.unused_modules = [student.head]
        self.training = student.training  # the mode predict() restores after evaluating

    def train(self, mode: bool = True) -> SimKDModel:
        self.training = mode
        self.student.train(mode)
        self.projector.train(mode)
        return self  # the teacher's classifier keeps its mode (eval: it belongs to the frozen teacher)

    def forward(self, x: torch.Tensor) -> ModelOutput:
        out = self.student(x)
        proj = self.projector(self.method_ref[0].align_student(out.feats[-1]))
        pooled = torch.flatten(F.adaptive_avg_pool2d(proj, 1), 1)
        return ModelOutput(logits=self.classifier(pooled), feats=out.feats, preact=out.preact, pooled=pooled)


class SimKD(Method):
    """SimKD: loss = 1 * MSE(P(f_s), f_t); prediction = W_t(avgpool(P(f_s))) with the teacher's classifier W_t.

    Taps: ``feats[-1]`` (the last map before pooling; the reference's ``feat[-2]``) of both networks. Spatial
    alignment: the larger of the two maps is adaptively average-pooled to the smaller size (the student's at
    training and at test time, where the teacher's size is known from the context). P (``self.projector``) is
    1x1 conv -> BN -> ReLU -> 3x3 conv -> BN -> ReLU -> 1x1 conv -> BN -> ReLU, from the student's channels to
    the teacher's through teacher/factor channels (factor 2, the paper's main setting). MSE is the mean over all
    elements (``nn.MSELoss``). CE and KD weights are 0 (the reference's ``-c 0 -d 0 -b 1``).

    Evaluation: the harness evaluates, reports and saves ``evaluated_model`` (``SimKDModel``: student backbone,
    projector and the teacher's frozen classifier), and records its parameter count; the student's own
    classifier is never trained by this loss and is not part of the evaluated model's count.

    Departures (choices left open):
    - The student's own linear head gets no gradient (CE weight 0, as in the reference), so SGD skips it: it is
      neither trained nor decayed and keeps its initial weights (the reference decays it through a zero gradient;
      it is unused at inference either way, so no metric changes). It is kept in the saved weights (under
      ``student.``) so a probe can load the student.
    - A student map smaller than the teacher's is matched by pooling the teacher's (the reference's rule); a
      larger one is pooled to the teacher's size, also at test time.
    - The teacher's classifier is reused in place (never copied, never optimised): it is held by the context, not
      registered in the method.
    """

    name = "simkd"
    paper = "Chen, Mei, Zhang, Wang, Feng & Chen. Knowledge Distillation with the Reused Teacher Classifier. CVPR 2022"
    Config = SimKDConfig
    needs = frozenset({"feats"})

    @classmethod
    def not_applicable(cls, cfg: MethodConfig, ctx: MethodContext) -> str | None:
        if ctx.teacher_head is None:
            return "SimKD needs the teacher's classifier"
        if ctx.teacher.num_classes != ctx.num_classes:
            return "SimKD reuses the teacher's classifier: the class counts differ"
        return None

    def __init__(self, cfg: SimKDConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.s_size = ctx.student.spatial(-1, ctx.image_size)
        self.t_size = ctx.teacher.spatial(-1, ctx.image_size)
        self.projector = projector(ctx.student.channels[-1], ctx.teacher.channels[-1], cfg.factor)

    def align_student(self, f_s: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(f_s, self.t_size) if f_s.shape[-1] > self.t_size else f_s

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        f_s, f_t = student.feats[-1], teacher.feats[-1].detach()
        if f_s.shape[-1] > f_t.shape[-1]:
            f_s = F.adaptive_avg_pool2d(f_s, f_t.shape[-2:])
        elif f_s.shape[-1] < f_t.shape[-1]:
            f_t = F.adaptive_avg_pool2d(f_t, f_s.shape[-2:])
        p = self.projector(f_s)
        with torch.autocast(device_type=p.device.type, enabled=False):
            return {"simkd": self.cfg.weight * F.mse_loss(p.float(), f_t.float())}

    def evaluated_model(self, student: nn.Module) -> nn.Module:
        return SimKDModel(student, self)
