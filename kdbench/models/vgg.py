"""CIFAR VGGs with batch norm and a single linear classifier (the RepDistiller ``vgg*_bn`` models).

Five conv stages ``block0..4`` separated by 2x2 max-pools; each stage is an nn.Sequential of conv-BN-ReLU
triples whose last ReLU is left out and applied in ``forward``, so the stage output is the pre-activation.
Names and indices match the reference, so its checkpoints load key for key.

One deliberate difference: the reference max-pools before ``block4`` only when the input is 64 pixels high,
which would give that tap a reduction that depends on the input size. Here ``block4`` always runs at the
resolution of ``block3`` (as the reference does at 32x32), so ``feature_info`` holds at every input size.
The pool has no parameters, so checkpoints are unaffected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel, register_model
from kdbench.models.resnet import relu_keeping

_CFG: dict[str, list[list[int]]] = {
    "vgg8": [[64], [128], [256], [512], [512]],
    "vgg11": [[64], [128], [256, 256], [512, 512], [512, 512]],
    "vgg13": [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    "vgg16": [[64, 64], [128, 128], [256, 256, 256], [512, 512, 512], [512, 512, 512]],
    "vgg19": [[64, 64], [128, 128], [256, 256, 256, 256], [512, 512, 512, 512], [512, 512, 512, 512]],
}


def _make_stage(widths: list[int], in_channels: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in widths:
        layers += [
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(inplace=True),
        ]
        in_channels = width
    return nn.Sequential(*layers[:-1])


class VGG(ZooModel):
    def __init__(self, cfg: list[list[int]], num_classes: int = 100) -> None:
        super().__init__()
        self.block0 = _make_stage(cfg[0], 3)
        self.block1 = _make_stage(cfg[1], cfg[0][-1])
        self.block2 = _make_stage(cfg[2], cfg[1][-1])
        self.block3 = _make_stage(cfg[3], cfg[2][-1])
        self.block4 = _make_stage(cfg[4], cfg[3][-1])
        self.classifier = nn.Linear(cfg[4][-1], num_classes)
        self.feature_info = FeatureInfo(
            channels=tuple(stage[-1] for stage in cfg),
            reduction=(1, 2, 4, 8, 8),
            pooled_dim=cfg[4][-1],
            num_classes=num_classes,
        )

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    @property
    def head(self) -> nn.Linear:
        return self.classifier

    def preact_bn(self) -> list[nn.BatchNorm2d | None]:
        # Every stage ends in BN and preact[i] is that BN's output.
        stages = (self.block0, self.block1, self.block2, self.block3, self.block4)
        return [s[-1] if isinstance(s[-1], nn.BatchNorm2d) else None for s in stages]

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        # Every stage ends in BN, so preact[i] is that BN's output; the reference's preact=True path gives the
        # same for stages 1-4 and the post-ReLU map for stage 0, which here is relu(preact[0]).
        f0, pre0 = relu_keeping(self.block0(x), preact)
        f1, pre1 = relu_keeping(self.block1(F.max_pool2d(f0, 2)), preact)
        f2, pre2 = relu_keeping(self.block2(F.max_pool2d(f1, 2)), preact)
        f3, pre3 = relu_keeping(self.block3(F.max_pool2d(f2, 2)), preact)
        f4, pre4 = relu_keeping(self.block4(f3), preact)  # no pool before block4: see the module docstring
        pooled = torch.flatten(F.adaptive_avg_pool2d(f4, 1), 1)
        logits = self.classifier(pooled)
        return ModelOutput(
            logits=logits,
            feats=[f0, f1, f2, f3, f4],
            preact=[pre0, pre1, pre2, pre3, pre4] if preact else None,
            pooled=pooled,
        )


@register_model
def vgg8(num_classes: int = 100) -> ZooModel:
    return VGG(_CFG["vgg8"], num_classes)


@register_model
def vgg11(num_classes: int = 100) -> ZooModel:
    return VGG(_CFG["vgg11"], num_classes)


@register_model
def vgg13(num_classes: int = 100) -> ZooModel:
    return VGG(_CFG["vgg13"], num_classes)


@register_model
def vgg16(num_classes: int = 100) -> ZooModel:
    return VGG(_CFG["vgg16"], num_classes)


@register_model
def vgg19(num_classes: int = 100) -> ZooModel:
    return VGG(_CFG["vgg19"], num_classes)
