"""Wide ResNets (Zagoruyko & Komodakis 2016), the pre-activation 6n+4 layout used for CIFAR.

Names follow the RepDistiller zoo (``block1.layer.0.convShortcut``, a final ``bn1``, ``fc``) so that its
checkpoints load key for key. Dropout is left out: every reference constructor uses a drop rate of 0.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel, register_model


class BasicBlock(nn.Module):
    """BN-ReLU-conv-BN-ReLU-conv plus shortcut (pre-activation).

    Returns the output and ``bn1(x)``, the pre-ReLU activation of the block's input: that is the tensor the
    reference's preact=True path reports for the tap feeding this block. When the widths differ, the
    shortcut is a 1x1 conv of the activated input; otherwise it is the raw input and ``convShortcut`` is None
    (no state-dict key).
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (
            None
            if self.equalInOut
            else nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False)
        )

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        preact = self.bn1(x)
        act = F.relu(preact)
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        shortcut = x if self.convShortcut is None else self.convShortcut(act)
        return shortcut + out, preact


class NetworkBlock(nn.Module):
    """One group of BasicBlocks; returns its output and the pre-ReLU input activation of its first block."""

    def __init__(self, nb_layers: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        blocks = [BasicBlock(in_planes, out_planes, stride)]
        blocks += [BasicBlock(out_planes, out_planes, 1) for _ in range(1, nb_layers)]
        self.layer = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        blocks = list(self.layer)
        x, entry_preact = blocks[0](x)
        for block in blocks[1:]:
            x, _ = block(x)
        return x, entry_preact


class WideResNet(ZooModel):
    """A 3x3 stem conv, three groups of ``(depth - 4) / 6`` blocks, then BN-ReLU before pooling."""

    def __init__(self, depth: int, widen_factor: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"a WideResNet needs depth 6n+4, got {depth}")
        n = (depth - 4) // 6
        channels = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = NetworkBlock(n, channels[0], channels[1], 1)
        self.block2 = NetworkBlock(n, channels[1], channels[2], 2)
        self.block3 = NetworkBlock(n, channels[2], channels[3], 2)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.fc = nn.Linear(channels[3], num_classes)
        self.nChannels = channels[3]
        self.feature_info = FeatureInfo(
            channels=channels, reduction=(1, 1, 2, 4), pooled_dim=channels[3], num_classes=num_classes
        )

        # The reference draws conv weights from N(0, 2 / (k * k * out_channels)) and keeps the default
        # Linear weight init with a zero bias.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def preact_bn(self) -> list[nn.BatchNorm2d | None]:
        # preact[i] is exactly the output of the BN that the ReLU after tap i follows (see forward).
        return [self.block1.layer[0].bn1, self.block2.layer[0].bn1, self.block3.layer[0].bn1, self.bn1]

    def feature_modules(self) -> list[nn.Module]:
        """The stem and the three groups, as the reference's ``get_feat_modules()``: the final ``bn1`` is left
        out, so an init stage neither trains it nor puts it in train mode (AB's last tap reads it frozen)."""
        return [self.conv1, self.block1, self.block2, self.block3]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        # A pre-activation network: the taps (stem conv and group outputs) are not ReLU outputs themselves; the
        # ReLU that consumes tap i follows a BN, and preact[i] is that BN's output, as in the reference's
        # preact=True path (block2/block3 entry BNs, then the final bn1). The reference has no pre-ReLU
        # variant for the stem (it returns the raw conv there); for consistency preact[0] is block1's entry
        # BN of the stem, the tensor its first ReLU sees.
        f0 = self.conv1(x)
        f1, pre0 = self.block1(f0)
        f2, pre1 = self.block2(f1)
        f3, pre2 = self.block3(f2)
        pre3 = self.bn1(f3)
        pooled = torch.flatten(F.adaptive_avg_pool2d(F.relu(pre3), 1), 1)
        logits = self.fc(pooled)
        return ModelOutput(
            logits=logits, feats=[f0, f1, f2, f3], preact=[pre0, pre1, pre2, pre3] if preact else None, pooled=pooled
        )


@register_model
def wrn_16_1(num_classes: int = 100) -> ZooModel:
    return WideResNet(16, 1, num_classes)


@register_model
def wrn_16_2(num_classes: int = 100) -> ZooModel:
    return WideResNet(16, 2, num_classes)


@register_model
def wrn_40_1(num_classes: int = 100) -> ZooModel:
    return WideResNet(40, 1, num_classes)


@register_model
def wrn_40_2(num_classes: int = 100) -> ZooModel:
    return WideResNet(40, 2, num_classes)
