"""Similarity-preserving KD (Tung & Mori 2019): match the batch's pairwise-similarity (Gram) matrices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.method import Batch, Method, MethodConfig, Progress
from kdbench.models.base import ModelOutput


@dataclass
class SPConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 3000.0


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """(B, ...) -> (B, B): the Gram matrix of the flattened samples with each row L2-normalised."""
    flat = f.flatten(1)
    return F.normalize(flat @ flat.t(), dim=1)


class SP(Method):
    """L = gamma CE + beta * ||G_s - G_t||_F^2 / b^2,  G = row-normalize(f f^T), f the (b, C*H*W) flattened map.

    Taps: ``feats[-1]`` of both networks (the last map before pooling; the reference's ``feat[-2]``). The Gram
    matrices are b x b, so channel counts and spatial sizes never need to match, and scaling a network's features
    by a positive constant leaves the loss unchanged. Defaults: gamma 1, alpha 0, beta 3000.

    Departures: none from the paper or the reference code (RepDistiller, checked by the paper's author).
    """

    name = "sp"
    paper = "Tung & Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019"
    Config = SPConfig
    needs = frozenset({"feats"})
    couples_batch = True
    couples_batch_why = "its similarity matrix is over the rows of the batch"

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        f_s, f_t = student.feats[-1], teacher.feats[-1]
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            b = f_s.shape[0]
            diff = similarity_matrix(f_s.float()) - similarity_matrix(f_t.float())
            sp = diff.pow(2).sum() / (b * b)
        return {"sp": self.cfg.weight * sp}
