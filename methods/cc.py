"""Correlation congruence (Peng et al. 2019), in the form of the reference code used by the CRD benchmark."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kdbench.method import Batch, Method, MethodConfig, MethodContext, Progress
from kdbench.models.base import ModelOutput


@dataclass
class CCConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 0.02
    embed_dim: int = 128

    RANGES = {**MethodConfig.RANGES, "embed_dim": ">=1"}


def correlation_congruence(e_s: torch.Tensor, e_t: torch.Tensor) -> torch.Tensor:
    """Mean over consecutive sample pairs (i, i+1) of sum_k |e_s - e_t|[i, k] * |e_s - e_t|[i+1, k].

    A batch of one sample has no pair: the term is zero.
    """
    delta = (e_s - e_t).abs()
    if delta.shape[0] < 2:
        return delta.sum() * 0.0
    return (delta[:-1] * delta[1:]).sum(dim=1).mean()


class CC(Method):
    """L = gamma CE + beta * mean_{i} sum_k d[i, k] d[i+1, k],  d = |W_s p_s + b_s - (W_t p_t + b_t)|.

    Taps: ``pooled`` of both networks (the reference's ``feat[-1]``). ``embed_s`` / ``embed_t``: trainable linear
    layers (with bias) from each pooled dimension to ``embed_dim`` = 128, both optimised with the student. The mean
    runs over the b - 1 consecutive pairs of rows (i, i + 1) of d. Defaults: gamma 1, alpha 0, beta 0.02,
    embed_dim 128.

    Departures: this is the reference code's form (RepDistiller, code sent by the CC authors), which the CRD
    table's numbers come from; the paper's Gaussian-RBF correlation matrices (Taylor-expanded) are not
    implemented. The term is zero when e_s == e_t, but also whenever consecutive rows of d have disjoint
    supports. A batch of one sample gives 0 (no pair; the reference gives NaN).
    """

    name = "cc"
    paper = "Peng, Jin, Liu, Li, Wu, Liu, Zhou & Zhang. Correlation Congruence for Knowledge Distillation. ICCV 2019"
    Config = CCConfig
    needs = frozenset({"pooled"})
    couples_batch = True
    couples_batch_why = "its correlation congruence is over pairs of rows of the batch"

    def __init__(self, cfg: CCConfig, ctx: MethodContext):
        super().__init__(cfg, ctx)
        self.embed_s = nn.Linear(ctx.student.pooled_dim, cfg.embed_dim)
        self.embed_t = nn.Linear(ctx.teacher.pooled_dim, cfg.embed_dim)

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        e_s = self.embed_s(student.pooled.flatten(1))
        e_t = self.embed_t(teacher.pooled.flatten(1))
        with torch.autocast(device_type=e_s.device.type, enabled=False):
            cc = correlation_congruence(e_s.float(), e_t.float())
        return {"cc": self.cfg.weight * cc}
