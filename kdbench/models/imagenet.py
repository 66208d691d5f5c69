"""The ImageNet models of the distillation papers: torchvision's ResNet-18/34/50 and the MobileNetV1 of
CRD / DKD / ReviewKD (ResNet50 -> MobileNetV1), with the zoo's feature contract.

The ResNets keep torchvision's module names (``conv1``, ``bn1``, ``layer1..4``, ``downsample``, ``fc``) and its
stride placement (the 3x3 conv of a bottleneck carries the stride, "ResNet v1.5"), so torchvision's published
state dicts load with ``strict=True`` (tests check keys, shapes and parameter counts against torchvision). They are
registered as ``tv_resnet18/34/50`` (timm's name for torchvision's ResNets) because ``resnet50`` is the CIFAR
ResNet50 of the CRD zoo, whose name is part of existing run ids.

Taps: ``feats[0]`` is the stem after its ReLU and before the max-pool (stride 2), then the output of each of the
four block groups (strides 4, 8, 16, 32); ``preact`` the same before their last ReLU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel, register_model
from kdbench.models.resnet import BasicBlock, BlockGroup, relu_keeping

REDUCTIONS = (2, 4, 8, 16, 32)


class TVBottleneck(nn.Module):
    """1x1 reduce, 3x3 (carrying the stride), 1x1 expand x4, plus shortcut, then ReLU (torchvision's layout).

    Returns the output and the sum before that ReLU."""

    expansion = 4

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.downsample = downsample

    def forward(self, x: torch.Tensor, preact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        shortcut = x if self.downsample is None else self.downsample(x)
        return relu_keeping(out + shortcut, preact)


class TVResNet(ZooModel):
    """A 7x7 stride-2 stem, a 3x3 stride-2 max-pool, four block groups at strides 1, 2, 2, 2."""

    def __init__(self, block: type[nn.Module], layers: tuple[int, int, int, int], num_classes: int = 1000) -> None:
        super().__init__()
        expansion = getattr(block, "expansion", 1)
        self.inplanes = 64
        self.conv1 = nn.Conv2d(3, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        self.layer1 = self._make_layer(block, 64, layers[0], 1)
        self.layer2 = self._make_layer(block, 128, layers[1], 2)
        self.layer3 = self._make_layer(block, 256, layers[2], 2)
        self.layer4 = self._make_layer(block, 512, layers[3], 2)
        self.fc = nn.Linear(512 * expansion, num_classes)
        channels = (64, 64 * expansion, 128 * expansion, 256 * expansion, 512 * expansion)
        self.feature_info = FeatureInfo(
            channels=channels, reduction=REDUCTIONS, pooled_dim=512 * expansion, num_classes=num_classes
        )
        for m in self.modules():  # torchvision's initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block: type[nn.Module], planes: int, blocks: int, stride: int) -> BlockGroup:
        expansion = getattr(block, "expansion", 1)
        downsample = None
        if stride != 1 or self.inplanes != planes * expansion:
            downsample = nn.Sequential(
                nn.Conv2d(self.inplanes, planes * expansion, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes * expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * expansion
        layers += [block(self.inplanes, planes) for _ in range(1, blocks)]
        return BlockGroup(*layers)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def preact_bn(self) -> list[nn.BatchNorm2d | None]:
        last = "bn3" if isinstance(self.layer1[-1], TVBottleneck) else "bn2"
        return [self.bn1] + [getattr(g[-1], last) for g in (self.layer1, self.layer2, self.layer3, self.layer4)]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        f0, pre0 = relu_keeping(self.bn1(self.conv1(x)), preact)
        f1, pre1 = self.layer1(self.maxpool(f0), preact)
        f2, pre2 = self.layer2(f1, preact)
        f3, pre3 = self.layer3(f2, preact)
        f4, pre4 = self.layer4(f3, preact)
        pooled = torch.flatten(F.adaptive_avg_pool2d(f4, 1), 1)
        return ModelOutput(
            logits=self.fc(pooled),
            feats=[f0, f1, f2, f3, f4],
            preact=[pre0, pre1, pre2, pre3, pre4] if preact else None,
            pooled=pooled,
        )


# (input channels, output channels, stride) of MobileNetV1's 13 depthwise-separable blocks (Howard et al. 2017).
_MBV1 = (
    (32, 64, 1),
    (64, 128, 2),
    (128, 128, 1),
    (128, 256, 2),
    (256, 256, 1),
    (256, 512, 2),
    *((512, 512, 1),) * 5,
    (512, 1024, 2),
    (1024, 1024, 1),
)
# Blocks whose outputs are taps (the last block at each resolution): 128 @ /4, 256 @ /8, 512 @ /16, 1024 @ /32.
_MBV1_TAPS = (2, 4, 10, 12)


class DepthwiseSeparable(nn.Module):
    """3x3 depthwise conv-BN-ReLU then 1x1 pointwise conv-BN-ReLU; returns the output and the BN output before
    the last ReLU."""

    def __init__(self, inp: int, oup: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(inp, inp, 3, stride, 1, groups=inp, bias=False)
        self.bn1 = nn.BatchNorm2d(inp)
        self.pw = nn.Conv2d(inp, oup, 1, 1, 0, bias=False)
        self.bn2 = nn.BatchNorm2d(oup)

    def forward(self, x: torch.Tensor, preact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = F.relu(self.bn1(self.dw(x)))
        return relu_keeping(self.bn2(self.pw(out)), preact)


class MobileNetV1(ZooModel):
    """A 3x3 stride-2 stem (32 channels), 13 depthwise-separable blocks, global pooling, one linear layer."""

    def __init__(self, num_classes: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.blocks = nn.ModuleList(DepthwiseSeparable(i, o, s) for i, o, s in _MBV1)
        self.fc = nn.Linear(1024, num_classes)
        channels = (32, *(_MBV1[i][1] for i in _MBV1_TAPS))
        self.feature_info = FeatureInfo(
            channels=channels, reduction=REDUCTIONS, pooled_dim=1024, num_classes=num_classes
        )
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def preact_bn(self) -> list[nn.BatchNorm2d | None]:
        return [self.bn1] + [self.blocks[i].bn2 for i in _MBV1_TAPS]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        f, p = relu_keeping(self.bn1(self.conv1(x)), preact)
        feats, pres = [f], [p]
        for i, block in enumerate(self.blocks):
            tap = i in _MBV1_TAPS
            f, p = block(f, preact and tap)
            if tap:
                feats.append(f)
                pres.append(p)
        pooled = torch.flatten(F.adaptive_avg_pool2d(f, 1), 1)
        return ModelOutput(logits=self.fc(pooled), feats=feats, preact=pres if preact else None, pooled=pooled)


@register_model
def tv_resnet18(num_classes: int = 1000) -> ZooModel:
    return TVResNet(BasicBlock, (2, 2, 2, 2), num_classes)


@register_model
def tv_resnet34(num_classes: int = 1000) -> ZooModel:
    return TVResNet(BasicBlock, (3, 4, 6, 3), num_classes)


@register_model
def tv_resnet50(num_classes: int = 1000) -> ZooModel:
    return TVResNet(TVBottleneck, (3, 4, 6, 3), num_classes)


@register_model
def mobilenetv1(num_classes: int = 1000) -> ZooModel:
    return MobileNetV1(num_classes)
