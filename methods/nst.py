"""Neuron selectivity transfer (Huang & Wang 2017): MMD between the distributions of channel activation maps."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.losses import match_spatial
from kdbench.method import Batch, Method, MethodConfig, Progress
from kdbench.models.base import ModelOutput


@dataclass
class NSTConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 50.0
    kernel_degree: int = 2
    kernel_offset: float = 0.0

    RANGES = {**MethodConfig.RANGES, "kernel_degree": ">=1"}


def poly_kernel_mean(a: torch.Tensor, b: torch.Tensor, degree: int, offset: float) -> torch.Tensor:
    """Mean over the batch and all channel pairs of (a_i . b_j + offset)^degree; a: (B, Ca, N), b: (B, Cb, N)."""
    return (torch.bmm(a, b.transpose(1, 2)) + offset).pow(degree).mean()


class NST(Method):
    """L = gamma CE + beta * sum_l [k(t, t') + k(s, s') - 2 k(s, t)],  k(x, y) = mean (x . y + c)^d.

    Taps: ``feats[1:]`` of both networks (the reference's ``feat[1:-1]``), paired by index. At a tap each
    channel's H x W map is flattened and L2-normalised; the means run over the batch and all channel pairs (a
    network's channels are the samples of a distribution; the squared MMD with a polynomial kernel of degree
    d = ``kernel_degree`` = 2 and offset c = ``kernel_offset`` = 0). The teacher-teacher term is a constant, kept
    (the reference's "full loss") so that the term is zero on identical maps. Defaults: gamma 1, alpha 0, beta 50,
    d 2, c 0.

    Departures: none from the reference code (RepDistiller). Channel counts may differ; a larger map is adaptively
    average-pooled to the smaller size first; extra trailing block groups of the longer network are ignored.
    """

    name = "nst"
    paper = "Huang & Wang. Like What You Like: Knowledge Distill via Neuron Selectivity Transfer. arXiv 2017"
    Config = NSTConfig
    needs = frozenset({"feats"})

    def loss(
        self, student: ModelOutput, teacher: ModelOutput, batch: Batch, progress: Progress
    ) -> dict[str, torch.Tensor]:
        d, c = self.cfg.kernel_degree, self.cfg.kernel_offset
        first = student.feats[1]
        with torch.autocast(device_type=first.device.type, enabled=False):
            total = first.new_zeros((), dtype=torch.float32)
            for f_s, f_t in zip(student.feats[1:], teacher.feats[1:]):
                f_s, f_t = match_spatial(f_s.float(), f_t.float())
                s = F.normalize(f_s.flatten(2), dim=2)
                t = F.normalize(f_t.flatten(2), dim=2)
                mmd = (
                    poly_kernel_mean(t, t, d, c).detach()
                    + poly_kernel_mean(s, s, d, c)
                    - 2.0 * poly_kernel_mean(s, t, d, c)
                )
                total = total + mmd
        return {"nst": self.cfg.weight * total}
