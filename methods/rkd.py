"""Relational KD (Park et al. 2019): match pairwise distances and triplet angles of the pooled features."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.method import Batch, Method, MethodConfig, Progress
from kdbench.models.base import ModelOutput


@dataclass
class RKDConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 1.0
    distance_weight: float = 25.0
    angle_weight: float = 50.0


def normalized_distances(e: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(B, D) -> (B, B) Euclidean distances divided by their mean over the non-zero (off-diagonal) pairs.

    Squared distances are clamped at ``eps`` before the square root (a finite gradient for coincident
    points), and the diagonal is set to exactly zero.
    """
    sq = e.pow(2).sum(dim=1)
    d = (sq.unsqueeze(1) + sq.unsqueeze(0) - 2.0 * (e @ e.t())).clamp(min=eps).sqrt()
    d = d.masked_fill(torch.eye(e.shape[0], dtype=torch.bool, device=e.device), 0.0)
    return d / (d.sum() / (d > 0).sum())  # the mean of the positive entries, without a host sync


def triplet_angles(e: torch.Tensor) -> torch.Tensor:
    """(B, D) -> (B*B*B,): cos of the angle at e_i between e_j - e_i and e_k - e_i, for every (i, j, k).

    Degenerate triplets (j == i or k == i) give a zero vector, whose normalisation is zero, so their cosine
    is zero on both sides (as in the reference).
    """
    u = F.normalize(e.unsqueeze(0) - e.unsqueeze(1), p=2, dim=2)  # u[i, j] = unit(e_j - e_i)
    return torch.bmm(u, u.transpose(1, 2)).flatten()


class RKD(Method):
    """L = gamma CE + beta * (w_d * huber(psi_D(s), psi_D(t)) + w_a * huber(psi_A(s), psi_A(t))).

    psi_D: the pairwise Euclidean distances of the batch divided by their mean over the non-zero pairs
    (``normalized_distances``); psi_A: the cosine of the angle at e_i between e_j - e_i and e_k - e_i for every
    triplet (``triplet_angles``); huber = smooth-L1 with threshold 1, the mean over all b^2 / b^3 entries.
    Taps: ``pooled`` of both networks (the reference's ``feat[-1]``); no adapter. Teacher relations carry no
    gradient. Returned terms: ``rkd_distance`` (beta w_d L_D) and ``rkd_angle`` (beta w_a L_A).
    Defaults: gamma 1, alpha 0, beta 1, w_d = distance_weight 25, w_a = angle_weight 50.

    Departures: none from the reference code (RepDistiller), including its eps = 1e-12 clamp of the squared
    distances and the degenerate pairs / triplets in the means. A batch of one sample gives 0 (the reference NaN).
    """

    name = "rkd"
    paper = "Park, Kim, Lu & Cho. Relational Knowledge Distillation. CVPR 2019"
    Config = RKDConfig
    needs = frozenset({"pooled"})
    couples_batch = True
    couples_batch_why = "its distances and angles are between the rows of the batch"

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        cfg = self.cfg
        p_s = student.pooled
        with torch.autocast(device_type=p_s.device.type, enabled=False):
            e_s = p_s.float().flatten(1)
            e_t = teacher.pooled.float().flatten(1).detach()
            if e_s.shape[0] < 2:
                zero = e_s.sum() * 0.0
                return {"rkd_distance": zero, "rkd_angle": zero}
            with torch.no_grad():
                d_t = normalized_distances(e_t)
                a_t = triplet_angles(e_t)
            loss_d = F.smooth_l1_loss(normalized_distances(e_s), d_t)
            loss_a = F.smooth_l1_loss(triplet_angles(e_s), a_t)
        return {
            "rkd_distance": cfg.weight * cfg.distance_weight * loss_d,
            "rkd_angle": cfg.weight * cfg.angle_weight * loss_a,
        }
