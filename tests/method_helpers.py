"""Helpers shared by the method tests: the progress passed to ``loss``, tiny made-up networks, contexts, random
outputs of declared shapes, batches, and a tiny zoo-contract student."""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import Batch, MethodContext, Progress
from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel

# The first step of a 240-epoch main stage of 391 steps (CIFAR-100 at batch 128): what the first ``loss`` sees.
START = Progress(epoch=0, epochs=240, step=0, steps=391)


# Tiny made-up networks at image size 8: taps of 8, 8, 4, 2 pixels a side.
STUDENT = FeatureInfo(channels=(4, 4, 6, 8), reduction=(1, 1, 2, 4), pooled_dim=8, num_classes=5)
TEACHER = FeatureInfo(channels=(8, 8, 12, 16), reduction=(1, 1, 2, 4), pooled_dim=16, num_classes=5)
# A VGG-like teacher (one more tap, everything one stride coarser).
TEACHER_X = FeatureInfo(channels=(8, 8, 12, 16, 16), reduction=(1, 2, 4, 8, 8), pooled_dim=16, num_classes=5)


def make_ctx(student: FeatureInfo, teacher: FeatureInfo, image_size: int = 8) -> MethodContext:
    return MethodContext(
        student=student,
        teacher=teacher,
        num_classes=student.num_classes,
        num_train=100,
        train_labels=torch.zeros(100, dtype=torch.long),
        image_size=image_size,
    )


def make_out(info: FeatureInfo, b: int, gen: torch.Generator, image_size: int = 8) -> ModelOutput:
    preact = [
        torch.randn(b, c, image_size // r, image_size // r, generator=gen)
        for c, r in zip(info.channels, info.reduction)
    ]
    feats = [p.relu() for p in preact]
    return ModelOutput(
        logits=torch.randn(b, info.num_classes, generator=gen),
        feats=feats,
        preact=preact,
        pooled=torch.randn(b, info.pooled_dim, generator=gen).relu(),
    )


def from_feats(feats: list[torch.Tensor]) -> ModelOutput:
    b = feats[0].shape[0]
    return ModelOutput(logits=torch.zeros(b, 5), feats=feats, preact=feats, pooled=torch.zeros(b, 3))


def from_pooled(pooled: torch.Tensor) -> ModelOutput:
    b = pooled.shape[0]
    f = torch.zeros(b, 1, 1, 1)
    return ModelOutput(logits=torch.zeros(b, 5), feats=[f], preact=[f], pooled=pooled)


def rand_pooled(info: FeatureInfo, b: int, gen: torch.Generator) -> ModelOutput:
    return from_pooled(torch.randn(b, info.pooled_dim, generator=gen).relu())


def make_batch(b: int) -> Batch:
    return Batch(images=torch.zeros(b, 3, 8, 8), labels=torch.zeros(b, dtype=torch.long), index=torch.arange(b))


# The same for the methods with init stages (AB, FSP, FT) and VID: 10 classes, pooled = mean of the last map.
def info(channels: tuple[int, ...], reduction: tuple[int, ...]) -> FeatureInfo:
    return FeatureInfo(channels=channels, reduction=reduction, pooled_dim=channels[-1], num_classes=10)


def outputs(gen: torch.Generator, fi: FeatureInfo, batch: int, image_size: int = 8) -> ModelOutput:
    pre = [
        torch.randn(batch, c, image_size // r, image_size // r, generator=gen)
        for c, r in zip(fi.channels, fi.reduction)
    ]
    feats = [p.relu() for p in pre]
    return ModelOutput(
        logits=torch.randn(batch, 10, generator=gen), feats=feats, preact=pre, pooled=feats[-1].mean(dim=(2, 3))
    )


def batch_of(n: int) -> Batch:
    return Batch(images=torch.zeros(n, 3, 8, 8), labels=torch.zeros(n, dtype=torch.long), index=torch.arange(n))


class TinyNet(ZooModel):
    """A 3-tap student on 8x8 inputs with the zoo's contract: feats, preact, pooled, a linear ``head`` and
    ``feature_modules()`` (every layer but the head)."""

    feature_info = FeatureInfo(channels=(4, 6, 8), reduction=(1, 1, 2), pooled_dim=8, num_classes=10)

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.group1 = nn.Conv2d(4, 6, 3, padding=1)
        self.group2 = nn.Conv2d(6, 8, 3, stride=2, padding=1)
        self.fc = nn.Linear(8, 10)

    @property
    def head(self) -> nn.Linear:
        return self.fc

    def forward(self, x: torch.Tensor, preact: bool = False) -> ModelOutput:
        pre, feats = [], []
        for conv in (self.stem, self.group1, self.group2):
            x = conv(x)
            pre.append(x)
            x = x.relu()
            feats.append(x)
        pooled = x.mean(dim=(2, 3))
        return ModelOutput(logits=self.fc(pooled), feats=feats, preact=pre if preact else None, pooled=pooled)
