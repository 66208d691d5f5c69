"""The CIFAR ResNet50 of the CRD benchmark: a 3x3 stride-1 stem, bottleneck groups [3, 4, 6, 3], no max-pool.

Names follow the RepDistiller ``resnetv2`` file (``shortcut``, ``layer1..4``, ``linear``) so that its
checkpoints load key for key.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel, register_model
from kdbench.models.resnet import BlockGroup, relu_keeping


class Bottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, plus shortcut, then ReLU.

    Returns the output and the sum before that ReLU. An identity shortcut is an empty nn.Sequential, as in
    the reference, so it adds no state-dict key.
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out_planes = self.expansion * planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor, preact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return relu_keeping(out + self.shortcut(x), preact)


class ResNetV2(ZooModel):
    """Four bottleneck groups (64, 128, 256, 512 planes, x4 expansion) at strides 1, 2, 2, 2."""

    def __init__(self, num_blocks: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, num_blocks[0], stride=1)
        self.layer2 = self._make_layer(128, num_blocks[1], stride=2)
        self.layer3 = self._make_layer(256, num_blocks[2], stride=2)
        self.layer4 = self._make_layer(512, num_blocks[3], stride=2)
        width = 512 * Bottleneck.expansion
        self.linear = nn.Linear(width, num_classes)
        self.feature_info = FeatureInfo(
            channels=(64, 256, 512, 1024, 2048), reduction=(1, 1, 2, 4, 8), pooled_dim=width, num_classes=num_classes
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> BlockGroup:
        layers = []
        for i in range(num_blocks):
            layers.append(Bottleneck(self.in_planes, planes, stride if i == 0 else 1))
            self.in_planes = planes * Bottleneck.expansion
        return BlockGroup(*layers)

    @property
    def head(self) -> nn.Linear:
        return self.linear

    def preact_bn(self) -> list[nn.BatchNorm2d | None]:
        # The stem's BN is preact[0] itself; a group's preact is its last block's bn3 output plus the shortcut.
        return [self.bn1] + [layer[-1].bn3 for layer in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        # preact[0] is the stem's BN output before its ReLU; the reference has no pre-ReLU stem tap (it repeats
        # the post-ReLU stem), so the reference's value there is relu(preact[0]).
        f0, pre0 = relu_keeping(self.bn1(self.conv1(x)), preact)
        f1, pre1 = self.layer1(f0, preact)
        f2, pre2 = self.layer2(f1, preact)
        f3, pre3 = self.layer3(f2, preact)
        f4, pre4 = self.layer4(f3, preact)
        pooled = torch.flatten(F.adaptive_avg_pool2d(f4, 1), 1)
        logits = self.linear(pooled)
        return ModelOutput(
            logits=logits,
            feats=[f0, f1, f2, f3, f4],
            preact=[pre0, pre1, pre2, pre3, pre4] if preact else None,
            pooled=pooled,
        )


@register_model
def resnet50(num_classes: int = 100) -> ZooModel:
    """The reference ``ResNet50`` (CRD's cross-architecture teacher)."""
    return ResNetV2((3, 4, 6, 3), num_classes)
