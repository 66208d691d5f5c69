"""Helpers shared by the method tests: the progress passed to ``loss``, tiny made-up networks, contexts, methods
built under a fixed seed, random outputs of declared shapes, batches, a loss as a float, the golden-file check, a
short SGD run, and a tiny zoo-contract student."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

import pytest
import torch
from torch import nn

from kdbench.method import Batch, Method, MethodContext, Progress
from kdbench.models.base import FeatureInfo, ModelOutput, ZooModel

GOLDEN_DIR = Path(__file__).parent / "golden"
M = TypeVar("M", bound=Method)

# The first step of a 240-epoch main stage of 391 steps (CIFAR-100 at batch 128): what the first ``loss`` sees.
START = Progress(epoch=0, epochs=240, step=0, steps=391)
# A one-step, one-epoch schedule (for the methods with no warm-up or past it).
ONE_STEP = Progress(epoch=0, epochs=1, step=0, steps=1)


# Tiny made-up networks at image size 8: taps of 8, 8, 4, 2 pixels a side.
STUDENT = FeatureInfo(channels=(4, 4, 6, 8), reduction=(1, 1, 2, 4), pooled_dim=8, num_classes=5)
TEACHER = FeatureInfo(channels=(8, 8, 12, 16), reduction=(1, 1, 2, 4), pooled_dim=16, num_classes=5)
# A VGG-like teacher (one more tap, everything one stride coarser).
TEACHER_X = FeatureInfo(channels=(8, 8, 12, 16, 16), reduction=(1, 2, 4, 8, 8), pooled_dim=16, num_classes=5)


def make_ctx(
    student: FeatureInfo, teacher: FeatureInfo | None, image_size: int = 8, num_train: int = 100, **fields
) -> MethodContext:
    """A context with ``num_train`` all-zero training labels; ``num_classes`` is the student's unless given in
    ``fields``, which may set any other ``MethodContext`` field (``student_arch``, ``teacher_head``, ...)."""
    fields.setdefault("num_classes", student.num_classes)
    return MethodContext(
        student=student,
        teacher=teacher,
        num_train=num_train,
        train_labels=torch.zeros(num_train, dtype=torch.long),
        image_size=image_size,
        **fields,
    )


def build_method(
    cls: type[M],
    student: FeatureInfo = STUDENT,
    teacher: FeatureInfo | None = TEACHER,
    image_size: int = 8,
    *,
    rng: bool = False,
    **cfg,
) -> M:
    """``cls`` with ``cls.Config(**cfg)`` on ``make_ctx(student, teacher, image_size)``, built under
    torch.manual_seed(0); with ``rng``, also given its own generator seeded 0 (as the harness gives one)."""
    torch.manual_seed(0)
    m = cls(cls.Config(**cfg), make_ctx(student, teacher, image_size))
    if rng:
        m.rng = torch.Generator().manual_seed(0)
    return m


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


def from_logits(z: torch.Tensor) -> ModelOutput:
    """Only logits: no maps, a zero pooled vector of one feature (for the logit methods)."""
    return ModelOutput(logits=z, feats=[], preact=[], pooled=torch.zeros(z.shape[0], 1))


def make_batch(b: int, image_size: int = 8) -> Batch:
    """``b`` zero images, label 0, indices 0..b-1."""
    return Batch(
        images=torch.zeros(b, 3, image_size, image_size), labels=torch.zeros(b, dtype=torch.long), index=torch.arange(b)
    )


def method_loss(
    m: Method,
    s: ModelOutput,
    t: ModelOutput,
    progress: Progress = START,
    *,
    key: str | None = None,
    image_size: int = 8,
) -> float:
    """The term ``key`` (default the method's name) of ``m.loss`` on a ``make_batch`` of the student's batch size."""
    batch = make_batch(s.logits.shape[0], image_size)
    return m.loss(s, t, batch, progress)[key or m.name].item()


def logit_loss(m: Method, s: torch.Tensor, t: torch.Tensor, key: str | None = None) -> float:
    """``method_loss`` on two logit tensors (``from_logits``), 2x2 images, one step."""
    return method_loss(m, from_logits(s), from_logits(t), ONE_STEP, key=key, image_size=2)


# The golden-value cases of the block-group map methods (AT, NST, SP): a pair of equal depth and the VGG-like teacher.
GOLDEN_PAIRS = {"same_shape": (STUDENT, TEACHER), "cross_shape": (STUDENT, TEACHER_X)}


def golden_cases(b: int) -> Iterator[tuple[str, FeatureInfo, FeatureInfo, ModelOutput, ModelOutput]]:
    """(name, student info, teacher info, student out, teacher out) for each of ``GOLDEN_PAIRS``, case k's ``b``
    samples from a generator seeded 100 + k."""
    for k, (name, (si, ti)) in enumerate(GOLDEN_PAIRS.items()):
        gen = torch.Generator().manual_seed(100 + k)
        yield name, si, ti, make_out(si, b, gen), make_out(ti, b, gen)


def assert_matches_golden(name: str, got: dict[str, float]) -> None:
    """``got`` has the keys of tests/golden/<name>.json and each value to a relative 1e-5."""
    expected = json.loads((GOLDEN_DIR / f"{name}.json").read_text())
    assert set(got) == set(expected)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


def sgd_losses(params: Sequence[torch.Tensor], step_loss: Callable[[], torch.Tensor], lr: float) -> list[float]:
    """15 steps of SGD (momentum 0.9) at ``lr`` on ``step_loss()``: the loss before each step."""
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses = []
    for _ in range(15):
        loss = step_loss()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    return losses


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


def init_stage_losses(build: Callable[[], Method], teacher: FeatureInfo, lr: float) -> tuple[TinyNet, list[float]]:
    """A ``TinyNet`` student (made under torch.manual_seed(1), before ``build()``) trained by ``sgd_losses`` in the
    method's init stage, every stage parameter requiring a gradient (what the harness does for the stage), on 8
    random images against random teacher outputs of ``teacher``'s shapes (a generator seeded 2): the student and
    the losses."""
    torch.manual_seed(1)
    student = TinyNet()
    stage = build().init_stage(student)
    for p in stage.all_parameters():
        p.requires_grad_(True)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(8, 3, 8, 8, generator=gen)
    out_t = outputs(gen, teacher, 8)
    losses = sgd_losses(
        stage.all_parameters(), lambda: sum(stage.loss(student(x, preact=True), out_t, make_batch(8)).values()), lr
    )
    return student, losses
