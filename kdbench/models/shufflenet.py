"""ShuffleNet V1 (Zhang et al. 2018) and V2 (Ma et al. 2018) in the CIFAR form of the CRD benchmark
(RepDistiller ``ShuffleV1`` with 3 groups, ``ShuffleV2`` at net size 1): a 1x1 stride-1 stem and three
stride-2 groups.

Names follow the reference (``layer1.0.conv1``, ``shortcut``, ``linear``...) so that its checkpoints load key
for key. The reference's channel-shuffle and split modules hold no state and are plain functions here. Like
the reference, neither model re-initialises its weights (PyTorch defaults).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel, register_model
from kdbench.models.resnet import BlockGroup, relu_keeping


def _channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[N, g*c, H, W] -> [N, c*g, H, W]: interleave the channels of the g groups."""
    n, c, h, w = x.shape
    return x.view(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


# ---------------------------------------------------------------------------------------------- ShuffleNet V1


class Bottleneck(nn.Module):
    """Grouped 1x1, channel shuffle, 3x3 depthwise, grouped 1x1; the shortcut is added (stride 1) or, as an
    average pool, concatenated (stride 2). Returns the output and the tensor before the final ReLU.
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        mid_planes = out_planes // 4
        # The stem has 24 channels, too few to split into groups: the first 1x1 conv there is dense.
        self.shuffle_groups = 1 if in_planes == 24 else groups
        self.conv1 = nn.Conv2d(in_planes, mid_planes, kernel_size=1, groups=self.shuffle_groups, bias=False)
        self.bn1 = nn.BatchNorm2d(mid_planes)
        self.conv2 = nn.Conv2d(
            mid_planes, mid_planes, kernel_size=3, stride=stride, padding=1, groups=mid_planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(mid_planes)
        self.conv3 = nn.Conv2d(mid_planes, out_planes, kernel_size=1, groups=groups, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 2:
            self.shortcut = nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1))

    def forward(self, x: torch.Tensor, preact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = F.relu(self.bn1(self.conv1(x)))
        out = _channel_shuffle(out, self.shuffle_groups)
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        res = self.shortcut(x)
        return relu_keeping(torch.cat([out, res], 1) if self.stride == 2 else out + res, preact)


class ShuffleNetV1(ZooModel):
    def __init__(
        self, out_planes: tuple[int, int, int], num_blocks: tuple[int, int, int], groups: int, num_classes: int = 100
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_planes = 24
        self.layer1 = self._make_layer(out_planes[0], num_blocks[0], groups)
        self.layer2 = self._make_layer(out_planes[1], num_blocks[1], groups)
        self.layer3 = self._make_layer(out_planes[2], num_blocks[2], groups)
        self.linear = nn.Linear(out_planes[2], num_classes)
        self.feature_info = FeatureInfo(
            channels=(24, *out_planes), reduction=(1, 2, 4, 8), pooled_dim=out_planes[2], num_classes=num_classes
        )

    def _make_layer(self, out_planes: int, num_blocks: int, groups: int) -> BlockGroup:
        layers = []
        for i in range(num_blocks):
            # The first block concatenates its pooled input, so its own branch makes the remaining channels.
            branch_planes = out_planes - self.in_planes if i == 0 else out_planes
            layers.append(Bottleneck(self.in_planes, branch_planes, stride=2 if i == 0 else 1, groups=groups))
            self.in_planes = out_planes
        return BlockGroup(*layers)

    @property
    def head(self) -> nn.Linear:
        return self.linear

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        # preact[0] is the stem's BN output before its ReLU; the reference has no pre-ReLU stem tap (it repeats
        # the post-ReLU stem), so the reference's value there is relu(preact[0]).
        f0, pre0 = relu_keeping(self.bn1(self.conv1(x)), preact)
        f1, pre1 = self.layer1(f0, preact)
        f2, pre2 = self.layer2(f1, preact)
        f3, pre3 = self.layer3(f2, preact)
        pooled = torch.flatten(F.adaptive_avg_pool2d(f3, 1), 1)
        logits = self.linear(pooled)
        return ModelOutput(
            logits=logits, feats=[f0, f1, f2, f3], preact=[pre0, pre1, pre2, pre3] if preact else None, pooled=pooled
        )


# ---------------------------------------------------------------------------------------------- ShuffleNet V2


class BasicBlock(nn.Module):
    """Split the channels in two, transform one half (1x1, 3x3 depthwise, 1x1), concatenate, shuffle.

    Returns the output and its pre-activation: the same concatenation and shuffle with the last ReLU left
    out. The reference's preact=True path leaves that tensor unshuffled, a channel permutation of the tap;
    shuffling it keeps preact[i] channel-aligned with feats[i] (relu(preact[i]) == feats[i]). A 1x1
    connector on top (as AB uses) absorbs the permutation either way.
    """

    def __init__(self, in_channels: int, split_ratio: float = 0.5) -> None:
        super().__init__()
        self.split = int(in_channels * split_ratio)
        c = in_channels - self.split
        if c != self.split:
            raise ValueError(f"ShuffleNetV2 blocks need an even split, got {in_channels} x {split_ratio}")
        self.conv1 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, kernel_size=3, stride=1, padding=1, groups=c, bias=False)
        self.bn2 = nn.BatchNorm2d(c)
        self.conv3 = nn.Conv2d(c, c, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor, preact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        x1, x2 = x[:, : self.split], x[:, self.split :]
        out = F.relu(self.bn1(self.conv1(x2)))
        out = self.bn2(self.conv2(out))
        pre = self.bn3(self.conv3(out))
        out = _channel_shuffle(torch.cat([x1, F.relu(pre)], 1), 2)
        return out, _channel_shuffle(torch.cat([x1, pre], 1), 2) if preact else None


class DownBlock(nn.Module):
    """The stride-2 unit: both halves see the whole input (left: 3x3 depthwise then 1x1; right: 1x1, 3x3
    depthwise, 1x1), are concatenated and shuffled. Returns the output and its pre-activation.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        mid_channels = out_channels // 2
        self.conv1 = nn.Conv2d(
            in_channels, in_channels, kernel_size=3, stride=2, padding=1, groups=in_channels, bias=False
        )
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv2 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(mid_channels)
        self.conv3 = nn.Conv2d(in_channels, mid_channels, kernel_size=1, bias=False)
        self.bn3 = nn.BatchNorm2d(mid_channels)
        self.conv4 = nn.Conv2d(
            mid_channels, mid_channels, kernel_size=3, stride=2, padding=1, groups=mid_channels, bias=False
        )
        self.bn4 = nn.BatchNorm2d(mid_channels)
        self.conv5 = nn.Conv2d(mid_channels, mid_channels, kernel_size=1, bias=False)
        self.bn5 = nn.BatchNorm2d(mid_channels)

    def forward(self, x: torch.Tensor, preact: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        left = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        right = F.relu(self.bn3(self.conv3(x)))
        right = self.bn5(self.conv5(self.bn4(self.conv4(right))))
        return relu_keeping(_channel_shuffle(torch.cat([left, right], 1), 2), preact)


class ShuffleNetV2(ZooModel):
    def __init__(
        self, out_channels: tuple[int, int, int, int], num_blocks: tuple[int, int, int], num_classes: int = 100
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, kernel_size=1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        self.in_channels = 24
        self.layer1 = self._make_layer(out_channels[0], num_blocks[0])
        self.layer2 = self._make_layer(out_channels[1], num_blocks[1])
        self.layer3 = self._make_layer(out_channels[2], num_blocks[2])
        self.conv2 = nn.Conv2d(out_channels[2], out_channels[3], kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels[3])
        self.linear = nn.Linear(out_channels[3], num_classes)
        self.feature_info = FeatureInfo(
            channels=(24, *out_channels[:3]),
            reduction=(1, 2, 4, 8),
            pooled_dim=out_channels[3],
            num_classes=num_classes,
        )

    def _make_layer(self, out_channels: int, num_blocks: int) -> BlockGroup:
        layers: list[nn.Module] = [DownBlock(self.in_channels, out_channels)]
        layers += [BasicBlock(out_channels) for _ in range(num_blocks)]
        self.in_channels = out_channels
        return BlockGroup(*layers)

    @property
    def head(self) -> nn.Linear:
        return self.linear

    def feature_modules(self) -> list[nn.Module]:
        """Stem and groups, as the reference's ``get_feat_modules()``: the final ``conv2`` / ``bn2`` are left out."""
        return [self.conv1, self.bn1, self.layer1, self.layer2, self.layer3]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        # preact[0] is the stem's BN output before its ReLU (the reference repeats the post-ReLU stem there);
        # preact[1..3] are the groups' last pre-activations, shuffled like the taps (see BasicBlock).
        f0, pre0 = relu_keeping(self.bn1(self.conv1(x)), preact)
        f1, pre1 = self.layer1(f0, preact)
        f2, pre2 = self.layer2(f1, preact)
        f3, pre3 = self.layer3(f2, preact)
        out = F.relu(self.bn2(self.conv2(f3)))
        pooled = torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)
        logits = self.linear(pooled)
        return ModelOutput(
            logits=logits, feats=[f0, f1, f2, f3], preact=[pre0, pre1, pre2, pre3] if preact else None, pooled=pooled
        )


@register_model
def shufflenetv1(num_classes: int = 100) -> ZooModel:
    """The reference ``ShuffleV1``: groups 3, widths 240-480-960, blocks 4-8-4."""
    return ShuffleNetV1(out_planes=(240, 480, 960), num_blocks=(4, 8, 4), groups=3, num_classes=num_classes)


@register_model
def shufflenetv2(num_classes: int = 100) -> ZooModel:
    """The reference ``ShuffleV2`` (net size 1): widths 116-232-464, blocks 3-7-3, a 1024-wide last conv."""
    return ShuffleNetV2(out_channels=(116, 232, 464, 1024), num_blocks=(3, 7, 3), num_classes=num_classes)
