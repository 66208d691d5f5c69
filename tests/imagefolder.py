"""A tiny ImageNet-style folder (train/<wnid>/*.JPEG, val/<wnid>/*.JPEG) generated for the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def make_imagefolder(
    root: Path, classes: int = 4, train_per_class: int = 8, val_per_class: int = 2, size: int = 32, seed: int = 0
) -> Path:
    """JPEGs of a class colour plus noise, in the layout torchvision's ImageFolder reads; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for c in range(classes):
            folder = root / split / f"n{c:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            colour = np.array([(c * 67) % 256, (c * 139) % 256, (c * 211) % 256], dtype=np.float32)
            for i in range(per_class):
                pixels = colour + rng.normal(0, 40, (size, size + 4 * (i % 3), 3))  # a few aspect ratios
                img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
                img.save(folder / f"n{c:08d}_{i}.JPEG", quality=90)
    return root
