"""Helpers shared by the method tests: the progress passed to ``loss`` and random outputs of declared shapes."""

from __future__ import annotations

import torch
from torch import nn

from kdbench.method import Progress
from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel

# The first step of a 240-epoch main stage of 391 steps (CIFAR-100 at batch 128): what the first ``loss`` sees.
START = Progress(epoch=0, epochs=240, step=0, steps=391)


def random_outputs(info: FeatureInfo, batch: int, gen: torch.Generator, image_size: int = 32) -> ModelOutput:
    """Random taps of the declared shapes: preact ~ N(0, 1), feats = relu(preact), pooled and logits ~ N(0, 1)."""
    preact = [torch.randn(batch, c, image_size // r, image_size // r, generator=gen)
              for c, r in zip(info.channels, info.reduction)]
    return ModelOutput(logits=torch.randn(batch, info.num_classes, generator=gen), feats=[p.relu() for p in preact],
                       preact=preact, pooled=torch.randn(batch, info.pooled_dim, generator=gen))


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
