"""Deterministic class-conditional colour patterns: a learnable data set of any size, for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from kdbench.data.dataset import Dataset, build_dataset
from kdbench.errors import KdbenchError

# --------------------------------------------------------------------------------------------- synthetic


def make_synthetic(
    num_classes: int = 10,
    image_size: int = 32,
    train_size: int = 2000,
    test_size: int = 500,
    seed: int = 0,
    noise: float = 0.15,
    grid: int = 4,
    superclasses: int = 0,
    label_noise: float = 0.0,
) -> Dataset:
    """Deterministic, learnable class-conditional images.

    Each class owns a smooth random colour pattern (a ``grid x grid`` field of random colours, upsampled). A
    sample blends its class pattern (weight 0.5..1) with another class's pattern and adds pixel noise, so a
    classifier has to look at the spatial layout of colours, yet a small CNN learns it in a few hundred steps.
    Blends near 0.5 are ambiguous, so accuracy tops out a few points below 100% and methods can still differ.

    ``superclasses`` > 0 groups the classes (class ``c`` is in group ``c % superclasses``): a class pattern is
    then its group's pattern plus a weaker pattern of its own, and a sample's blended-in class comes from its own
    group, so classes of one group look alike (as CIFAR-100's superclasses do) and a teacher's soft labels carry
    that structure. ``label_noise`` replaces that fraction of the *training* labels by another class of the same
    group (or any class without groups); test labels stay clean. The defaults (0, 0.0) give the original data.
    """
    for key, val, low in (
        ("num_classes", num_classes, 1),
        ("image_size", image_size, 1),
        ("train_size", train_size, 1),
        ("test_size", test_size, 1),
        ("grid", grid, 1),
        ("superclasses", superclasses, 0),
    ):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise KdbenchError(f"synthetic dataset: {key} must be an integer >= {low}, got {val!r}")
    if superclasses > num_classes or (superclasses and num_classes % superclasses):
        raise KdbenchError(f"synthetic dataset: superclasses ({superclasses}) must divide num_classes ({num_classes})")
    if isinstance(label_noise, bool) or not isinstance(label_noise, (int, float)) or not 0 <= label_noise < 1:
        raise KdbenchError(f"synthetic dataset: label_noise must be a number in [0, 1), got {label_noise!r}")
    g = torch.Generator().manual_seed(int(seed))
    base = torch.rand(num_classes, 3, grid, grid, generator=g, dtype=torch.float64)
    groups = superclasses or num_classes
    if superclasses:
        group_base = torch.rand(superclasses, 3, grid, grid, generator=g, dtype=torch.float64)
        base = 0.6 * group_base[torch.arange(num_classes) % superclasses] + 0.4 * base
    patterns = F.interpolate(base, size=(image_size, image_size), mode="bilinear", align_corners=True)
    per_group = num_classes // groups

    def another(labels: torch.Tensor) -> torch.Tensor:
        """A different class of the same group (any different class without groups)."""
        if not superclasses:
            return (labels + torch.randint(1, max(num_classes, 2), labels.shape, generator=g)) % num_classes
        step = torch.randint(1, max(per_group, 2), labels.shape, generator=g) % per_group
        return labels % groups + groups * ((labels // groups + step) % per_group)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        other = another(labels)
        w = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64)
        x = w * patterns[labels] + (1 - w) * patterns[other]
        x = x + noise * torch.randn(n, 3, image_size, image_size, generator=g, dtype=torch.float64)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.int64)

    train_x, train_y = split(train_size)
    test_x, test_y = split(test_size)
    if label_noise:  # drawn last: the images and the test split are those of the same data without noise
        flipped = torch.rand(train_size, generator=g) < float(label_noise)
        train_y = torch.where(flipped, another(train_y), train_y)
    classes = [f"class{i}" for i in range(num_classes)]
    extra = ""
    if superclasses or label_noise:
        extra = f", superclasses={superclasses}, label_noise={label_noise}"
    return build_dataset(
        "synthetic",
        train_x,
        train_y,
        test_x,
        test_y,
        classes,
        source=f"synthetic(num_classes={num_classes}, image_size={image_size}, "
        f"train_size={train_size}, test_size={test_size}, seed={seed}, noise={noise}, "
        f"grid={grid}{extra})",
    )


def _load_synthetic(
    data_root: Path, *, image_size: int | None, download: bool, cache_dir: Path | None, **options: Any
) -> Dataset:
    """The registry's loader: ``make_synthetic`` at 32x32 unless ``image_size`` is given; files are not used.

    Its options are ``make_synthetic``'s keywords (the registry reads them from that signature).
    """
    return make_synthetic(image_size=32 if image_size is None else image_size, **options)
