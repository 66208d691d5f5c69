"""STL-10's labelled splits from stl10_binary/ (the transfer probe's target)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kdbench.data.dataset import Dataset, build_dataset
from kdbench.errors import KdbenchError

# ----------------------------------------------------------------------------------------------- STL-10

STL10_FOLDER = "stl10_binary"
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]


def _load_stl10(data_root: Path, *, image_size: int | None, download: bool, cache_dir: Path | None) -> Dataset:
    """The labelled STL-10 splits (5,000 train / 8,000 test, 96x96) from DIR/stl10_binary/, resized like
    torchvision's Resize (PIL bilinear) to image_size (default 32, the size of the CRD transfer experiment)."""
    size = 32 if image_size is None else int(image_size)
    if size <= 0:
        raise KdbenchError(f"image_size must be positive, got {image_size}")
    folder = data_root / STL10_FOLDER
    parts = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin")
    if not all((folder / p).is_file() for p in parts) and download:
        try:
            from torchvision.datasets import STL10

            STL10(str(data_root), split="train", download=True)
        except (OSError, RuntimeError, ValueError) as exc:
            msg = " ".join(str(exc).split())
            raise KdbenchError(
                f"could not download STL-10 into {data_root} ({msg}); fetch stl10_binary.tar.gz "
                f"elsewhere and pass --data-root DIR holding {STL10_FOLDER}/"
            ) from None
    missing = [p for p in parts if not (folder / p).is_file()]
    if missing:
        raise KdbenchError(
            f"STL-10 not found: looked for {folder}/ ({', '.join(missing)} missing); pass --data-root "
            f"DIR holding {STL10_FOLDER}/, or --download to fetch it (2.6 GB) into {data_root}"
        )

    def split(name: str) -> tuple[torch.Tensor, torch.Tensor]:
        raw = np.fromfile(folder / f"{name}_X.bin", dtype=np.uint8)
        labels = np.fromfile(folder / f"{name}_y.bin", dtype=np.uint8).astype(np.int64) - 1
        if raw.size != len(labels) * 3 * 96 * 96 or (len(labels) and (labels.min() < 0 or labels.max() > 9)):
            raise KdbenchError(f"STL-10 files {folder}/{name}_X.bin / {name}_y.bin are truncated or inconsistent")
        # Each image is stored channel by channel, column-major: transpose to [N, 3, H, W] rows first.
        images = raw.reshape(-1, 3, 96, 96).transpose(0, 1, 3, 2)
        if size != 96:
            from PIL import Image

            hwc = images.transpose(0, 2, 3, 1)
            images = np.stack(
                [
                    np.asarray(
                        Image.fromarray(np.ascontiguousarray(im)).resize((size, size), Image.Resampling.BILINEAR)
                    )
                    for im in hwc
                ]
            ).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)

    train_x, train_y = split("train")
    test_x, test_y = split("test")
    names = folder / "class_names.txt"
    classes = names.read_text().split() if names.is_file() else list(STL10_CLASSES)
    return build_dataset(
        "stl10", train_x, train_y, test_x, test_y, classes if len(classes) == 10 else STL10_CLASSES, source=str(folder)
    )
