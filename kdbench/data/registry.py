"""The dataset registry: names -> loaders, and ``load_dataset``."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdbench.data.cifar100 import _load_cifar100
from kdbench.data.dataset import Dataset, default_data_root
from kdbench.data.imagenet import _load_imagenet
from kdbench.data.stl10 import _load_stl10
from kdbench.data.synthetic import _load_synthetic, make_synthetic
from kdbench.data.tinyimagenet import _load_tinyimagenet
from kdbench.errors import KdbenchError

# -------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its one-line description and its loader.

    ``options_from`` is the function whose keyword parameters are the dataset's options when the loader passes
    them on as ``**options`` (default: the loader itself).
    """

    name: str
    description: str
    loader: Callable[..., Dataset]
    options_from: Callable[..., Any] | None = None

    def options(self) -> list[str]:
        """The dataset-specific keyword options its loader takes (beyond the common ones)."""
        common = {"data_root", "image_size", "download", "cache_dir"}
        params = inspect.signature(self.options_from or self.loader).parameters.values()
        named = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        return [p.name for p in params if p.kind in named and p.name not in common]


DATASETS: dict[str, DatasetSpec] = {
    "cifar100": DatasetSpec(
        "cifar100", "CIFAR-100: 100 classes, 50k/10k 32x32 images (cifar-100-python/, md5-checked)", _load_cifar100
    ),
    "tinyimagenet": DatasetSpec(
        "tinyimagenet",
        "Tiny-ImageNet (200 classes, or its 100-class subset) from its "
        "folder or zip(s), resized to 32x32 (image_size=64 keeps it)",
        _load_tinyimagenet,
    ),
    "stl10": DatasetSpec(
        "stl10",
        "STL-10 labelled splits (5k/8k, 10 classes) from stl10_binary/, resized to 32x32 "
        "(image_size=96 keeps them); for the transfer probe",
        _load_stl10,
    ),
    "imagenet": DatasetSpec(
        "imagenet",
        "ImageNet folders train/<wnid>/*.JPEG and val/<wnid>/*.JPEG, decoded and augmented in DataLoader workers "
        "(RandomResizedCrop 224 + flip; resize 256 + center crop 224); options resize_size, num_workers",
        _load_imagenet,
    ),
    "synthetic": DatasetSpec(
        "synthetic",
        "deterministic class-conditional colour patterns of any size and class count, for tests and smoke runs",
        _load_synthetic,
        options_from=make_synthetic,
    ),
}


def list_datasets() -> list[tuple[str, str]]:
    """(name, one-line description) of every dataset."""
    return [(spec.name, spec.description) for spec in DATASETS.values()]


def load_dataset(
    name: str,
    data_root: str | Path | None = None,
    *,
    image_size: int | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
    **options: Any,
) -> Dataset:
    """Load a dataset by name as uint8 CPU tensors.

    ``data_root`` is where its files are (default ``~/.cache/kdbench/data`` or ``$KDBENCH_DATA_ROOT``);
    ``download`` fetches missing files there. Decoded caches go into ``cache_dir`` when it is given, else next to
    the data, or into ``~/.cache/kdbench`` (``$KDBENCH_CACHE_DIR``) when the data's folder is read-only.
    ``options`` are the dataset's own (synthetic: num_classes, train_size, test_size, seed, noise, grid,
    superclasses, label_noise; tinyimagenet: progress, num_workers, cache; imagenet: resize_size, num_workers).
    """
    spec = DATASETS.get(name)
    if spec is None:
        raise KdbenchError(f"unknown dataset {name!r}; valid: {', '.join(sorted(DATASETS))}")
    allowed = spec.options()
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        takes = f"it takes {', '.join(allowed)}" if allowed else "it takes none"
        raise KdbenchError(f"dataset {name!r} has no option(s) {', '.join(unknown)}; {takes}")
    root = Path(data_root).expanduser() if data_root is not None else default_data_root()
    cdir = Path(cache_dir).expanduser() if cache_dir is not None else None
    return spec.loader(root, image_size=image_size, download=download, cache_dir=cdir, **options)
