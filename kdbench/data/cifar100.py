"""CIFAR-100 from cifar-100-python/ (or its archive): the published pickles, md5-checked."""

from __future__ import annotations

import hashlib
import io
import pickle
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kdbench.data.dataset import Dataset, build_dataset
from kdbench.errors import KdbenchError

# --------------------------------------------------------------------------------------------- CIFAR-100

CIFAR100_MEAN = (0.5071, 0.4867, 0.4408)
CIFAR100_STD = (0.2675, 0.2565, 0.2761)
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR100_FOLDER = "cifar-100-python"
CIFAR100_ARCHIVE = "cifar-100-python.tar.gz"
CIFAR100_ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
# The published md5 of each pickle (the same table torchvision's CIFAR100 checks; a test keeps them in step).
CIFAR100_MD5 = {
    "train": "16019d7e3df5f24257cddd939b257f8d",
    "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
    "meta": "7973b15100ade9c7d40fb424638fde48",
}


def _numpy_global(name: str) -> Any:
    try:
        from numpy._core import multiarray  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray  # type: ignore[no-redef]
    return getattr(multiarray, name)


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles dicts of lists, strings and numpy arrays, and nothing that could run code."""

    def find_class(self, module: str, name: str) -> Any:
        if module in ("numpy.core.multiarray", "numpy._core.multiarray") and name in ("_reconstruct", "scalar"):
            return _numpy_global(name)
        if module == "numpy" and name in ("ndarray", "dtype"):
            return getattr(np, name)
        if module == "_codecs" and name == "encode":  # how Python 3 writes bytes in protocol 2
            import _codecs

            return _codecs.encode
        raise pickle.UnpicklingError(f"refusing to load the global {module}.{name}")


def _md5(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _cifar_unpickle(data: bytes, where: str, part: str) -> dict[str, Any]:
    """Check the md5 first (so only the published files are ever unpickled), then unpickle safely."""
    expected = CIFAR100_MD5[part]
    got = _md5(data)
    if got != expected:
        raise KdbenchError(
            f"CIFAR-100 file {where} is corrupt or incomplete (md5 {got}, expected {expected}): "
            "delete it and pass --download, or copy a good cifar-100-python/ into --data-root"
        )
    try:
        obj = _ArrayUnpickler(io.BytesIO(data), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as exc:
        raise KdbenchError(f"CIFAR-100 file {where} cannot be read: {exc}") from None
    if not isinstance(obj, dict):
        raise KdbenchError(f"CIFAR-100 file {where} does not hold a dict")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(obj: dict[str, Any], where: str, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        data = np.asarray(obj["data"])
        labels = np.asarray(obj["fine_labels"], dtype=np.int64)
    except KeyError as exc:
        raise KdbenchError(f"CIFAR-100 file {where} has no {exc.args[0]!r} entry") from None
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise KdbenchError(
            f"CIFAR-100 file {where}: expected uint8 data of shape [N, 3072] and N fine labels, got "
            f"{data.dtype} {data.shape} and {len(labels)} labels"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise KdbenchError(f"CIFAR-100 file {where}: fine labels outside 0..{num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.copy())


def _cifar_missing(root: Path) -> KdbenchError:
    return KdbenchError(
        f"CIFAR-100 not found: looked for {root / CIFAR100_FOLDER}/ (train, test, meta) and {root / CIFAR100_ARCHIVE}; "
        f"pass --data-root DIR holding {CIFAR100_FOLDER}/, or --download to fetch it (169 MB) into {root}"
    )


def _load_cifar100(data_root: Path, *, image_size: int | None, download: bool, cache_dir: Path | None) -> Dataset:
    if image_size not in (None, 32):
        raise KdbenchError(f"cifar100 images are 32x32; image_size={image_size} is not supported")
    root = data_root
    parts = ("train", "test", "meta")
    # A folder holding the three pickles: DIR/cifar-100-python/ or DIR itself.
    folder = next((d for d in (root / CIFAR100_FOLDER, root) if all((d / p).is_file() for p in parts)), None)
    archive = root / CIFAR100_ARCHIVE
    if folder is None and (root / CIFAR100_FOLDER).is_dir() and not archive.is_file() and not download:
        missing = [p for p in parts if not (root / CIFAR100_FOLDER / p).is_file()]
        raise KdbenchError(
            f"CIFAR-100 folder {root / CIFAR100_FOLDER} is incomplete (missing {', '.join(missing)}): "
            "pass --download to fetch it again, or --data-root DIR holding a complete copy"
        )
    if folder is None and not archive.is_file():
        if not download:
            raise _cifar_missing(root)
        _download_cifar100(root)
        folder = root / CIFAR100_FOLDER
        if not all((folder / p).is_file() for p in parts):
            raise KdbenchError(f"the CIFAR-100 download into {root} did not produce {folder}/train, test and meta")
    blobs: dict[str, tuple[bytes, str]] = {}
    if folder is not None:
        for p in parts:
            blobs[p] = ((folder / p).read_bytes(), str(folder / p))
        source = str(folder)
    else:
        blobs = _read_cifar_archive(archive)
        source = str(archive)
    meta = _cifar_unpickle(*blobs["meta"], part="meta")
    classes = [str(c) for c in meta.get("fine_label_names", [])]
    if len(classes) != 100:
        raise KdbenchError(f"CIFAR-100 file {blobs['meta'][1]}: expected 100 fine_label_names, got {len(classes)}")
    train_x, train_y = _cifar_split(_cifar_unpickle(*blobs["train"], part="train"), blobs["train"][1], 100)
    test_x, test_y = _cifar_split(_cifar_unpickle(*blobs["test"], part="test"), blobs["test"][1], 100)
    return build_dataset(
        "cifar100", train_x, train_y, test_x, test_y, classes, mean=CIFAR100_MEAN, std=CIFAR100_STD, source=source
    )


def _read_cifar_archive(archive: Path) -> dict[str, tuple[bytes, str]]:
    """The three pickles straight from cifar-100-python.tar.gz (works on a read-only folder)."""
    data = archive.read_bytes()
    got = _md5(data)
    if got != CIFAR100_ARCHIVE_MD5:
        raise KdbenchError(
            f"CIFAR-100 archive {archive} is corrupt or incomplete (md5 {got}, expected "
            f"{CIFAR100_ARCHIVE_MD5}): delete it and pass --download"
        )
    out: dict[str, tuple[bytes, str]] = {}
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            for p in ("train", "test", "meta"):
                member = tar.extractfile(f"{CIFAR100_FOLDER}/{p}")
                if member is None:
                    raise KeyError(p)
                out[p] = (member.read(), f"{archive}:{CIFAR100_FOLDER}/{p}")
    except (KeyError, tarfile.TarError) as exc:
        raise KdbenchError(f"CIFAR-100 archive {archive} lacks {CIFAR100_FOLDER}/{exc}") from None
    return out


def _download_cifar100(root: Path) -> None:
    from torchvision.datasets.utils import download_and_extract_archive

    try:
        root.mkdir(parents=True, exist_ok=True)
        download_and_extract_archive(
            CIFAR100_URL, download_root=str(root), filename=CIFAR100_ARCHIVE, md5=CIFAR100_ARCHIVE_MD5
        )
    except (OSError, RuntimeError, ValueError) as exc:  # URLError / HTTPError are OSErrors; bad md5: RuntimeError
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise KdbenchError(
            f"could not download CIFAR-100 from {CIFAR100_URL} into {root} ({msg}); fetch "
            f"{CIFAR100_ARCHIVE} elsewhere and pass --data-root DIR holding it"
        ) from None
