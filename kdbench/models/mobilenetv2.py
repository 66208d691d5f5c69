"""MobileNetV2 (Sandler et al. 2018) as used for CIFAR in the CRD benchmark (RepDistiller ``mobile_half``:
width multiplier 0.5, expansion 6, a stride-2 stem).

Names follow the reference (``conv1``, ``blocks.i.j.conv.k``, ``conv2``, ``classifier.0``) so that its
checkpoints load key for key.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel, register_model
from kdbench.models.resnet import relu_keeping

# (expansion, channels, blocks, first stride); None stands for the model's expansion factor.
_SETTING: list[tuple[int | None, int, int, int]] = [
    (1, 16, 1, 1),
    (None, 24, 2, 1),
    (None, 32, 3, 2),
    (None, 64, 4, 2),
    (None, 96, 3, 1),
    (None, 160, 3, 2),
    (None, 320, 1, 1),
]
# Indices of the block groups whose outputs are the reference's feature taps 1..4.
_TAPS = (1, 2, 4, 6)


def _conv_bn_relu(inp: int, oup: int, kernel_size: int, stride: int, inplace: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, oup, kernel_size, stride, kernel_size // 2, bias=False),
        nn.BatchNorm2d(oup),
        nn.ReLU(inplace=inplace),
    )


class InvertedResidual(nn.Module):
    """1x1 expand-BN-ReLU, 3x3 depthwise-BN-ReLU, 1x1 linear projection-BN; residual when shapes agree.

    There is no ReLU after the projection (a linear bottleneck), so the block output is its own
    pre-activation.
    """

    def __init__(self, inp: int, oup: int, stride: int, expand_ratio: int) -> None:
        super().__init__()
        hidden = inp * expand_ratio
        self.use_res_connect = stride == 1 and inp == oup
        self.conv = nn.Sequential(
            nn.Conv2d(inp, hidden, 1, 1, 0, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden),
            nn.ReLU(inplace=True),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv(x)
        return x + out if self.use_res_connect else out


class MobileNetV2(ZooModel):
    def __init__(self, expansion: int, width_mult: float, num_classes: int = 100) -> None:
        super().__init__()
        input_channel = int(32 * width_mult)
        stem_channels = input_channel
        # forward applies the stem's ReLU through relu_keeping (in place unless preact[0] is asked for).
        self.conv1 = _conv_bn_relu(3, input_channel, 3, 2, inplace=False)
        self.blocks = nn.ModuleList()
        group_channels = []
        for t, c, n, s in _SETTING:
            output_channel = int(c * width_mult)
            layers = []
            for i in range(n):
                layers.append(InvertedResidual(input_channel, output_channel, s if i == 0 else 1, t or expansion))
                input_channel = output_channel
            self.blocks.append(nn.Sequential(*layers))
            group_channels.append(output_channel)
        self.last_channel = int(1280 * width_mult) if width_mult > 1.0 else 1280
        self.conv2 = _conv_bn_relu(input_channel, self.last_channel, 1, 1)
        self.classifier = nn.Sequential(nn.Linear(self.last_channel, num_classes))
        self.feature_info = FeatureInfo(
            channels=(stem_channels, *(group_channels[i] for i in _TAPS)),
            reduction=(2, 2, 4, 8, 16),
            pooled_dim=self.last_channel,
            num_classes=num_classes,
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Linear:
        return self.classifier[0]

    def feature_modules(self) -> list[nn.Module]:
        """The stem and the inverted-residual groups, as the reference's ``get_feat_modules()`` (not ``conv2``)."""
        return [self.conv1, self.blocks]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        # The reference has no preact=True path for this model. preact[0] is the stem's BN output before its
        # ReLU (the reference's stem tap is relu(preact[0])); taps 1-4 end in a linear bottleneck with no
        # ReLU, so their preact is the tap itself.
        f0, pre0 = relu_keeping(self.conv1[1](self.conv1[0](x)), preact)
        out = self.blocks[0](f0)
        f1 = self.blocks[1](out)
        f2 = self.blocks[2](f1)
        out = self.blocks[3](f2)
        f3 = self.blocks[4](out)
        out = self.blocks[5](f3)
        f4 = self.blocks[6](out)
        out = self.conv2(f4)
        pooled = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.classifier(pooled)
        return ModelOutput(
            logits=logits, feats=[f0, f1, f2, f3, f4], preact=[pre0, f1, f2, f3, f4] if preact else None, pooled=pooled
        )


@register_model
def mobilenetv2(num_classes: int = 100) -> ZooModel:
    """The reference ``mobile_half``: width 0.5, expansion 6."""
    return MobileNetV2(expansion=6, width_mult=0.5, num_classes=num_classes)
