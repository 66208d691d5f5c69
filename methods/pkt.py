"""Probabilistic knowledge transfer (Passalis & Tefas 2018): match cosine-kernel conditional distributions."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdbench.method import Batch, Method, MethodConfig
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
    """PKT on the pooled features: loss = 1 CE + 30000 KL(P_t || P_s), averaged over the b^2 entries.

    Taps: ``pooled`` of both networks (the reference's ``feat[-1]``); no adapter, so the two pooled dimensions
    need not match. For each network: the cosine similarities of all sample pairs of the batch, mapped to
    [0, 1] as (cos + 1) / 2, each row divided by its sum (the conditional probability P(j | i)). Loss:
    mean over all b^2 entries of P_t * log((P_t + eps) / (P_s + eps)), with eps = 1e-7 also used when the
    vectors are normalised, as in the reference code (HobbitLong/RepDistiller, taken from the author's code).
    Note the reference takes the mean over all b^2 entries, i.e. the per-row KL divergence divided by b (not
    summed over j); beta = 30000 is tuned for that scale. Defaults: gamma 1, alpha 0, beta 30000, eps 1e-7.
    """

    name = "pkt"
    paper = (
        "Passalis & Tefas. Learning Deep Representations with Probabilistic Knowledge Transfer. ECCV 2018"
    )
    url = "https://arxiv.org/abs/1803.10837"
    Config = PKTConfig
    needs = frozenset({"pooled"})

    def loss(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        eps = self.cfg.eps
        p_s = student.pooled
        with torch.autocast(device_type=p_s.device.type, enabled=False):
            q_s = conditional_probabilities(p_s.float().flatten(1), eps)
            q_t = conditional_probabilities(teacher.pooled.float().flatten(1), eps)
            pkt = (q_t * torch.log((q_t + eps) / (q_s + eps))).mean()
        return {"pkt": self.cfg.weight * pkt}
