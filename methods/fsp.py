"""Flow of solution procedure (Yim et al. 2017): an init stage makes the student's Gram matrices between
consecutive feature maps match the teacher's; the main stage is cross-entropy only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdbench.errors import NotApplicable
from kdbench.losses import match_spatial
from kdbench.method import Batch, InitStage, Method, MethodConfig, MethodContext
from kdbench.models.base import ModelOutput


@dataclass
class FSPConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 50.0
    init_weight: float = 1.0


def fsp_matrix(bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
    """(B, C1, H, W), (B, C2, H', W') -> (B, C2, C1): G[b, j, i] = mean over pixels of top[b, j] * bottom[b, i].

    The larger of the two maps is adaptively average-pooled to the smaller one's size first.
    """
    bottom, top = match_spatial(bottom, top)
    h, w = bottom.shape[2:]
    return torch.bmm(top.flatten(2), bottom.flatten(2).transpose(1, 2)) / (h * w)


def fsp_matrices(feats: list[torch.Tensor]) -> list[torch.Tensor]:
    """The FSP matrix of every consecutive pair (feats[i], feats[i + 1])."""
    return [fsp_matrix(feats[i], feats[i + 1]) for i in range(len(feats) - 1)]


class FSP(Method):
    """FSP matrices of consecutive maps: a 30-epoch init stage on the FSP loss, then CE only (``loss`` is ``{}``).

    Taps: every map in ``feats`` (stem + all block groups, after ReLU; the reference's ``feat[:-1]``). For each
    consecutive pair (f_i, f_{i+1}) of one network, G_i = f_{i+1} f_i^T / (h w) per sample (``fsp_matrix``:
    C_{i+1} x C_i, the larger map of the pair pooled to the smaller). Init-stage loss, as the reference:
    sum_i mean((G_i^s - G_i^t)^2), the mean over batch and matrix entries, all pairs weighted equally.
    The init stage (``init_stage``: the protocol's ``init_epochs``, 30 in the paper protocol) trains every
    student parameter except its ``head`` (the reference's ``get_feat_modules()``); the main stage adds nothing
    to CE. There are no adapters, so the student and teacher must have the same channel count at every tap
    (else ``not_applicable``: "N/A" in the CRD tables, e.g. wrn_40_2 -> wrn_40_1); their spatial sizes may
    differ (the matrices are C x C). Defaults: gamma 1, alpha 0, beta 50, init_weight 1.0.

    Choices and departures:
    - Weights: the init-stage loss is multiplied by ``init_weight`` (default 1). The reference's pre-training
      loop (RepDistiller ``helper/pretrain.py``) sums the FSP groups WITHOUT beta, and its main stage adds no
      FSP term, so the published beta 50 has no effect there. We keep ``weight`` = 50 as the published setting
      and, like the reference, do not use it; ``init_weight=50`` gives the reading "beta scales the init stage"
      (50 times the reference's effective init-stage learning rate on this loss).
    - Every pair weighs 1 and the main stage is the task loss alone (the reference's two-stage schedule). Layers
      after the last tap (WRN's final BN, a final 1x1 conv before pooling) get no init-stage gradient.
    """

    name = "fsp"
    paper = (
        "Yim, Joo, Bae & Kim. A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and "
        "Transfer Learning. CVPR 2017"
    )
    url = "https://openaccess.thecvf.com/content_cvpr_2017/html/Yim_A_Gift_From_CVPR_2017_paper.html"
    Config = FSPConfig
    needs = frozenset({"feats"})

    @classmethod
    def not_applicable(cls, cfg: MethodConfig, ctx: MethodContext) -> str | None:
        if ctx.teacher is None:
            return "FSP needs a teacher"
        t_ch, s_ch = tuple(ctx.teacher.channels), tuple(ctx.student.channels)
        if t_ch != s_ch:
            return f"FSP needs equal channel counts at every tap: teacher {t_ch} vs student {s_ch}"
        if len(s_ch) < 2:
            return f"FSP needs at least two feature maps, the networks have {len(s_ch)}"
        return None

    def __init__(self, cfg: FSPConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        reason = self.not_applicable(cfg, ctx)
        if reason is not None:
            raise NotApplicable(reason)

    def bind_student(self, student: nn.Module) -> None:
        """Keep a reference to the student (not a submodule) so that the init stage can train its features."""
        object.__setattr__(self, "_student", student)

    def student_feature_parameters(self) -> list[nn.Parameter]:
        student = self.__dict__.get("_student")
        if student is None:
            raise RuntimeError("FSP.init_stage needs the student: call bind_student(student) first")
        head = getattr(student, "head", None)
        if head is None:
            head = self.ctx.student_head
        if head is None:
            raise RuntimeError("FSP.init_stage cannot tell the student's head from its feature layers")
        skip = {id(p) for p in head.parameters()}
        return [p for p in student.parameters() if id(p) not in skip]

    def fsp_loss(self, student: ModelOutput, teacher: ModelOutput) -> torch.Tensor:
        """sum over consecutive pairs of mean((G_s - G_t)^2) (unweighted by beta or init_weight)."""
        first = student.feats[0]
        with torch.autocast(device_type=first.device.type, enabled=False):
            g_s = fsp_matrices([f.float() for f in student.feats])
            g_t = fsp_matrices([f.float() for f in teacher.feats])
            return torch.stack([(s - t).pow(2).mean() for s, t in zip(g_s, g_t)]).sum()

    def init_stage(self) -> InitStage:
        def stage_loss(student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
            return {"fsp": self.cfg.init_weight * self.fsp_loss(student, teacher)}

        return InitStage(parameters=self.student_feature_parameters(), loss=stage_loss, epochs=None)

    def loss(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        return {}
