"""Attention transfer (Zagoruyko & Komodakis 2017): match normalised spatial attention maps layer by layer."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kdbench.losses import match_spatial
from kdbench.method import Batch, Method, MethodConfig
from kdbench.models.base import ModelOutput


@dataclass
class ATConfig(MethodConfig):
    ce_weight: float = 1.0
    kd_weight: float = 0.0
    weight: float = 1000.0
    attention_power: float = 2.0

    RANGES = {**MethodConfig.RANGES, "attention_power": ">0"}


def attention_map(f: torch.Tensor, power: float) -> torch.Tensor:
    """(B, C, H, W) -> (B, H*W): the channel mean of f**power, L2-normalised over the pixels."""
    return F.normalize(f.pow(power).mean(dim=1).flatten(1), dim=1)


class AT(Method):
    """Attention transfer on every block-group output: loss = 1 CE + 1000 sum_l mean((a_s^l - a_t^l)^2).

    Taps: ``feats[1:]`` of both networks (the reference's ``feat[1:-1]``: the outputs of the block groups,
    after ReLU; the stem is not used). Attention map of a (B, C, H, W) map: the mean over channels of f^p
    (p = ``attention_power`` = 2), flattened and L2-normalised over the H*W pixels. Per layer: the mean over
    batch and pixels of the squared difference of the two attention maps (the reference's formula, not the
    paper's norm of the difference); summed over layers. Defaults: gamma 1, alpha 0, beta 1000, p 2.

    Choices, following the reference code (HobbitLong/RepDistiller):
    - Spatial sizes that differ at a tap (cross-architecture pairs): the larger map is adaptively
      average-pooled to the smaller size before its attention map is taken.
    - Student and teacher taps are paired by index from the first block group; when one network has more
      block groups (VGG, ResNet50 and MobileNetV2 have four, the CIFAR ResNets and WRNs three), the extra
      trailing maps of the longer list are ignored (the reference's ``zip``).
    Channel counts never need to match: the attention map averages over channels.
    """

    name = "at"
    paper = (
        "Zagoruyko & Komodakis. Paying More Attention to Attention: Improving the Performance of Convolutional "
        "Neural Networks via Attention Transfer. ICLR 2017"
    )
    url = "https://arxiv.org/abs/1612.03928"
    Config = ATConfig
    needs = frozenset({"feats"})

    def loss(self, student: ModelOutput, teacher: ModelOutput, batch: Batch) -> dict[str, torch.Tensor]:
        p = self.cfg.attention_power
        first = student.feats[1]
        with torch.autocast(device_type=first.device.type, enabled=False):
            total = first.new_zeros((), dtype=torch.float32)
            for f_s, f_t in zip(student.feats[1:], teacher.feats[1:]):
                f_s, f_t = match_spatial(f_s.float(), f_t.float())
                total = total + (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()
        return {"at": self.cfg.weight * total}
