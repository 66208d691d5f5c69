"""Similarity-preserving KD (Tung & Mori 2019): match the batch's pairwise-similarity (Gram) matrices."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.method import Batch, Method, MethodConfig
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
    """Similarity preserving on the last feature map: loss = 1 CE + 3000 ||G_s - G_t||_F^2 / b^2.

    Taps: ``feats[-1]`` of both networks (the last map before pooling, the reference's ``feat[-2]``).
    Each map is flattened per sample to a (b, C*H*W) matrix f; G = f f^T (b x b) with every row L2-normalised;
    the loss is the squared Frobenius norm of G_s - G_t divided by b^2, as in the reference code
    (HobbitLong/RepDistiller, which the paper's author checked) and the paper. Defaults: gamma 1, alpha 0,
    beta 3000.

    Because the Gram matrices are b x b, the channel counts and spatial sizes of the two maps never need to
    match (cross-architecture pairs work unchanged). Scaling a network's features by a positive constant
    leaves the loss unchanged (row normalisation).
    """

    name = "sp"
    paper = "Tung & Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019"
    url = "https://arxiv.org/abs/1907.09682"
    Config = SPConfig
    needs = frozenset({"feats"})

    def loss(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        f_s, f_t = student.feats[-1], teacher.feats[-1]
        with torch.autocast(device_type=f_s.device.type, enabled=False):
            b = f_s.shape[0]
            diff = similarity_matrix(f_s.float()) - similarity_matrix(f_t.float())
            sp = diff.pow(2).sum() / (b * b)
        return {"sp": self.cfg.weight * sp}
