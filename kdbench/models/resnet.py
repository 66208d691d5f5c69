"""CIFAR ResNets (He et al. 2016, the 6n+2 layout with three groups of BasicBlocks).

Submodule names follow the RepDistiller zoo (``conv1``, ``bn1``, ``layer1..3``, ``downsample``, ``fc``) so
that its published checkpoints load with ``load_state_dict(strict=True)``. ``BlockGroup`` is shared with the
other families whose blocks report their pre-activation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel, register_model


class BlockGroup(nn.Sequential):
    """A sequence of blocks that each return ``(output, preact)``; the group returns its last block's pair.

    With ``preact=False`` no block is asked for its pre-activation (it returns None there and may apply
    its last ReLU in place); with ``preact=True`` the last block is. Subclassing nn.Sequential keeps the
    reference key layout (``layer1.0.conv1.weight``).
    """

    def forward(self, x: torch.Tensor, preact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:  # type: ignore[override]
        last = len(self) - 1
        pre = None
        for i, block in enumerate(self):
            x, pre = block(x, preact and i == last)
        return x, pre


def relu_keeping(pre: torch.Tensor, keep: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(relu(pre), pre) when ``keep``; else (relu(pre) computed in place, None): one activation map less.

    ``pre`` must be a fresh tensor that autograd does not save (a sum, a concatenation or a BN output).
    """
    if keep:
        return F.relu(pre), pre
    return F.relu_(pre), None


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus shortcut, then ReLU. Returns the output and the sum before that ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = _conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, preact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return relu_keeping(out + shortcut, preact)


class ResNet(ZooModel):
    """A 3x3 stem then three groups of ``(depth - 2) / 6`` BasicBlocks at strides 1, 2, 2."""

    def __init__(self, depth: int, num_filters: tuple[int, int, int, int], num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"a BasicBlock ResNet needs depth 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.inplanes = num_filters[0]
        self.conv1 = nn.Conv2d(3, num_filters[0], kernel_size=3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(num_filters[0])
        self.layer1 = self._make_layer(num_filters[1], n, stride=1)
        self.layer2 = self._make_layer(num_filters[2], n, stride=2)
        self.layer3 = self._make_layer(num_filters[3], n, stride=2)
        self.fc = nn.Linear(num_filters[3], num_classes)
        self.feature_info = FeatureInfo(
            channels=tuple(num_filters), reduction=(1, 1, 2, 4), pooled_dim=num_filters[3], num_classes=num_classes
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> BlockGroup:
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )
        layers = [BasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        layers += [BasicBlock(planes, planes) for _ in range(1, blocks)]
        return BlockGroup(*layers)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def preact_bn(self) -> list[nn.BatchNorm2d | None]:
        # The stem's BN is preact[0] itself; a group's preact is its last block's bn2 output plus the shortcut.
        return [self.bn1, self.layer1[-1].bn2, self.layer2[-1].bn2, self.layer3[-1].bn2]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        # preact[0] is the stem's BN output before its ReLU. The reference has no pre-ReLU stem tap (its
        # preact=True list repeats the post-ReLU stem there), so the reference's value is relu(preact[0]).
        f0, pre0 = relu_keeping(self.bn1(self.conv1(x)), preact)
        f1, pre1 = self.layer1(f0, preact)
        f2, pre2 = self.layer2(f1, preact)
        f3, pre3 = self.layer3(f2, preact)
        pooled = torch.flatten(F.adaptive_avg_pool2d(f3, 1), 1)
        logits = self.fc(pooled)
        return ModelOutput(
            logits=logits, feats=[f0, f1, f2, f3], preact=[pre0, pre1, pre2, pre3] if preact else None, pooled=pooled
        )


_NARROW = (16, 16, 32, 64)
_WIDE = (32, 64, 128, 256)


@register_model
def resnet8(num_classes: int = 100) -> ZooModel:
    return ResNet(8, _NARROW, num_classes)


@register_model
def resnet14(num_classes: int = 100) -> ZooModel:
    return ResNet(14, _NARROW, num_classes)


@register_model
def resnet20(num_classes: int = 100) -> ZooModel:
    return ResNet(20, _NARROW, num_classes)


@register_model
def resnet32(num_classes: int = 100) -> ZooModel:
    return ResNet(32, _NARROW, num_classes)


@register_model
def resnet44(num_classes: int = 100) -> ZooModel:
    return ResNet(44, _NARROW, num_classes)


@register_model
def resnet56(num_classes: int = 100) -> ZooModel:
    return ResNet(56, _NARROW, num_classes)


@register_model
def resnet110(num_classes: int = 100) -> ZooModel:
    return ResNet(110, _NARROW, num_classes)


@register_model
def resnet8x4(num_classes: int = 100) -> ZooModel:
    return ResNet(8, _WIDE, num_classes)


@register_model
def resnet32x4(num_classes: int = 100) -> ZooModel:
    return ResNet(32, _WIDE, num_classes)
