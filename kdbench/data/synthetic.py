"""Deterministic class-conditional colour patterns: a learnable data set of any size, for tests and smoke runs."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from kdbench.data.dataset import Dataset, build_dataset
from kdbench.errors import KdbenchError

# --------------------------------------------------------------------------------------------- synthetic


def make_synthetic(num_classes: int = 10, image_size: int = 32, train_size: int = 2000, test_size: int = 500,
                   seed: int = 0, noise: float = 0.15, grid: int = 4) -> Dataset:
    """Deterministic, learnable class-conditional images.

    Each class owns a smooth random colour pattern (a ``grid x grid`` field of random colours, upsampled). A
    sample blends its class pattern (weight 0.5..1) with another class's pattern and adds pixel noise, so a
    classifier has to look at the spatial layout of colours, yet a small CNN learns it in a few hundred steps.
    Blends near 0.5 are ambiguous, so accuracy tops out a few points below 100% and methods can still differ.
    """
    for key, val, low in (("num_classes", num_classes, 1), ("image_size", image_size, 1),
                          ("train_size", train_size, 1), ("test_size", test_size, 1), ("grid", grid, 1)):
        if not isinstance(val, int) or isinstance(val, bool) or val < low:
            raise KdbenchError(f"synthetic dataset: {key} must be an integer >= {low}, got {val!r}")
    g = torch.Generator().manual_seed(int(seed))
    base = torch.rand(num_classes, 3, grid, grid, generator=g, dtype=torch.float64)
    patterns = F.interpolate(base, size=(image_size, image_size), mode="bilinear", align_corners=True)

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=g)]
        other = (labels + torch.randint(1, max(num_classes, 2), (n,), generator=g)) % num_classes
        w = 0.5 + 0.5 * torch.rand(n, 1, 1, 1, generator=g, dtype=torch.float64)
        x = w * patterns[labels] + (1 - w) * patterns[other]
        x = x + noise * torch.randn(n, 3, image_size, image_size, generator=g, dtype=torch.float64)
        return (x.clamp(0, 1) * 255).round().to(torch.uint8), labels.to(torch.int64)

    train_x, train_y = split(train_size)
    test_x, test_y = split(test_size)
    classes = [f"class{i}" for i in range(num_classes)]
    return build_dataset("synthetic", train_x, train_y, test_x, test_y, classes,
                   source=f"synthetic(num_classes={num_classes}, image_size={image_size}, train_size={train_size}, "
                          f"test_size={test_size}, seed={seed}, noise={noise}, grid={grid})")


def _load_synthetic(data_root: Path, *, image_size: int | None, download: bool, cache_dir: Path | None,
                    num_classes: int = 10, train_size: int = 2000, test_size: int = 500, seed: int = 0,
                    noise: float = 0.15, grid: int = 4) -> Dataset:
    return make_synthetic(num_classes=num_classes, image_size=32 if image_size is None else image_size,
                          train_size=train_size, test_size=test_size, seed=seed, noise=noise, grid=grid)
