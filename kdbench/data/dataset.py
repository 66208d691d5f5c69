"""The dataset record: a whole split pair as uint8 CPU tensors, its statistics and its checksum."""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from kdbench.data.loader import GPULoader


def default_data_root() -> Path:
    """Where datasets are looked for (and downloaded to) when no data_root is given."""
    env = os.environ.get("KDBENCH_DATA_ROOT")
    return Path(env).expanduser() if env else Path("~/.cache/kdbench/data").expanduser()


def default_cache_dir() -> Path:
    """Where decoded caches go when the data's own folder is read-only."""
    env = os.environ.get("KDBENCH_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/kdbench").expanduser()


# ---------------------------------------------------------------------------------------------- Dataset


@dataclass(repr=False, eq=False)
class Dataset:
    """A whole image classification data set as CPU tensors (uint8 images, int64 labels)."""

    name: str
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor
    classes: list[str]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    checksum: str
    class_ids: list[str] = field(default_factory=list)  # e.g. WordNet ids; defaults to ``classes``
    source: str = ""  # where it was read from (informative only, not part of the identity)

    def __post_init__(self) -> None:
        if not self.class_ids:
            self.class_ids = list(self.classes)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> int:
        return int(self.train_images.shape[-1])

    @property
    def num_train(self) -> int:
        return int(self.train_images.shape[0])

    @property
    def num_test(self) -> int:
        return int(self.test_images.shape[0])

    def train_loader(
        self,
        batch_size: int,
        *,
        device: str | torch.device = "cpu",
        seed: int = 0,
        drop_last: bool = False,
        pad: int | None = None,
    ) -> GPULoader:
        """Shuffled, augmented batches of the training split.

        ``pad`` is the random crop's zero padding; by default an eighth of the image side, which is CIFAR's 4 pixels
        at 32x32 and keeps the same relative jitter at other sizes (2 pixels at 16x16).
        """
        if pad is None:
            pad = max(1, self.image_size // 8)
        return GPULoader(
            self.train_images,
            self.train_labels,
            batch_size=batch_size,
            train=True,
            mean=self.mean,
            std=self.std,
            seed=seed,
            drop_last=drop_last,
            device=device,
            pad=pad,
        )

    def test_loader(self, batch_size: int, *, device: str | torch.device = "cpu") -> GPULoader:
        """The test split in order, unaugmented."""
        return GPULoader(
            self.test_images,
            self.test_labels,
            batch_size=batch_size,
            train=False,
            mean=self.mean,
            std=self.std,
            device=device,
        )

    def __repr__(self) -> str:
        return (
            f"Dataset({self.name!r}, classes={self.num_classes}, train={tuple(self.train_images.shape)}, "
            f"test={tuple(self.test_images.shape)}, checksum={self.checksum[:12]})"
        )


def data_checksum(
    train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor, test_labels: torch.Tensor
) -> str:
    """sha256 over the decoded tensors (dtype, shape and bytes of each): the identity of the data itself."""
    h = hashlib.sha256()
    for key, t in (
        ("train_images", train_images),
        ("train_labels", train_labels),
        ("test_images", test_images),
        ("test_labels", test_labels),
    ):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{str(t.dtype).removeprefix('torch.')}:{tuple(t.shape)};".encode())
        h.update(t.numpy().reshape(-1).view(np.uint8).data)
    return h.hexdigest()


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """Per-channel mean and (population) std of uint8 ``[N, C, H, W]`` images scaled to [0, 1].

    Computed exactly from per-channel value histograms, so the result does not depend on summation order.
    """
    if images.dtype != torch.uint8 or images.dim() != 4:
        raise ValueError(f"expected uint8 [N,C,H,W] images, got {images.dtype} {tuple(images.shape)}")
    values = torch.arange(256, dtype=torch.float64)
    means, stds = [], []
    for c in range(images.shape[1]):
        counts = torch.bincount(images[:, c].reshape(-1), minlength=256).to(torch.float64)
        n = counts.sum()
        mean = (counts * values).sum() / n
        var = (counts * (values - mean) ** 2).sum() / n
        means.append(float(mean) / 255.0)
        stds.append(math.sqrt(float(var)) / 255.0)
    return tuple(means), tuple(stds)  # type: ignore[return-value]


def build_dataset(
    name: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    test_images: torch.Tensor,
    test_labels: torch.Tensor,
    classes: list[str],
    *,
    mean=None,
    std=None,
    checksum=None,
    class_ids: list[str] | None = None,
    source: str = "",
) -> Dataset:
    """Build a Dataset, computing the statistics and the checksum where they are not given (cached)."""
    if mean is None or std is None:
        mean, std = channel_stats(train_images)
    if checksum is None:
        checksum = data_checksum(train_images, train_labels, test_images, test_labels)
    return Dataset(
        name,
        train_images,
        train_labels,
        test_images,
        test_labels,
        list(classes),
        tuple(float(m) for m in mean),
        tuple(float(s) for s in std),
        checksum,  # type: ignore[arg-type]
        class_ids=list(class_ids or []),
        source=source,
    )
