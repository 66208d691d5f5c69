"""Datasets (cifar100, tinyimagenet, synthetic) as uint8 tensors, and the device-resident loader.

Every dataset is decoded once into uint8 ``[N, 3, H, W]`` tensors with int64 labels, its class names, the
per-channel normalisation statistics and a checksum of the decoded data (its stable identity in results).
``GPULoader`` keeps such a tensor on the training device and does the standard CIFAR augmentation there,
batched (random crop with zero padding + horizontal flip), so no worker processes or PIL sit in the loop.
Batches are a deterministic function of (seed, epoch): resuming at epoch e needs no loader state.
"""

from __future__ import annotations

import concurrent.futures as cf
import hashlib
import inspect
import io
import json
import logging
import math
import multiprocessing as mp
import os
import pickle
import re
import tarfile
import time
import warnings
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from kdbench.errors import KdbenchError
from kdbench.method import Batch

__all__ = [
    "CIFAR100_MEAN",
    "CIFAR100_STD",
    "DATASETS",
    "Dataset",
    "DatasetSpec",
    "GPULoader",
    "channel_stats",
    "crop_flip",
    "data_checksum",
    "default_cache_dir",
    "default_data_root",
    "epoch_seed",
    "list_datasets",
    "load_dataset",
]


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

    def train_loader(self, batch_size: int, *, device: str | torch.device = "cpu", seed: int = 0,
                     drop_last: bool = False, pad: int | None = None) -> GPULoader:
        """Shuffled, augmented batches of the training split.

        ``pad`` is the random crop's zero padding; by default an eighth of the image side, which is CIFAR's 4 pixels
        at 32x32 and keeps the same relative jitter at other sizes (2 pixels at 16x16).
        """
        if pad is None:
            pad = max(1, self.image_size // 8)
        return GPULoader(self.train_images, self.train_labels, batch_size=batch_size, train=True, mean=self.mean,
                         std=self.std, seed=seed, drop_last=drop_last, device=device, pad=pad)

    def test_loader(self, batch_size: int, *, device: str | torch.device = "cpu") -> GPULoader:
        """The test split in order, unaugmented."""
        return GPULoader(self.test_images, self.test_labels, batch_size=batch_size, train=False, mean=self.mean,
                         std=self.std, device=device)

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, classes={self.num_classes}, train={tuple(self.train_images.shape)}, "
                f"test={tuple(self.test_images.shape)}, checksum={self.checksum[:12]})")


def data_checksum(train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
                  test_labels: torch.Tensor) -> str:
    """sha256 over the decoded tensors (dtype, shape and bytes of each): the identity of the data itself."""
    h = hashlib.sha256()
    for key, t in (("train_images", train_images), ("train_labels", train_labels), ("test_images", test_images),
                   ("test_labels", test_labels)):
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


def _finish(name: str, train_images: torch.Tensor, train_labels: torch.Tensor, test_images: torch.Tensor,
            test_labels: torch.Tensor, classes: list[str], *, mean=None, std=None, checksum=None,
            class_ids: list[str] | None = None, source: str = "") -> Dataset:
    """Build a Dataset, computing the statistics and the checksum where they are not given (cached)."""
    if mean is None or std is None:
        mean, std = channel_stats(train_images)
    if checksum is None:
        checksum = data_checksum(train_images, train_labels, test_images, test_labels)
    return Dataset(name, train_images, train_labels, test_images, test_labels, list(classes),
                   tuple(float(m) for m in mean), tuple(float(s) for s in std), checksum,  # type: ignore[arg-type]
                   class_ids=list(class_ids or []), source=source)


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
        raise KdbenchError(f"CIFAR-100 file {where} is corrupt or incomplete (md5 {got}, expected {expected}): "
                           "delete it and pass --download, or copy a good cifar-100-python/ into --data-root")
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
        raise KdbenchError(f"CIFAR-100 file {where}: expected uint8 data of shape [N, 3072] and N fine labels, got "
                           f"{data.dtype} {data.shape} and {len(labels)} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise KdbenchError(f"CIFAR-100 file {where}: fine labels outside 0..{num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32).copy())
    return images, torch.from_numpy(labels.copy())


def _cifar_missing(root: Path) -> KdbenchError:
    return KdbenchError(
        f"CIFAR-100 not found: looked for {root / CIFAR100_FOLDER}/ (train, test, meta) and {root / CIFAR100_ARCHIVE}; "
        f"pass --data-root DIR holding {CIFAR100_FOLDER}/, or --download to fetch it (169 MB) into {root}")


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
        raise KdbenchError(f"CIFAR-100 folder {root / CIFAR100_FOLDER} is incomplete (missing {', '.join(missing)}): "
                           "pass --download to fetch it again, or --data-root DIR holding a complete copy")
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
    return _finish("cifar100", train_x, train_y, test_x, test_y, classes, mean=CIFAR100_MEAN, std=CIFAR100_STD,
                   source=source)


def _read_cifar_archive(archive: Path) -> dict[str, tuple[bytes, str]]:
    """The three pickles straight from cifar-100-python.tar.gz (works on a read-only folder)."""
    data = archive.read_bytes()
    got = _md5(data)
    if got != CIFAR100_ARCHIVE_MD5:
        raise KdbenchError(f"CIFAR-100 archive {archive} is corrupt or incomplete (md5 {got}, expected "
                           f"{CIFAR100_ARCHIVE_MD5}): delete it and pass --download")
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
        download_and_extract_archive(CIFAR100_URL, download_root=str(root), filename=CIFAR100_ARCHIVE,
                                     md5=CIFAR100_ARCHIVE_MD5)
    except (OSError, RuntimeError, ValueError) as exc:  # URLError / HTTPError are OSErrors; bad md5: RuntimeError
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise KdbenchError(f"could not download CIFAR-100 from {CIFAR100_URL} into {root} ({msg}); fetch "
                           f"{CIFAR100_ARCHIVE} elsewhere and pass --data-root DIR holding it") from None


# ------------------------------------------------------------------------------------------ Tiny-ImageNet

TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
_IMAGE_EXTS = (".jpeg", ".jpg", ".png")
_CACHE_VERSION = 1
_log = logging.getLogger(__name__)  # the CLI shows these messages on stderr
_CHUNK = 1000  # images per decoding task


def _natural_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


@dataclass
class _TinySource:
    """The files of one Tiny-ImageNet copy: ``rel path -> (zip path or None, member or file path)``."""

    root: Path  # the data_root it was found in (the cache goes next to it)
    where: str  # for messages and Dataset.source
    files: dict[str, tuple[str | None, str]]
    stamps: list[tuple[str, int, int]]  # (name, size, mtime_ns) of what was read: the cache key
    zips: dict[str, zipfile.ZipFile] = field(default_factory=dict)  # open archives (parsing one costs ~0.1 s)

    def read(self, rel: str) -> bytes:
        container, member = self.files[rel]
        return _read_member(container, member, self.zips)

    def close(self) -> None:
        for zf in self.zips.values():
            zf.close()
        self.zips.clear()


def _read_member(container: str | None, member: str, zips: dict[str, zipfile.ZipFile]) -> bytes:
    if container is None:
        return Path(member).read_bytes()
    zf = zips.get(container)
    if zf is None:
        zf = zips[container] = zipfile.ZipFile(container)
    return zf.read(member)


def _tiny_missing(root: Path) -> KdbenchError:
    return KdbenchError(
        f"Tiny-ImageNet not found in {root}: expected a folder holding wnids.txt, words.txt, train/ and val/ "
        "(e.g. tiny-imagenet-200/) or its zip archive(s) (tiny-imagenet-200.zip, or train-part*.zip + "
        "val-and-meta.zip); pass --data-root DIR holding them, or --download for tiny-imagenet-200.zip")


def _find_tiny(root: Path) -> _TinySource:
    if root.is_file() and root.suffix.lower() == ".zip":
        return _tiny_from_zips(root.parent, [root])
    if not root.is_dir():
        raise _tiny_missing(root)
    folders = [root] if (root / "wnids.txt").is_file() else sorted(p.parent for p in root.glob("*/wnids.txt"))
    if len(folders) > 1:
        raise KdbenchError(f"several Tiny-ImageNet folders in {root} ({', '.join(p.name for p in folders)}): "
                           "pass --data-root pointing at one of them")
    if folders:
        return _tiny_from_folder(root, folders[0])
    zips = sorted(root.glob("*.zip"))
    if not zips:
        raise _tiny_missing(root)
    return _tiny_from_zips(root, zips)


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_EXTS)


def _tiny_from_folder(root: Path, folder: Path) -> _TinySource:
    files: dict[str, tuple[str | None, str]] = {}
    stamps: list[tuple[str, int, int]] = []

    def add(rel: str, path: str, st: os.stat_result) -> None:
        files[rel] = (None, path)
        stamps.append((rel, st.st_size, st.st_mtime_ns))

    for rel in ("wnids.txt", "words.txt", "val/val_annotations.txt"):
        p = folder / rel
        if p.is_file():
            add(rel, str(p), p.stat())
    for sub in [folder / "val" / "images", *sorted((folder / "train").glob("*/images"))]:
        prefix = sub.relative_to(folder).as_posix()
        with os.scandir(sub) as it:
            for entry in it:
                if entry.is_file() and _is_image(entry.name):
                    add(f"{prefix}/{entry.name}", entry.path, entry.stat())
    stamps.sort()
    return _TinySource(root, str(folder), files, stamps)


def _tiny_from_zips(root: Path, zips: list[Path]) -> _TinySource:
    listing: dict[Path, list[str]] = {}
    opened: dict[str, zipfile.ZipFile] = {}
    for z in zips:
        try:
            opened[str(z)] = zipfile.ZipFile(z)
        except (zipfile.BadZipFile, OSError) as exc:
            for zf in opened.values():
                zf.close()
            raise KdbenchError(f"{z} is not a readable zip archive ({exc}): delete or replace it") from None
        listing[z] = opened[str(z)].namelist()
    prefixes = sorted({n[: -len("wnids.txt")] for names in listing.values() for n in names
                       if n.endswith("wnids.txt") and (n == "wnids.txt" or n.endswith("/wnids.txt"))})
    if len(prefixes) != 1:
        for zf in opened.values():
            zf.close()
    if not prefixes:
        raise KdbenchError(f"no wnids.txt in the zip archives in {root} ({', '.join(z.name for z in zips)}): "
                           "they do not hold Tiny-ImageNet; pass --data-root DIR holding its zip(s) or folder")
    if len(prefixes) > 1:
        raise KdbenchError(f"several Tiny-ImageNet copies in the zips in {root} "
                           f"({', '.join(p.rstrip('/') or '.' for p in prefixes)}): keep one, or pass --data-root "
                           "pointing at a folder holding only one")
    prefix = prefixes[0]
    files: dict[str, tuple[str | None, str]] = {}
    stamps: list[tuple[str, int, int]] = []
    for z, names in listing.items():
        used = False
        for n in names:
            if n.startswith(prefix) and not n.endswith("/"):
                files.setdefault(n[len(prefix):], (str(z), n))
                used = True
        if used:
            st = z.stat()
            stamps.append((z.name, st.st_size, st.st_mtime_ns))
    used_zips = {str(root / s[0]) for s in stamps}
    for name in [n for n in opened if n not in used_zips]:
        opened.pop(name).close()
    return _TinySource(root, f"{root} ({', '.join(s[0] for s in stamps)})", files, stamps, opened)


def _tiny_index(src: _TinySource) -> tuple[list[str], list[str], list[str], list[int], list[str], list[int]]:
    """wnids, class names, train files + labels, val files + labels, all from the metadata files."""
    if "wnids.txt" not in src.files:
        raise _tiny_missing(src.root)
    wnids = [w.strip() for w in src.read("wnids.txt").decode("utf-8").splitlines() if w.strip()]
    if not wnids or len(set(wnids)) != len(wnids):
        raise KdbenchError(f"wnids.txt in {src.where} is empty or repeats an id")
    index = {w: i for i, w in enumerate(wnids)}
    words: dict[str, str] = {}
    if "words.txt" in src.files:
        for line in src.read("words.txt").decode("utf-8").splitlines():
            wnid, _, text = line.partition("\t")
            if wnid.strip() in index:
                words[wnid.strip()] = text.strip()
    names = [words.get(w) or w for w in wnids]

    by_class: dict[str, list[str]] = {w: [] for w in wnids}
    val_files: list[str] = []
    for rel in src.files:
        parts = rel.split("/")
        if len(parts) == 4 and parts[0] == "train" and parts[2] == "images" and _is_image(parts[3]):
            if parts[1] in by_class:
                by_class[parts[1]].append(rel)
        elif len(parts) == 3 and parts[:2] == ["val", "images"] and _is_image(parts[2]):
            val_files.append(rel)
    train_files: list[str] = []
    train_labels: list[int] = []
    for w in wnids:
        if not by_class[w]:
            raise KdbenchError(f"Tiny-ImageNet in {src.where}: no training images under train/{w}/images/ "
                               "(is an archive or part of the folder missing?)")
        train_files += sorted(by_class[w], key=_natural_key)
        train_labels += [index[w]] * len(by_class[w])

    if "val/val_annotations.txt" not in src.files:
        raise KdbenchError(f"Tiny-ImageNet in {src.where}: val/val_annotations.txt is missing")
    ann: dict[str, str] = {}
    for line in src.read("val/val_annotations.txt").decode("utf-8").splitlines():
        cols = line.split("\t")
        if len(cols) >= 2 and cols[0].strip():
            ann[cols[0].strip()] = cols[1].strip()
    val_files.sort(key=_natural_key)
    present = {rel.rsplit("/", 1)[1] for rel in val_files}
    missing = [f for f in ann if f not in present]
    if missing:
        raise KdbenchError(f"Tiny-ImageNet in {src.where}: {len(missing)} validation image(s) listed in "
                           f"val_annotations.txt are missing from val/images/ (e.g. {missing[0]})")
    val_labels: list[int] = []
    for rel in val_files:
        fname = rel.rsplit("/", 1)[1]
        wnid = ann.get(fname)
        if wnid is None:
            raise KdbenchError(f"Tiny-ImageNet in {src.where}: val/images/{fname} has no line in val_annotations.txt")
        if wnid not in index:
            raise KdbenchError(f"Tiny-ImageNet in {src.where}: val/images/{fname} is labelled {wnid}, "
                               "which is not in wnids.txt")
        val_labels.append(index[wnid])
    if not val_files:
        raise KdbenchError(f"Tiny-ImageNet in {src.where}: no images under val/images/")
    return wnids, names, train_files, train_labels, val_files, val_labels


def _decode_image(data: bytes, size: int, name: str) -> np.ndarray:
    """One image file -> uint8 [size, size, 3]: converted to RGB, then PIL bilinear (antialiased) resize."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise KdbenchError(f"cannot decode image {name}: {exc}") from None
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb, dtype=np.uint8)


_WORKER_ZIPS: dict[str, zipfile.ZipFile] = {}  # a worker process keeps its archives open between chunks


def _decode_chunk(container: str | None, members: list[str], size: int,
                  zips: dict[str, zipfile.ZipFile] | None = None) -> np.ndarray:
    """Decode a list of files from one zip (or from the file system); runs in a worker process."""
    zips = _WORKER_ZIPS if zips is None else zips
    out = np.empty((len(members), size, size, 3), dtype=np.uint8)
    for i, m in enumerate(members):
        try:
            data = _read_member(container, m, zips)
        except (zipfile.BadZipFile, OSError) as exc:  # a bad CRC-32 lands here: every member read is checked
            raise KdbenchError(f"cannot read {f'{container}:{m}' if container else m}: {exc}") from None
        out[i] = _decode_image(data, size, f"{container}:{m}" if container else m)
    return out


def _default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    return max(1, min(n, 16))


def _decode_all(src: _TinySource, rels: list[str], size: int, *, num_workers: int | None, progress: bool,
                desc: str) -> np.ndarray:
    """Decode ``rels`` into one uint8 [N, size, size, 3] array, in a process pool when it pays off."""
    tasks: list[tuple[int, str | None, list[str]]] = []  # (start, container, members)
    start = 0
    while start < len(rels):
        container = src.files[rels[start]][0]
        stop = start
        members: list[str] = []
        while stop < len(rels) and len(members) < _CHUNK and src.files[rels[stop]][0] == container:
            members.append(src.files[rels[stop]][1])
            stop += 1
        tasks.append((start, container, members))
        start = stop
    out = np.empty((len(rels), size, size, 3), dtype=np.uint8)
    workers = _default_workers() if num_workers is None else max(1, int(num_workers))
    workers = min(workers, len(tasks))

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                       TimeRemainingColumn(), transient=True)
        bar.start()
        task_id = bar.add_task(desc, total=len(rels))
    def advance(n: int) -> None:
        if bar is not None:
            bar.advance(task_id, n)

    def serial() -> None:
        for s, container, members in tasks:
            out[s:s + len(members)] = _decode_chunk(container, members, size, src.zips)
            advance(len(members))

    try:
        if workers <= 1 or len(rels) < 4 * _CHUNK:
            serial()
        else:
            try:
                _decode_in_pool(tasks, size, workers, out, advance)
            except cf.process.BrokenProcessPool:  # a worker died (spawn without a __main__ guard, OOM): go on here
                if bar is not None:
                    bar.reset(task_id)
                serial()
    finally:
        if bar is not None:
            bar.stop()
    return out


def _decode_in_pool(tasks: list[tuple[int, str | None, list[str]]], size: int, workers: int, out: np.ndarray,
                    advance: Callable[[int], Any]) -> None:
    # fork where there is one: the workers touch only zipfile, PIL and numpy (no torch, no threads), and, unlike
    # spawn / forkserver, fork does not re-run the user's __main__ script.
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*fork.*", category=DeprecationWarning)
        with cf.ProcessPoolExecutor(max_workers=workers, mp_context=mp.get_context(method)) as pool:
            futures = {pool.submit(_decode_chunk, c, m, size): (s, len(m)) for s, c, m in tasks}
            try:
                for fut in cf.as_completed(futures):
                    s, n = futures[fut]
                    out[s:s + n] = fut.result()
                    advance(n)
            except BaseException:
                for f in futures:
                    f.cancel()
                raise


def _cache_key(src: _TinySource, image_size: int) -> str:
    payload = {"format": "kdbench-tinyimagenet", "version": _CACHE_VERSION, "image_size": image_size,
               "files": src.stamps}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_cache(path: Path, key: str) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError, pickle.UnpicklingError):  # unreadable: decode again
        return None
    if not isinstance(blob, dict) or blob.get("key") != key or blob.get("version") != _CACHE_VERSION:
        return None
    return blob


def _writable(d: Path) -> bool:
    """Whether caches may be written into ``d`` (created if missing).

    A folder with no write bit at all counts as read-only even for root, who could write there anyway.
    """
    try:
        d.mkdir(parents=True, exist_ok=True)
        return os.access(d, os.W_OK) and bool(d.stat().st_mode & 0o222)
    except OSError:
        return False


def _write_cache(dirs: Sequence[Path], stem: str, blob: dict[str, Any]) -> Path | None:
    """Write atomically into the first writable folder; remove stale caches of the same data there."""
    for d in dirs:
        path = d / f"{stem}-{blob['key'][:16]}.pt"
        tmp = d / f".{path.name}.{os.getpid()}.tmp"
        try:
            if not _writable(d):
                continue
            torch.save(blob, tmp)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            continue
        for old in d.glob(f"{stem}-*.pt"):
            if old != path:
                old.unlink(missing_ok=True)
        return path
    return None


def _load_tinyimagenet(data_root: Path, *, image_size: int | None, download: bool, cache_dir: Path | None,
                       progress: bool = False, num_workers: int | None = None, cache: bool = True) -> Dataset:
    size = 32 if image_size is None else int(image_size)
    if size <= 0:
        raise KdbenchError(f"image_size must be positive, got {image_size}")
    try:
        src = _find_tiny(data_root)
    except KdbenchError:
        if not download:
            raise
        _download_tiny(data_root)
        src = _find_tiny(data_root)
    try:
        return _tiny_dataset(src, size, cache_dir=cache_dir, progress=progress, num_workers=num_workers,
                             cache=cache)
    finally:
        src.close()


def _tiny_dataset(src: _TinySource, size: int, *, cache_dir: Path | None, progress: bool, num_workers: int | None,
                  cache: bool) -> Dataset:
    wnids, names, train_rels, train_labels, val_rels, val_labels = _tiny_index(src)
    key = _cache_key(src, size)
    stem = f"tinyimagenet{len(wnids)}-{size}px"
    # An explicit cache_dir is where caches go; by default they go next to the data, or to ~/.cache/kdbench
    # when that folder is read-only. A valid cache is read from either place.
    dirs = [cache_dir, src.root] if cache_dir is not None else [src.root, default_cache_dir()]
    dirs = list(dict.fromkeys(d.resolve() for d in dirs))
    if cache:
        for d in dirs:
            blob = _read_cache(d / f"{stem}-{key[:16]}.pt", key)
            if blob is not None:
                return _finish("tinyimagenet", blob["train_images"], blob["train_labels"], blob["test_images"],
                               blob["test_labels"], blob["classes"], mean=blob["mean"], std=blob["std"],
                               checksum=blob["checksum"], class_ids=blob["class_ids"], source=src.where)

    t0 = time.perf_counter()
    where = " or ".join(str(d) for d in (dirs if cache_dir is None else dirs[:1]))
    _log.info(f"decoding {len(train_rels) + len(val_rels):,} Tiny-ImageNet images ({len(wnids)} classes) from "
              f"{src.where}, resized to {size}x{size}"
              + (f": first use only (about a minute on 2 cores), then cached in {where}" if cache else ""))
    pixels = _decode_all(src, train_rels + val_rels, size, num_workers=num_workers, progress=progress,
                         desc=f"decoding Tiny-ImageNet ({len(wnids)} classes, {size}px)")
    n = len(train_rels)
    train_x = torch.from_numpy(pixels[:n]).permute(0, 3, 1, 2).contiguous()
    test_x = torch.from_numpy(pixels[n:]).permute(0, 3, 1, 2).contiguous()
    del pixels
    ds = _finish("tinyimagenet", train_x, torch.tensor(train_labels, dtype=torch.int64), test_x,
                 torch.tensor(val_labels, dtype=torch.int64), names, class_ids=wnids, source=src.where)
    if cache:
        written = _write_cache(dirs if cache_dir is None else dirs[:1], stem, {
            "version": _CACHE_VERSION, "key": key, "train_images": ds.train_images, "train_labels": ds.train_labels,
            "test_images": ds.test_images, "test_labels": ds.test_labels, "classes": ds.classes,
            "class_ids": ds.class_ids, "mean": list(ds.mean), "std": list(ds.std), "checksum": ds.checksum,
        })
        _log.info(f"decoded in {time.perf_counter() - t0:.0f} s; " + (f"cached as {written}" if written else
                  "no writable cache folder: the next run decodes again"))
    return ds


def _download_tiny(root: Path) -> None:
    from torchvision.datasets.utils import download_url

    try:
        root.mkdir(parents=True, exist_ok=True)
        # No published md5: every member is still checked against its CRC-32 when it is read from the zip.
        download_url(TINY_IMAGENET_URL, str(root), filename="tiny-imagenet-200.zip")
    except (OSError, RuntimeError, ValueError) as exc:
        msg = " ".join(str(exc).split()) or type(exc).__name__
        raise KdbenchError(f"could not download Tiny-ImageNet from {TINY_IMAGENET_URL} into {root} ({msg}); fetch "
                           "tiny-imagenet-200.zip elsewhere and pass --data-root DIR holding it") from None


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
            raise KdbenchError(f"could not download STL-10 into {data_root} ({msg}); fetch stl10_binary.tar.gz "
                               f"elsewhere and pass --data-root DIR holding {STL10_FOLDER}/") from None
    missing = [p for p in parts if not (folder / p).is_file()]
    if missing:
        raise KdbenchError(f"STL-10 not found: looked for {folder}/ ({', '.join(missing)} missing); pass --data-root "
                           f"DIR holding {STL10_FOLDER}/, or --download to fetch it (2.6 GB) into {data_root}")

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
            images = np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(im)).resize(
                (size, size), Image.Resampling.BILINEAR)) for im in hwc]).transpose(0, 3, 1, 2)
        return torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels)

    train_x, train_y = split("train")
    test_x, test_y = split("test")
    names = folder / "class_names.txt"
    classes = names.read_text().split() if names.is_file() else list(STL10_CLASSES)
    return _finish("stl10", train_x, train_y, test_x, test_y, classes if len(classes) == 10 else STL10_CLASSES,
                   source=str(folder))


# --------------------------------------------------------------------------------------------- synthetic


def make_synthetic(num_classes: int = 10, image_size: int = 32, train_size: int = 2000, test_size: int = 500,
                   seed: int = 0, noise: float = 0.15, grid: int = 4, superclasses: int = 0,
                   label_noise: float = 0.0) -> Dataset:
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
    for key, val, low in (("num_classes", num_classes, 1), ("image_size", image_size, 1),
                          ("train_size", train_size, 1), ("test_size", test_size, 1), ("grid", grid, 1),
                          ("superclasses", superclasses, 0)):
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
    return _finish("synthetic", train_x, train_y, test_x, test_y, classes,
                   source=f"synthetic(num_classes={num_classes}, image_size={image_size}, train_size={train_size}, "
                          f"test_size={test_size}, seed={seed}, noise={noise}, grid={grid}{extra})")


def _load_synthetic(data_root: Path, *, image_size: int | None, download: bool, cache_dir: Path | None,
                    num_classes: int = 10, train_size: int = 2000, test_size: int = 500, seed: int = 0,
                    noise: float = 0.15, grid: int = 4, superclasses: int = 0, label_noise: float = 0.0) -> Dataset:
    return make_synthetic(num_classes=num_classes, image_size=32 if image_size is None else image_size,
                          train_size=train_size, test_size=test_size, seed=seed, noise=noise, grid=grid,
                          superclasses=superclasses, label_noise=label_noise)


# -------------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class DatasetSpec:
    """A registered dataset: its one-line description and its loader."""

    name: str
    description: str
    loader: Callable[..., Dataset]

    def options(self) -> list[str]:
        """The dataset-specific keyword options its loader takes (beyond the common ones)."""
        common = {"data_root", "image_size", "download", "cache_dir"}
        return [p for p in inspect.signature(self.loader).parameters if p not in common]


DATASETS: dict[str, DatasetSpec] = {
    "cifar100": DatasetSpec("cifar100", "CIFAR-100: 100 classes, 50k/10k 32x32 images (cifar-100-python/, md5-checked)",
                            _load_cifar100),
    "tinyimagenet": DatasetSpec("tinyimagenet", "Tiny-ImageNet (200 classes, or its 100-class subset) from its "
                                "folder or zip(s), resized to 32x32 (image_size=64 keeps it)", _load_tinyimagenet),
    "stl10": DatasetSpec("stl10", "STL-10 labelled splits (5k/8k, 10 classes) from stl10_binary/, resized to 32x32 "
                         "(image_size=96 keeps them); for the transfer probe", _load_stl10),
    "synthetic": DatasetSpec("synthetic", "deterministic class-conditional colour patterns of any size and class "
                             "count, for tests and smoke runs", _load_synthetic),
}


def list_datasets() -> list[tuple[str, str]]:
    """(name, one-line description) of every dataset."""
    return [(spec.name, spec.description) for spec in DATASETS.values()]


def load_dataset(name: str, data_root: str | Path | None = None, *, image_size: int | None = None,
                 download: bool = False, cache_dir: str | Path | None = None, **options: Any) -> Dataset:
    """Load a dataset by name as uint8 CPU tensors.

    ``data_root`` is where its files are (default ``~/.cache/kdbench/data`` or ``$KDBENCH_DATA_ROOT``);
    ``download`` fetches missing files there. Decoded caches go into ``cache_dir`` when it is given, else next to
    the data, or into ``~/.cache/kdbench`` (``$KDBENCH_CACHE_DIR``) when the data's folder is read-only.
    ``options`` are the dataset's own (synthetic: num_classes, train_size, test_size, seed, noise, grid;
    tinyimagenet: progress, num_workers, cache).
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


# ---------------------------------------------------------------------------------------------- loader


def epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed for (seed, epoch), stable across platforms and torch versions."""
    digest = hashlib.sha256(f"kdbench.loader:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


def crop_flip(images: torch.Tensor, top: torch.Tensor, left: torch.Tensor, flip: torch.Tensor | None,
              pad: int) -> torch.Tensor:
    """Batched ``RandomCrop(size, padding=pad)`` then ``RandomHorizontalFlip`` at given offsets, in one gather.

    ``images`` [B, C, H, W] (any dtype); ``top`` / ``left`` [B] offsets in 0..2*pad into the zero-padded image;
    ``flip`` [B] bool (or None). Output pixel (i, j) is padded[top + i, left + j], or padded[top + i,
    left + W-1-j] when flipped: the crop of the zero-padded image, mirrored after cropping, as torchvision does.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad)) if pad > 0 else images
    rows = top.to(dev, torch.int64)[:, None] + torch.arange(h, device=dev)  # [B, H]
    cols = torch.arange(w, device=dev).expand(b, w)
    if flip is not None:
        cols = torch.where(flip.to(dev)[:, None], (w - 1) - cols, cols)
    cols = cols + left.to(dev, torch.int64)[:, None]  # [B, W]
    bi = torch.arange(b, device=dev)[:, None, None, None]
    ci = torch.arange(c, device=dev)[None, :, None, None]
    return padded[bi, ci, rows[:, None, :, None], cols[:, None, None, :]]


class GPULoader:
    """The whole uint8 split kept on ``device``; batched crop/flip and normalisation done there.

    Train: a fresh permutation, crop offsets and flips per epoch, drawn from a CPU ``torch.Generator`` seeded
    from (seed, epoch) and then moved to the device, so CPU and GPU runs see the same batches and resuming at
    epoch e needs no state. Test (``train=False``): in order, unaugmented, the last partial batch kept.
    """

    def __init__(self, images_uint8: torch.Tensor, labels: torch.Tensor, *, batch_size: int, train: bool,
                 mean: Sequence[float], std: Sequence[float], seed: int = 0, drop_last: bool = False,
                 device: str | torch.device = "cpu", pad: int = 4, flip: bool = True):
        if images_uint8.dtype != torch.uint8 or images_uint8.dim() != 4:
            raise ValueError(f"images must be uint8 [N,C,H,W], got {images_uint8.dtype} {tuple(images_uint8.shape)}")
        if labels.dim() != 1 or labels.shape[0] != images_uint8.shape[0]:
            raise ValueError(f"labels must be [N] with N={images_uint8.shape[0]}, got {tuple(labels.shape)}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise KdbenchError(f"batch_size must be a positive integer, got {batch_size!r}")
        if pad < 0:
            raise KdbenchError(f"pad must be >= 0, got {pad}")
        channels = images_uint8.shape[1]
        if len(mean) != channels or len(std) != channels:
            raise ValueError(f"mean and std need {channels} values, got {len(mean)} and {len(std)}")
        self.device = torch.device(device)
        self.images = images_uint8.to(self.device)
        self.labels = labels.to(self.device, torch.int64)
        self.batch_size = batch_size
        self.train = bool(train)
        self.seed = int(seed)
        self.drop_last = bool(drop_last) and self.train
        self.pad = int(pad)
        self.flip = bool(flip)
        self.mean = torch.tensor(list(mean), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(list(std), dtype=torch.float32, device=self.device).view(1, -1, 1, 1)

    @property
    def num_samples(self) -> int:
        return int(self.images.shape[0])

    def __len__(self) -> int:
        n, bs = self.num_samples, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def normalize(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """uint8 -> float32 normalised, with exactly the operations of ToTensor (/255) then Normalize."""
        return images_uint8.to(torch.float32).div_(255).sub_(self.mean).div_(self.std)

    def plan(self, e: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """The epoch's sample order, crop offsets (top, left) and flips, on the CPU; None where not augmented."""
        n = self.num_samples
        if not self.train:
            return torch.arange(n), None, None, None
        g = torch.Generator(device="cpu")
        g.manual_seed(epoch_seed(self.seed, e))
        order = torch.randperm(n, generator=g)
        top = left = flips = None
        if self.pad > 0:
            top = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
            left = torch.randint(0, 2 * self.pad + 1, (n,), generator=g)
        if self.flip:
            flips = torch.rand(n, generator=g) < 0.5
        return order, top, left, flips

    def epoch(self, e: int = 0) -> Iterator[Batch]:
        """The batches of epoch ``e``: a pure function of (seed, e) for training, the same every time for test."""
        order, top, left, flips = (t.to(self.device) if t is not None else None for t in self.plan(e))
        n, bs = self.num_samples, self.batch_size
        stop = (n // bs) * bs if self.drop_last else n
        for s in range(0, stop, bs):
            idx = order[s:s + bs]
            x = self.images[idx]
            if top is not None or flips is not None:
                k = idx.shape[0]
                zeros = torch.zeros(k, dtype=torch.int64, device=self.device)
                x = crop_flip(x, top[s:s + bs] if top is not None else zeros,
                              left[s:s + bs] if left is not None else zeros,
                              flips[s:s + bs] if flips is not None else None, self.pad)
            yield Batch(self.normalize(x), self.labels[idx], idx)

    def __iter__(self) -> Iterator[Batch]:
        if self.train:
            raise TypeError("iterate a training GPULoader with loader.epoch(e), so each epoch gets its own shuffle")
        return self.epoch(0)

    def __repr__(self) -> str:
        return (f"GPULoader(n={self.num_samples}, batch_size={self.batch_size}, train={self.train}, "
                f"device={self.device}, pad={self.pad}, drop_last={self.drop_last})")
