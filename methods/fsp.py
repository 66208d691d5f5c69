"""Flow of solution procedure (Yim et al. 2017): an init stage makes the student's Gram matrices between
consecutive feature maps match the teacher's; the main stage is cross-entropy only."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdbench.losses import match_spatial
from kdbench.method import Batch, InitStage, Method, MethodConfig, MethodContext, Progress
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
    """Init stage: L = init_weight * sum_i mean_{b,j,k} (G_i^s - G_i^t)^2,  G_i = f_{i+1} f_i^T / (h w); main: CE.

    Taps: every map in ``feats`` (stem + all block groups, after ReLU; the reference's ``feat[:-1]``); G_i is the
    C_{i+1} x C_i Gram matrix of each consecutive pair per sample (``fsp_matrix``, the larger map of a pair pooled
    to the smaller), all pairs weighted equally. The init stage (the protocol's ``init_epochs``) trains the
    student's ``feature_modules()`` (the reference's ``get_feat_modules()``); ``loss`` returns ``{}``. No adapters:
    the two networks need equal channel counts at every tap (else not applicable, "N/A" in the CRD tables).
    Defaults: gamma 1, alpha 0, beta 50 (unused), init_weight 1.

    Departures: none in the maths. beta has no effect in the reference (its pre-training loop sums the FSP terms
    without it and the main stage adds none): it is kept at the published 50 and unused; ``init_weight=50`` gives
    the reading "beta scales the init stage". Layers after the last tap get no init-stage gradient.
    """

    name = "fsp"
    paper = (
        "Yim, Joo, Bae & Kim. A Gift from Knowledge Distillation: Fast Optimization, Network Minimization and "
        "Transfer Learning. CVPR 2017"
    )
    Config = FSPConfig
    needs = frozenset({"feats"})

    @classmethod
    def not_applicable(cls, cfg: MethodConfig, ctx: MethodContext) -> str | None:
        t_ch, s_ch = tuple(ctx.teacher.channels), tuple(ctx.student.channels)
        if t_ch != s_ch:
            return f"FSP needs equal channel counts at every tap: teacher {t_ch} vs student {s_ch}"
        if len(s_ch) < 2:
            return f"FSP needs at least two feature maps, the networks have {len(s_ch)}"
        return None

    def fsp_loss(self, student: ModelOutput, teacher: ModelOutput) -> torch.Tensor:
        """sum over consecutive pairs of mean((G_s - G_t)^2) (unweighted by beta or init_weight)."""
        first = student.feats[0]
        with torch.autocast(device_type=first.device.type, enabled=False):
            g_s = fsp_matrices([f.float() for f in student.feats])
            g_t = fsp_matrices([f.float() for f in teacher.feats])
            return torch.stack([(s - t).pow(2).mean() for s, t in zip(g_s, g_t)]).sum()

    def init_stage(self, student: nn.Module) -> InitStage:
        def stage_loss(s_out: ModelOutput, t_out: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
            return {"fsp": self.cfg.init_weight * self.fsp_loss(s_out, t_out)}

        return InitStage(parameters=[], loss=stage_loss, student_modules=student.feature_modules())

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        return {}
