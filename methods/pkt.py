"""Probabilistic knowledge transfer (Passalis & Tefas 2018): match cosine-kernel conditional distributions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench.method import Batch, Method, MethodConfig, Progress
from kdbench.models.base import ModelOutput


@dataclass
class PKTConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 30000.0
    eps: float = 1e-7

    RANGES = {**MethodConfig.RANGES, "eps": ">0"}


def conditional_probabilities(f: torch.Tensor, eps: float) -> torch.Tensor:
    """(B, D) -> (B, B): the cosine kernel mapped to [0, 1] by (cos + 1) / 2, each row divided by its sum.

    Vectors are divided by (norm + eps); a NaN produced there (NaN input) is replaced by zero.
    """
    unit = f / (f.norm(dim=1, keepdim=True) + eps)
    unit = torch.where(torch.isnan(unit), torch.zeros_like(unit), unit)
    k = (unit @ unit.t() + 1.0) / 2.0
    return k / k.sum(dim=1, keepdim=True)


class PKT(Method):
    """L = gamma CE + beta * mean_{i,j} P_t[i, j] log((P_t[i, j] + eps) / (P_s[i, j] + eps)).

    P[i, j] = k(i, j) / sum_j k(i, j) with k = (cos(p_i, p_j) + 1) / 2 over the batch (``conditional_probabilities``).
    Taps: ``pooled`` of both networks (the reference's ``feat[-1]``); no adapter, the pooled dimensions need not
    match. The mean runs over all b^2 entries (the per-row KL divided by b), the scale beta = 30000 is tuned for.
    Defaults: gamma 1, alpha 0, beta 30000, eps 1e-7 (also guarding the normalisation, as the reference).

    Departures: none from the reference code (RepDistiller, taken from the author's code).
    """

    name = "pkt"
    paper = "Passalis & Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer. ECCV 2018"
    Config = PKTConfig
    needs = frozenset({"pooled"})
    couples_batch = True
    couples_batch_why = "its kernel densities are over the rows of the batch"

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        eps = self.cfg.eps
        p_s = student.pooled
        with torch.autocast(device_type=p_s.device.type, enabled=False):
            q_s = conditional_probabilities(p_s.float().flatten(1), eps)
            q_t = conditional_probabilities(teacher.pooled.float().flatten(1), eps)
            pkt = (q_t * torch.log((q_t + eps) / (q_s + eps))).mean()
        return {"pkt": self.cfg.weight * pkt}
